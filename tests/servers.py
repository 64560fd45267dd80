"""The real PostgreSQL and MariaDB servers of this machine, for the backend tests.

Each test gets a database of its own, made here and dropped after. When the server
does not answer the tests skip with the reason, except under ``CI=true``, where a
missing server is a failure: CI must never pass by skipping them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import REPO, Project, applied_lines, make_project
from sqlalchemy.pool import NullPool

PG_ADMIN = os.environ.get("ALP_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
MY_ADMIN = os.environ.get("ALP_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/test")
SQLITE_URL = "sqlite:///%(here)s/app.db"


def admin_engine(url: str) -> sa.Engine:
    """An engine for the server's own database, or skip/fail when it does not answer."""
    try:
        engine = sa.create_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
        with engine.connect() as connection:
            connection.exec_driver_sql("SELECT 1")
    except Exception as error:
        shown = sa.make_url(url).render_as_string(hide_password=True)
        reason = f"database server {shown} does not answer: {type(error).__name__}: {error}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason} (CI=true: these tests must run)")
        pytest.skip(reason)
    return engine


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


__all__ = ["applied_lines"]  # re-exported: the server tests read workers' logs with it


@contextmanager
def postgresql_database(admin: sa.Engine, owner: str = "postgres") -> Iterator[str]:
    """A new PostgreSQL database, dropped (with whoever is still connected) after."""
    name = unique("alp")
    with admin.connect() as connection:
        connection.exec_driver_sql(f'CREATE DATABASE "{name}" OWNER "{owner}"')
    try:
        yield name
    finally:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _server_url(admin_url: str, drivername: str, database: str, user: str, password: str
                ) -> str:
    url = sa.make_url(admin_url).set(drivername=drivername, database=database)
    if user:
        url = url.set(username=user, password=password)
    return url.render_as_string(hide_password=False)


def postgresql_url(database: str, user: str = "", password: str = "") -> str:
    """The URL alembic.ini gets for ``database`` on the PostgreSQL server."""
    return _server_url(PG_ADMIN, "postgresql", database, user, password)


def _kill_mysql_sessions(admin: sa.Engine, database: str) -> None:
    """A killed worker's statement may still run on the server (SLEEP): end it."""
    with admin.connect() as connection:
        ids = connection.execute(
            sa.text("SELECT ID FROM information_schema.PROCESSLIST WHERE DB = :db "
                    "AND ID <> CONNECTION_ID()"), {"db": database}
        ).scalars().all()
        for session in ids:
            with contextlib.suppress(sa.exc.DBAPIError):  # it may have ended in between
                connection.exec_driver_sql(f"KILL {int(session)}")


@contextmanager
def mysql_database(admin: sa.Engine) -> Iterator[str]:
    """A new MariaDB/MySQL database; its sessions are ended and it is dropped after."""
    name = unique("alp")
    with admin.connect() as connection:
        connection.exec_driver_sql(f"CREATE DATABASE `{name}`")
    try:
        yield name
    finally:
        _kill_mysql_sessions(admin, name)
        with admin.connect() as connection:
            connection.exec_driver_sql(f"DROP DATABASE IF EXISTS `{name}`")


def mysql_url(database: str, user: str = "", password: str = "") -> str:
    """The URL alembic.ini gets for ``database`` on the MariaDB server."""
    return _server_url(MY_ADMIN, "mysql", database, user, password)


@dataclass
class ServerProject(Project):
    """The demo project with alembic.ini pointing at a server database."""

    url: str = ""
    """The URL the project migrates through (as written in alembic.ini)."""

    def engine(self) -> sa.Engine:
        url = sa.make_url(self.url)
        if url.drivername == "postgresql":
            url = url.set(drivername="postgresql+psycopg")
        elif url.drivername in ("mysql", "mariadb"):
            url = url.set(drivername=f"{url.drivername}+pymysql")
        return sa.create_engine(url, poolclass=NullPool)

    def query(self, sql: str) -> list[tuple[object, ...]]:
        engine = self.engine()
        try:
            with engine.connect() as connection:
                return [tuple(row) for row in connection.exec_driver_sql(sql)]
        finally:
            engine.dispose()

    def tables(self) -> set[str]:
        engine = self.engine()
        try:
            inspector = sa.inspect(engine)
            return set(inspector.get_table_names()) | set(inspector.get_view_names())
        finally:
            engine.dispose()


def server_project(root: Path, url: str) -> ServerProject:
    ini = (REPO / "alembic.ini").read_text()
    assert SQLITE_URL in ini
    make_project(root, ini_text=ini.replace(SQLITE_URL, url.replace("%", "%%")))
    return ServerProject(root, url=url)


def alembic_popen(project: Project, *args: str, env: dict[str, str] | None = None
                  ) -> subprocess.Popen[str]:
    exe = Path(sys.executable).with_name("alembic")
    return subprocess.Popen(
        [str(exe), "-c", str(project.ini), *args],
        cwd=project.root,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


SLEEPING_REVISION_HEADER = "import os\n"


def add_sleeping_revision(project: Project, rev: str, down: str, sleep_sql: str) -> None:
    """A revision that sleeps in a statement when ALP_HOLD is set (the holder only).

    It sleeps before its DDL: on MySQL a CREATE TABLE commits at once, and a killed
    holder would leave the table behind for the next worker to trip over.
    """
    project.add_revision(
        rev,
        down,
        f'if os.environ.get("ALP_HOLD"):\n    op.execute(sa.text("{sleep_sql}"))\n'
        f'op.create_table("t{rev}", sa.Column("id", sa.Integer, primary_key=True))',
        header=SLEEPING_REVISION_HEADER,
    )


# Drivers (tests/test_drivers.py) -------------------------------------------------------


def with_driver(url: str, driver: str, query: str = "") -> str:
    """``url`` (as postgresql_url() or mysql_url() give it) naming ``driver``, with
    ``query`` (``name=value&...``) added."""
    parsed = sa.make_url(url)
    parsed = parsed.set(drivername=f"{parsed.get_backend_name()}+{driver}")
    if query:
        parsed = parsed.update_query_string(query)
    return parsed.render_as_string(hide_password=False)


def hiding(folder: Path, modules: tuple[str, ...]) -> dict[str, str]:
    """The environment for a Python process in which ``modules`` cannot be imported, as
    if they were not installed: a sitecustomize.py in ``folder`` (put on PYTHONPATH) sets
    their sys.modules entries to None before anything runs."""
    env = dict(os.environ)
    if not modules:
        return env
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in modules))
    env["PYTHONPATH"] = os.pathsep.join(
        [str(folder), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def require_modules(*modules: str) -> None:
    """Skip (fail under CI=true) unless every one of ``modules`` can be imported."""
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        reason = f"not installed: {', '.join(missing)} (pip install -e '.[test]')"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason} (CI=true: these tests must run)")
        pytest.skip(reason)
