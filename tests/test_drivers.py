"""Every driver a SQLAlchemy 2 user is likely to have in a server URL, against the real
PostgreSQL and MariaDB servers: psycopg, psycopg2, asyncpg and psycopg's async mode;
PyMySQL, mysqlclient, aiomysql and asyncmy.

An async driver's URL is migrated through the synchronous driver of the same database
when one is installed, else through the async driver itself (driven as
``AsyncConnection.run_sync()`` drives it): each way is a case here, the second forced by
asyncpg's own URL options or by hiding the synchronous drivers from the workers (a
``sitecustomize`` that makes them unimportable). Per case: six ``alembic upgrade head``
released at one instant migrate exactly once; ``current``, ``status``, ``downgrade`` and
``stamp`` of our command line; ``upgrade()`` / ``upgrade_async()`` inside
``migration_lock()`` / ``migration_lock_async()`` blocks. Then a driver that is not
installed, and connections handed in through ``config.attributes["connection"]`` (sync,
``engine.begin()``'s, and the sync face inside ``AsyncConnection.run_sync()``) with six
workers at once.

Each test migrates a database of its own. Without a server, or a driver, the tests skip,
except under CI=true, where they fail.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import subprocess
import sys
import textwrap
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.config import Config
from conftest import DEMO_REVISIONS, Project, assert_migrated_once, run_together, set_url
from servers import (
    MY_ADMIN,
    PG_ADMIN,
    ServerProject,
    admin_engine,
    applied_lines,
    hiding,
    mysql_database,
    mysql_url,
    postgresql_database,
    postgresql_url,
    require_modules,
    server_project,
    with_driver,
)
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

import alembic_sqlite_lock
from alembic_sqlite_lock import ConfigurationError
from alembic_sqlite_lock._backends._drivers import route, server_engine

WORKERS = 6
CLI = str(Path(sys.executable).with_name("alembic-sqlite-lock"))


@dataclass(frozen=True)
class Case:
    id: str
    server: str
    """postgresql or mysql (the MariaDB server)."""
    driver: str
    """As written in the URL."""
    through: str
    """The driver the run goes through."""
    query: str = ""
    hidden: tuple[str, ...] = ()
    """Modules the workers cannot import (as if not installed)."""
    race: bool = True
    """Raced by workers at once (the others: only which driver a run takes)."""

    @property
    def is_async(self) -> bool:
        return self.driver in ("asyncpg", "psycopg_async", "aiomysql", "asyncmy")

    @property
    def modules(self) -> tuple[str, ...]:
        """What must be installed for the case to run."""
        names = {"psycopg": "psycopg", "psycopg2": "psycopg2", "asyncpg": "asyncpg",
                 "psycopg_async": "psycopg", "pymysql": "pymysql", "mysqldb": "MySQLdb",
                 "aiomysql": "aiomysql", "asyncmy": "asyncmy"}
        needed = {names[self.driver], names[self.through]}
        return tuple(sorted(needed | ({"greenlet"} if self.is_async else set())))


CASES = [
    Case("psycopg", "postgresql", "psycopg", "psycopg"),
    Case("psycopg2", "postgresql", "psycopg2", "psycopg2"),
    Case("asyncpg", "postgresql", "asyncpg", "psycopg"),
    Case("asyncpg-through-psycopg2", "postgresql", "asyncpg", "psycopg2", hidden=("psycopg",),
         race=False),
    Case("asyncpg-itself", "postgresql", "asyncpg", "asyncpg",
         query="prepared_statement_cache_size=100"),
    Case("psycopg_async", "postgresql", "psycopg_async", "psycopg"),
    Case("pymysql", "mysql", "pymysql", "pymysql"),
    Case("mysqldb", "mysql", "mysqldb", "mysqldb"),
    Case("aiomysql", "mysql", "aiomysql", "pymysql"),
    Case("asyncmy", "mysql", "asyncmy", "pymysql"),
    Case("asyncmy-through-mysqldb", "mysql", "asyncmy", "mysqldb", hidden=("pymysql",),
         race=False),
    Case("asyncmy-itself", "mysql", "asyncmy", "asyncmy", hidden=("pymysql", "MySQLdb")),
]




@pytest.fixture(params=CASES, ids=lambda case: case.id)
def case(request: pytest.FixtureRequest) -> Case:
    chosen: Case = request.param
    require_modules(*chosen.modules)
    return chosen


@pytest.fixture(params=[case for case in CASES if case.race], ids=lambda case: case.id)
def raced(request: pytest.FixtureRequest) -> Case:
    chosen: Case = request.param
    require_modules(*chosen.modules)
    return chosen


@contextmanager
def server_database(server: str) -> Iterator[str]:
    """A new database on the server, as postgresql_url()/mysql_url() give it."""
    admin = admin_engine(PG_ADMIN if server == "postgresql" else MY_ADMIN)
    try:
        if server == "postgresql":
            with postgresql_database(admin) as name:
                yield postgresql_url(name)
        else:
            with mysql_database(admin) as name:
                yield mysql_url(name)
    finally:
        admin.dispose()


@dataclass
class Setup:
    project: ServerProject
    """Its alembic.ini names the case's driver; project.url and its queries do not."""
    url: str
    """The URL with the case's driver, as alembic.ini has it."""
    env: dict[str, str]
    """The workers' environment (the case's hidden modules unimportable)."""

    def python(self, code: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", code, *args], cwd=self.project.root,
                              env=self.env, capture_output=True, text=True, timeout=120,
                              check=False)


