"""What every backend must do: the same scenarios on SQLite, PostgreSQL and MariaDB.

Each test takes ``backend``: a fresh database (a new SQLite file, or a database of its own
on the real server, created and dropped here) and a copy of the demo project pointed at
it, with what the test needs to know about that backend's lock. Without a server its
tests skip, except under CI=true, where they fail (tests/servers.py). What only one
backend does lives in its own file (test_postgresql.py, test_mysql.py, and the SQLite
files named after their concern).
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import (
    DEMO_REVISIONS,
    Project,
    applied_lines,
    assert_migrated_once,
    held_flock,
    make_project,
    run_together,
    upgrade_in_processes,
)
from servers import (
    MY_ADMIN,
    PG_ADMIN,
    ServerProject,
    admin_engine,
    mysql_database,
    mysql_url,
    postgresql_database,
    postgresql_url,
    server_project,
)

import alembic_sqlite_lock
from alembic_sqlite_lock import LockTimeout, MigrationError
from alembic_sqlite_lock._backends._mysql import lock_name
from alembic_sqlite_lock._backends._postgresql import key_for
from alembic_sqlite_lock._backends._sqlite._runlock import SUFFIX

FOUND_DONE = ("All migrations already applied by another worker",
              "Database already at 0008, nothing to do")
"""What a worker that did not migrate logs: it waited and found the work done, or it
found the database at head in its look."""


@dataclass
class Backend:
    """A fresh database on one backend and the demo project pointed at it."""

    name: str
    project: Project
    shown_url: str
    """The URL as errors and `status` show it (never a password)."""
    transactional_ddl: bool
    """A failing run leaves nothing of itself (SQLite, PostgreSQL); MySQL commits each
    DDL statement, so a run ends at its last fully applied revision."""
    lock_words: str
    """What a LockTimeout message names: the lock this backend waited for."""

    def hold_lock(self) -> AbstractContextManager[None]:
        """Another worker holds the migration lock of this database."""
        raise NotImplementedError

    def lock_is_free(self) -> bool:
        raise NotImplementedError

    @property
    def database_path(self) -> str:
        """`status --json`'s ``database_path``: the file, or nothing on a server."""
        return ""


