"""The real PostgreSQL and MariaDB servers of this machine, for the backend tests.

Each test gets a database of its own, made here and dropped after. When the server
does not answer the tests skip with the reason, except under ``CI=true``, where a
missing server is a failure: CI must never pass by skipping them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import REPO, Project, make_project
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


def applied_lines(stderr: str) -> list[str]:
    return re.findall(r"Applied migration: (\w+)", stderr)


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


def check_status_and_current(project: ServerProject) -> None:
    """`status` (text and JSON) and `current` of our CLI on a server database, before
    and after the upgrade: the revisions, nothing about files, and never a password."""
    cli = str(Path(sys.executable).with_name("alembic-sqlite-lock"))

    def run(*args: str) -> str:
        result = subprocess.run([cli, "-c", str(project.ini), *args], cwd=project.root,
                                capture_output=True, text=True, timeout=120, check=False)
        assert result.returncode == 0, result.stdout + result.stderr
        password = sa.make_url(project.url).password
        assert not password or str(password) not in result.stdout + result.stderr
        return result.stdout

    assert run("current") == "base (no revision)\n"
    report = json.loads(run("status", "--json"))
    assert (report["current"], report["heads"]) == ([], ["0008"])
    assert report["pending"] == ["0001", "0002", "0003", "0004", "0005", "0006", "0007", "0008"]
    assert report["database_path"] == ""
    assert report["backups"] == []
    assert subprocess.run([cli, "-c", str(project.ini), "upgrade"], cwd=project.root,
                          capture_output=True, text=True, timeout=120, check=False
                          ).returncode == 0
    assert run("current") == "0008 (head)\n"
    assert "Pending:    none, up to date" in run("status")
    assert json.loads(run("status", "--json"))["up_to_date"] is True