@pytest.fixture
def setup(raced: Case, tmp_path: Path) -> Iterator[Setup]:
    with server_database(raced.server) as plain:
        project = server_project(tmp_path / "proj", plain)
        url = with_driver(plain, raced.driver, raced.query)
        set_url(project, url)
        yield Setup(project, url, hiding(tmp_path / "hidden", raced.hidden))


# Six workers at once, then the command line and the API --------------------------------

COMMANDS_AFTER = textwrap.dedent("""\
    # One process for what follows the race (a process costs a second of imports): our
    # command line's current, downgrade, stamp and status, then stamp(), and upgrade()
    # (upgrade_async() for an async URL) inside a migration_lock() block
    # (migration_lock_async()) on the same URL, whose lock the run sees as its own.
    import asyncio, contextlib, io, json, sys
    from alembic_sqlite_lock import (
        migration_lock, migration_lock_async, stamp, upgrade, upgrade_async)
    from alembic_sqlite_lock._cli import main

    ini, url, is_async = sys.argv[1], sys.argv[2], sys.argv[3] == "1"

    def cli(*args):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = main(["-c", ini, *args])
        return [code, out.getvalue().strip()]

    async def in_async_block():
        async with migration_lock_async(url):
            return await upgrade_async(ini)

    report = {"current": cli("current"), "downgrade": cli("downgrade", "0007"),
              "after downgrade": cli("current"), "stamp": cli("stamp", "0008"),
              "status": cli("status", "--json")}
    stamp(ini, "0007")
    if is_async:
        report["upgrade"] = asyncio.run(in_async_block())
    else:
        with migration_lock(url):
            report["upgrade"] = upgrade(ini)
    print(json.dumps(report))
""")


@pytest.mark.slow
def test_workers_at_once_migrate_exactly_once_then_every_command(
    raced: Case, setup: Setup
) -> None:
    project = setup.project
    results = run_together([["alembic", "-c", str(project.ini), "upgrade", "head"]] * WORKERS,
                           cwd=project.root, env=setup.env)
    for result in results:
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr
    applied = Counter(rev for result in results for rev in applied_lines(result.stderr))
    assert applied == Counter(DEMO_REVISIONS)
    assert len([result for result in results if applied_lines(result.stderr)]) == 1
    assert_migrated_once(project)

    after = setup.python(COMMANDS_AFTER, str(project.ini), setup.url,
                         "1" if raced.is_async else "0")
    assert after.returncode == 0, after.stderr
    report = json.loads(after.stdout.splitlines()[-1])
    assert report["current"] == [0, "0008 (head)"], report
    assert report["downgrade"][0] == 0, report
    assert report["after downgrade"] == [0, "0007"], report
    assert report["stamp"][0] == 0, report
    assert report["status"][0] == 0, report
    status = json.loads(report["status"][1])
    assert (status["current"], status["pending"]) == (["0008"], [])
    assert report["upgrade"] == ["0008"]
    assert project.version() == ["0008"]
    assert "display_name" in {column["name"] for column in
                              sa.inspect(project.engine()).get_columns("users")}