class SQLite(Backend):
    @property
    def lock_file(self) -> Path:
        return Path(f"{self.project.db}{SUFFIX}")

    def hold_lock(self) -> AbstractContextManager[None]:
        return held_flock(self.lock_file)

    def lock_is_free(self) -> bool:
        if not self.lock_file.exists():
            return True
        fd = os.open(self.lock_file, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        finally:
            os.close(fd)  # releases the flock taken just now
        return True

    @property
    def database_path(self) -> str:
        return str(self.project.db)


@dataclass
class PostgreSQL(Backend):
    admin: sa.Engine | None = None
    database: str = ""

    @contextmanager
    def hold_lock(self) -> Iterator[None]:
        assert isinstance(self.project, ServerProject)
        key = key_for(self.database, "public", "alembic_version")
        # Advisory locks belong to one database: a hung worker is a session in this one.
        engine = self.project.engine()
        try:
            with engine.connect() as hung:
                hung.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": key})
                yield
        finally:
            engine.dispose()

    def lock_is_free(self) -> bool:
        assert self.admin is not None
        with self.admin.connect() as connection:
            return not connection.execute(
                sa.text("SELECT count(*) FROM pg_locks l JOIN pg_database d "
                        "ON d.oid = l.database WHERE l.locktype = 'advisory' "
                        "AND d.datname = :db"), {"db": self.database}
            ).scalar_one()


@dataclass
class MariaDB(Backend):
    admin: sa.Engine | None = None
    database: str = ""

    @contextmanager
    def hold_lock(self) -> Iterator[None]:
        assert self.admin is not None
        name = lock_name(self.database, "alembic_version")
        with self.admin.connect() as hung:
            assert hung.execute(sa.text("SELECT GET_LOCK(:n, 0)"), {"n": name}).scalar() == 1
            yield

    def lock_is_free(self) -> bool:
        assert self.admin is not None
        with self.admin.connect() as connection:
            return bool(connection.execute(
                sa.text("SELECT IS_FREE_LOCK(:n)"),
                {"n": lock_name(self.database, "alembic_version")},
            ).scalar())


@pytest.fixture(params=["sqlite", "postgresql", "mariadb"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    root = tmp_path / "proj"
    if request.param == "sqlite":
        make_project(root)
        project = Project(root)
        yield SQLite("sqlite", project, f"sqlite:///{project.db}",
                     transactional_ddl=True, lock_words=str(project.db))
        return
    if request.param == "postgresql":
        admin = admin_engine(PG_ADMIN)
        try:
            with postgresql_database(admin) as database:
                url = postgresql_url(database)
                yield PostgreSQL("postgresql", server_project(root, url), url,
                                 transactional_ddl=True, lock_words="advisory lock",
                                 admin=admin, database=database)
        finally:
            admin.dispose()
        return
    admin = admin_engine(MY_ADMIN)
    try:
        with mysql_database(admin) as database:
            url = mysql_url(database)
            yield MariaDB("mariadb", server_project(root, url), url, transactional_ddl=False,
                          lock_words=f"GET_LOCK('{lock_name(database, 'alembic_version')}')",
                          admin=admin, database=database)
    finally:
        admin.dispose()


# N workers released at once: each migration is applied once ------------------------------


@pytest.mark.parametrize(
    "workers", [pytest.param(4, marks=pytest.mark.slow), 10,
                pytest.param(32, marks=pytest.mark.slow)])
def test_cli_workers_released_together_apply_each_migration_once(
    backend: Backend, workers: int
) -> None:
    project = backend.project
    results = run_together(
        [["alembic", "-c", str(project.ini), "upgrade", "head"]] * workers,
        cwd=project.root,
        timeout_s=240,
    )

    for result in results:
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr
    applied = Counter(rev for r in results for rev in applied_lines(r.stderr))
    assert applied == Counter(DEMO_REVISIONS)  # every revision applied, exactly once
    appliers = [r for r in results if applied_lines(r.stderr)]
    assert len(appliers) == 1
    for other in results:
        if other is not appliers[0]:
            assert any(line in other.stderr for line in FOUND_DONE), other.stderr
    assert_migrated_once(project)
    assert backend.lock_is_free()


@pytest.mark.parametrize("workers", [4, 10])
def test_upgrade_in_processes_released_by_a_barrier_apply_each_migration_once(
    backend: Backend, workers: int
) -> None:
    """N processes call the start-up function ``upgrade()`` at once."""
    exit_codes, applied = upgrade_in_processes(backend.project.ini, workers)

    assert exit_codes == [0] * workers
    assert sorted(rev for revs in applied for rev in revs) == DEMO_REVISIONS
    assert sorted(len(revs) for revs in applied) == [0] * (workers - 1) + [8]
    assert_migrated_once(backend.project)
    assert backend.lock_is_free()


# A failing migration -------------------------------------------------------------------------

# 0009 does real work (a table, a row) before it fails: where the run ends shows what of it
# stayed. 0010 comes after it and must never run.
FAILING_0009 = """\
op.create_table("t0009", sa.Column("id", sa.Integer, primary_key=True))
op.execute("INSERT INTO t0009 (id) VALUES (1)")
op.execute(sa.text("SELECT * FROM no_such_table"))
"""
AFTER_0009 = 'op.create_table("t0010", sa.Column("id", sa.Integer, primary_key=True))'


def test_a_failing_migration_leaves_the_database_at_a_revision_and_says_which(
    backend: Backend,
) -> None:
    """On SQLite and PostgreSQL the whole run rolls back (DDL is transactional), here
    even the eight good revisions before it; MySQL commits each DDL statement, so the
    run ends at the last fully applied revision, with the failing one's table left
    behind (documented). Either way the error names the revision and where the database
    is, and nothing after the failing revision runs."""
    project = backend.project
    project.add_revision("0009", "0008", FAILING_0009)
    project.add_revision("0010", "0009", AFTER_0009)

    result = project.alembic("upgrade", "head")

    assert result.returncode == 255
    assert "FAILED: Migration 0009 (test revision 0009) failed on" in result.stdout, \
        result.stdout + result.stderr
    assert backend.shown_url in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    if backend.transactional_ddl:
        assert "The run was rolled back; the database is still at base" in result.stdout
        assert "base (no revision)" in result.stdout
        assert project.tables() == set()  # no file, or an empty one
        assert project.version() == []
        assert alembic_sqlite_lock.upgrade(project.ini, "0008") == DEMO_REVISIONS
    else:
        assert "the version table says 0008" in result.stdout
        assert project.version() == ["0008"]
        assert "t0009" in project.tables()
    assert "t0010" not in project.tables()
    assert backend.lock_is_free()

    with pytest.raises(MigrationError) as caught:
        alembic_sqlite_lock.upgrade(project.ini)

    assert caught.value.revision == "0009"
    assert isinstance(caught.value.__cause__, Exception)
    if backend.transactional_ddl:
        assert "still at 0008" in str(caught.value)
        assert "t0009" not in project.tables()
    else:
        assert "the version table says 0008" in str(caught.value)
    assert project.version() == ["0008"]
    assert "t0010" not in project.tables()
    assert project.count("data_migrations") == 1
    assert backend.lock_is_free()

    again = project.alembic("upgrade", "head")
    assert again.returncode == 255
    assert "FAILED: Migration 0009 (test revision 0009) failed on" in again.stdout
    assert "Applied migration" not in again.stderr  # nothing new was applied


# Another worker holds the lock past the deadline -----------------------------------------------


def test_a_held_lock_gives_lock_timeout_at_the_deadline_then_the_next_worker_migrates(
    backend: Backend,
) -> None:
    project = backend.project
    with backend.hold_lock():
        with pytest.raises(LockTimeout) as caught:
            # Attempts of 0.5 s in a 3 s deadline: several, even on a loaded machine
            # where opening the first connection takes a second.
            alembic_sqlite_lock.upgrade(
                project.ini, deadline_s=3, busy_timeout_s=0.5, max_attempts=100
            )
        # The stock alembic CLI prints "FAILED: <message>" on stdout, logs it on stderr.
        result = project.alembic(
            "-x", "lock_deadline_s=1", "-x", "lock_busy_timeout_s=0.3", "upgrade", "head"
        )
    error = caught.value
    assert error.waited_s >= 3.0
    assert error.attempts > 1
    assert backend.lock_words in str(error)
    assert error.url == backend.shown_url
    assert result.returncode == 255
    assert f"FAILED: Could not take the migration lock on {backend.shown_url}" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    assert project.version() == []
    assert project.tables() == set()

    # Released: the lock is free again and the next worker migrates.
    assert backend.lock_is_free()
    assert alembic_sqlite_lock.upgrade(project.ini) == DEMO_REVISIONS
    assert project.version() == ["0008"]


# Our command line: status and current -----------------------------------------------------------


def test_status_and_current_of_our_cli(backend: Backend) -> None:
    """`status` (text and JSON) and `current` before and after the upgrade: the
    revisions, the database file only where there is one, and never a password."""
    project = backend.project
    cli = str(Path(sys.executable).with_name("alembic-sqlite-lock"))

    def run(*args: str) -> str:
        result = subprocess.run([cli, "-c", str(project.ini), *args], cwd=project.root,
                                capture_output=True, text=True, timeout=120, check=False)
        assert result.returncode == 0, result.stdout + result.stderr
        password = sa.make_url(backend.shown_url).password
        assert not password or str(password) not in result.stdout + result.stderr
        return result.stdout

    assert run("current") == "base (no revision)\n"
    report = json.loads(run("status", "--json"))
    assert (report["current"], report["heads"]) == ([], ["0008"])
    assert report["pending"] == DEMO_REVISIONS
    assert report["database_path"] == backend.database_path
    assert report["backups"] == []
    run("upgrade")
    assert run("current") == "0008 (head)\n"
    assert "Pending:    none, up to date" in run("status")
    assert json.loads(run("status", "--json"))["up_to_date"] is True
    assert backend.lock_is_free()