def test_the_driver_a_run_goes_through_is_logged(
    case: Case, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    for module in case.hidden:
        monkeypatch.setitem(sys.modules, module, None)
    url = with_driver("postgresql://u:s3cret@127.0.0.1/db" if case.server == "postgresql"
                      else "mysql://u:s3cret@127.0.0.1/db", case.driver, case.query)
    chosen = route(url)
    assert chosen.url.get_driver_name() == case.through
    assert chosen.is_async == (case.is_async and case.through == case.driver)
    caplog.set_level("DEBUG", logger="alembic_sqlite_lock")
    engine = server_engine({"sqlalchemy.url": url}, chosen, "x")
    engine.dispose()
    line = f"is migrated through {case.through}"
    assert line in caplog.text
    assert "s3cret" not in caplog.text


# A driver that is not installed -----------------------------------------------------------

MISSING = [
    ("postgresql+asyncpg", ("asyncpg", "psycopg", "psycopg2"),
     "pip install 'alembic-sqlite-lock[asyncpg]' (or pip install 'asyncpg')"),
    ("postgresql+psycopg_async", ("psycopg",), "pip install 'alembic-sqlite-lock[postgresql]'"),
    ("postgresql+psycopg", ("psycopg",), "pip install 'alembic-sqlite-lock[postgresql]'"),
    ("postgresql+psycopg2", ("psycopg2",), "pip install 'psycopg2-binary'"),
    ("mysql+aiomysql", ("aiomysql", "pymysql", "MySQLdb"),
     "pip install 'alembic-sqlite-lock[aiomysql]' (or pip install 'aiomysql')"),
    ("mysql+asyncmy", ("asyncmy", "pymysql", "MySQLdb"), "pip install 'asyncmy'"),
    ("mysql+pymysql", ("pymysql",), "pip install 'alembic-sqlite-lock[mysql]'"),
    ("mysql+mysqldb", ("MySQLdb",), "pip install 'mysqlclient'"),
]


@pytest.mark.parametrize(("driver", "hidden", "install"), MISSING, ids=[m[0] for m in MISSING])
def test_a_driver_that_is_not_installed_names_its_package(
    project: Project, monkeypatch: pytest.MonkeyPatch, driver: str, hidden: tuple[str, ...],
    install: str,
) -> None:
    """Nothing is run: the error names the package, never an ImportError traceback."""
    set_url(project, f"{driver}://u:s3cret@127.0.0.1/test")
    for module in hidden:
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ConfigurationError) as caught:
        alembic_sqlite_lock.upgrade(project.ini)
    message = str(caught.value)
    assert "is not installed" in message
    assert install in message, message
    assert "s3cret" not in message


def test_the_command_line_names_the_missing_async_driver(
    project: Project, tmp_path: Path
) -> None:
    """The issue's first try: `current` on a postgresql+asyncpg:// URL."""
    set_url(project, "postgresql+asyncpg://u:s3cret@127.0.0.1/test")
    result = subprocess.run(
        [CLI, "-c", str(project.ini), "current"], cwd=project.root, capture_output=True,
        text=True, timeout=60, check=False,
        env=hiding(tmp_path / "hidden", ("asyncpg", "psycopg", "psycopg2")))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "pip install 'alembic-sqlite-lock[asyncpg]'" in result.stderr, result.stderr
    assert "MissingGreenlet" not in result.stderr


# Connections handed in ----------------------------------------------------------------

SYNC_DRIVER = {"postgresql": "psycopg", "mysql": "pymysql"}
ASYNC_DRIVER = {"postgresql": "asyncpg", "mysql": "aiomysql"}


def _handed_in_worker(ini: str, url: str, mode: str, barrier: Any, results: Any) -> None:
    """One worker: ``upgrade()`` on a connection it hands in, as ``mode`` says."""
    # A worker process, not a test: the server's notes (aiomysql turns "Name
    # 'alembic_version_pkc' ignored for PRIMARY key" into a Warning) are shown, not raised.
    warnings.resetwarnings()
    config = Config(ini)

    def migrate(connection: sa.Connection) -> list[str]:
        config.attributes["connection"] = connection
        return alembic_sqlite_lock.upgrade(config)

    async def through_run_sync() -> list[str]:
        engine = create_async_engine(url, poolclass=NullPool)
        try:
            async with engine.connect() as connection:
                return await connection.run_sync(migrate)
        finally:
            await engine.dispose()

    barrier.wait()
    try:
        if mode == "run_sync":
            applied = asyncio.run(through_run_sync())
        else:
            engine = sa.create_engine(url, poolclass=NullPool)
            try:
                with (engine.begin() if mode == "begin" else engine.connect()) as connection:
                    applied = migrate(connection)
            finally:
                engine.dispose()
    except BaseException as error:
        results.put(repr(error))
        raise
    results.put(applied)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["connect", "begin", "run_sync"])
@pytest.mark.parametrize("server", ["postgresql", "mysql"])
def test_handed_in_connections_from_workers_at_once_migrate_exactly_once(
    tmp_path: Path, server: str, mode: str
) -> None:
    driver = ASYNC_DRIVER[server] if mode == "run_sync" else SYNC_DRIVER[server]
    require_modules(*{"asyncpg": ("asyncpg", "greenlet"), "aiomysql": ("aiomysql", "greenlet"),
                      "psycopg": ("psycopg",), "pymysql": ("pymysql",)}[driver])
    with server_database(server) as plain:
        project = server_project(tmp_path / "proj", plain)
        url = with_driver(plain, driver)
        fork = multiprocessing.get_context("fork")
        barrier = fork.Barrier(WORKERS, timeout=60)
        results = fork.Queue()
        procs = [fork.Process(target=_handed_in_worker,
                              args=(str(project.ini), url, mode, barrier, results))
                 for _ in range(WORKERS)]
        for proc in procs:
            proc.start()
        try:
            outcomes = [results.get(timeout=150) for _ in procs]
        finally:
            for proc in procs:
                proc.join(timeout=30)
                if proc.is_alive():
                    proc.kill()
        assert [proc.exitcode for proc in procs] == [0] * WORKERS, outcomes
        assert Counter(rev for applied in outcomes for rev in applied) == Counter(DEMO_REVISIONS)
        assert sorted(len(applied) for applied in outcomes)[-1] == len(DEMO_REVISIONS)
        assert_migrated_once(project)


def test_a_callers_transaction_stays_the_callers_on_postgresql(tmp_path: Path) -> None:
    """engine.begin()'s connection (Alembic's cookbook): the run holds
    pg_advisory_xact_lock and goes in a savepoint of the caller's transaction, which the
    caller may go on using, and which decides: rolled back, nothing stays."""
    require_modules("psycopg")
    with server_database("postgresql") as plain:
        project = server_project(tmp_path / "proj", plain)
        config = Config(str(project.ini))
        engine = sa.create_engine(with_driver(plain, "psycopg"), poolclass=NullPool)

        def migrate_then_change_mind() -> None:
            with engine.begin() as connection:
                config.attributes["connection"] = connection
                assert alembic_sqlite_lock.upgrade(config) == DEMO_REVISIONS
                assert connection.in_transaction()
                locks = connection.exec_driver_sql(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                    "AND pid = pg_backend_pid()").scalar()
                assert locks == 1  # held until the caller's transaction ends
                raise RuntimeError("the caller changed its mind")

        try:
            with pytest.raises(RuntimeError, match="the caller changed its mind"):
                migrate_then_change_mind()
            assert project.version() == []

            with engine.begin() as connection:
                config.attributes["connection"] = connection
                assert alembic_sqlite_lock.upgrade(config, "0004") == DEMO_REVISIONS[:4]
                connection.exec_driver_sql("INSERT INTO tags (name) VALUES ('callers')")
            assert project.version() == ["0004"]
            assert project.query("SELECT count(*) FROM tags WHERE name = 'callers'") == [(1,)]

            # A snapshot older than the lock would not see another worker's migration.
            with engine.connect() as connection:
                connection.exec_driver_sql("BEGIN ISOLATION LEVEL REPEATABLE READ")
                config.attributes["connection"] = connection
                with pytest.raises(ConfigurationError, match="REPEATABLE READ"):
                    alembic_sqlite_lock.upgrade(config)
        finally:
            engine.dispose()
        assert project.version() == ["0004"]
