"""What stock Alembic callers rely on keeps working through ``run_migrations``.

Four things real env.py files and callers do, each broken once (found by running
Alembic's own test suite through the library, and in real projects):

1. code that catches the exception a migration raised (``except IntegrityError``);
2. Alembic's cookbook recipe: a connection from ``engine.begin()`` handed in through
   ``config.attributes["connection"]``, one or more commands in its block;
3. a revision that inspects the database through a second connection
   (``sa.inspect(op.get_bind().engine)``), which waited for the run's own write lock;
4. ``run_migrations(..., literal_binds=..., url=...)`` in offline mode.
"""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import pickle
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.config import Config
from conftest import DEMO_REVISIONS, Project, assert_migrated_once
from sqlalchemy import exc

import alembic_sqlite_lock
from alembic import command
from alembic_sqlite_lock import ConfigurationError, MigrationError

# A revision that inserts a duplicate primary key: SQLAlchemy raises IntegrityError.
DUPLICATE = """\
op.create_table("once", sa.Column("id", sa.Integer, primary_key=True))
op.execute("INSERT INTO once VALUES (1)")
op.execute("INSERT INTO once VALUES (1)")
"""


# 1. The original exception type ------------------------------------------------------


def test_a_failing_migration_is_caught_as_its_own_type_and_as_migration_error(
    project: Project,
) -> None:
    project.add_revision("0009", "0008", DUPLICATE)
    with pytest.raises(exc.IntegrityError) as caught:
        alembic_sqlite_lock.upgrade(project.ini)
    error = caught.value
    assert isinstance(error, MigrationError)
    assert isinstance(error.__cause__, exc.IntegrityError)
    # Our message, with the original's text in it; the original's facts copied.
    assert str(error).startswith("Migration 0009 (test revision 0009) failed on sqlite:///")
    assert "UNIQUE constraint failed: once.id" in str(error)
    assert "The run was rolled back; the database is still at base" in str(error)
    assert isinstance(error.orig, sqlite3.IntegrityError)
    assert error.statement == "INSERT INTO once VALUES (1)"
    assert error.revision == "0009"
    assert project.version() == []  # all of it rolled back: 0001-0008 too
    assert "once" not in project.tables()
    # It crosses a process boundary as a plain MigrationError (the combined class
    # exists only in the process that made it).
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is MigrationError
    assert (str(copy), copy.url, copy.revision) == (str(error), error.url, "0009")


def test_the_stock_cli_and_ours_report_it_as_before(project: Project) -> None:
    project.add_revision("0009", "0008", DUPLICATE)
    stock = project.alembic("upgrade", "head")
    assert stock.returncode == 255  # Alembic's CLI: FAILED: and exit -1, as for stock errors
    assert "FAILED: Migration 0009 (test revision 0009) failed on" in stock.stdout
    assert "Traceback" not in stock.stdout + stock.stderr
    ours = subprocess_cli(project, "upgrade")
    assert ours.returncode == 1  # MigrationError's exit code, not "any other error"
    assert ours.stderr.count("alembic-sqlite-lock: error: Migration 0009") == 1
    assert project.version() == []


def subprocess_cli(project: Project, *args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("alembic-sqlite-lock")
    return subprocess.run([str(exe), "-c", str(project.ini), *args], cwd=project.root,
                          capture_output=True, text=True, timeout=120, check=False)


def test_an_os_error_keeps_its_errno(project: Project) -> None:
    project.add_revision("0009", "0008", 'raise FileNotFoundError(2, "no such file", "x.csv")')
    with pytest.raises(FileNotFoundError) as caught:
        alembic_sqlite_lock.upgrade(project.ini)
    assert isinstance(caught.value, MigrationError)
    assert (caught.value.errno, caught.value.filename) == (2, "x.csv")
    assert "Migration 0009 (test revision 0009) failed" in str(caught.value)


def test_an_exception_type_that_cannot_be_subclassed_stays_a_migration_error(
    project: Project,
) -> None:
    """The rare type that refuses subclasses: a plain MigrationError, the original as
    its cause."""
    project.add_revision("0009", "0008", """\
class Sealed(Exception):
    def __init_subclass__(cls, **kwargs):
        raise TypeError("sealed")
raise Sealed("0009 broke")
""")
    with pytest.raises(MigrationError) as caught:
        alembic_sqlite_lock.upgrade(project.ini)
    assert type(caught.value) is MigrationError
    assert type(caught.value.__cause__).__name__ == "Sealed"
    assert "0009 broke" in str(caught.value)


# 2. Alembic's cookbook: engine.begin() handed in --------------------------------------


def cookbook(ini: Path, db: Path, then_write: bool = True) -> None:
    """"Sharing a Connection across one or more programmatic migration commands"."""
    engine = sa.create_engine(f"sqlite:///{db}")
    try:
        config = Config(str(ini))
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, DEMO_REVISIONS[2])
            command.upgrade(config, "head")
            if then_write:  # the caller's own work after the commands, in its block
                connection.exec_driver_sql("INSERT INTO tags (name) VALUES ('caller')")
    finally:
        engine.dispose()


def test_the_cookbook_recipe_with_two_commands_and_a_write_after(project: Project) -> None:
    cookbook(project.ini, project.db)
    assert project.version() == ["0008"]
    assert project.count("data_migrations") == 1
    assert project.query("SELECT count(*) FROM tags WHERE name = 'caller'") == [(1,)]
    assert run_lock_free(project)  # released when the run committed, not left held


def run_lock_free(project: Project) -> bool:
    fd = os.open(f"{project.db}.migration-lock", os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def _cookbook_after_barrier(ini: str, db: str, barrier: object) -> None:
    barrier.wait()  # type: ignore[attr-defined]
    cookbook(Path(ini), Path(db), then_write=False)


def test_eight_workers_each_handing_in_engine_begin_migrate_once(project: Project) -> None:
    fork = multiprocessing.get_context("fork")
    barrier = fork.Barrier(8, timeout=60)
    procs = [fork.Process(target=_cookbook_after_barrier,
                          args=(str(project.ini), str(project.db), barrier))
             for _ in range(8)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
    assert [proc.exitcode for proc in procs] == [0] * 8
    assert_migrated_once(project)


def test_a_failing_migration_in_the_cookbook_block_rolls_back(project: Project) -> None:
    project.add_revision("0009", "0008", DUPLICATE)
    engine = sa.create_engine(f"sqlite:///{project.db}")
    config = Config(str(project.ini))
    try:
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            with pytest.raises(exc.IntegrityError):
                command.upgrade(config, "head")
    finally:
        engine.dispose()
    assert project.version() == []
    assert "once" not in project.tables()


def test_a_transaction_sqlite_has_begun_is_still_refused(project: Project) -> None:
    engine = sa.create_engine(f"sqlite:///{project.db}")
    config = Config(str(project.ini))
    try:
        with engine.begin() as connection:
            connection.exec_driver_sql("CREATE TEMP TABLE notes (x)")
            connection.exec_driver_sql("INSERT INTO notes VALUES (1)")  # pysqlite: BEGIN
            config.attributes["connection"] = connection
            with pytest.raises(ConfigurationError, match="has begun in SQLite"):
                command.upgrade(config, "head")
    finally:
        engine.dispose()
    assert project.version() == []


def test_autocommit_block_in_the_callers_transaction_is_refused_clearly(
    project: Project,
) -> None:
    project.add_revision("0009", "0008", """\
with op.get_context().autocommit_block():
    op.execute("CREATE TABLE later (x)")
""")
    engine = sa.create_engine(f"sqlite:///{project.db}")
    config = Config(str(project.ini))
    try:
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            with pytest.raises(ConfigurationError, match="inside the caller's transaction"):
                command.upgrade(config, "head")
    finally:
        engine.dispose()
    assert project.version() == []


# 3. A second connection inside a revision ----------------------------------------------

INSPECTS = """\
names = sorted(sa.inspect(op.get_bind().engine).get_table_names())
op.create_table("seen", sa.Column("name", sa.String(50)))
for name in names:
    op.execute(sa.text("INSERT INTO seen VALUES (:n)").bindparams(n=name))
"""


def test_a_revision_that_reads_through_a_second_connection_runs(project: Project) -> None:
    """It sees the schema before the run (the run is one transaction, uncommitted)."""
    assert alembic_sqlite_lock.upgrade(project.ini, DEMO_REVISIONS[0]) == ["0001"]
    before = sorted(project.tables())
    project.add_revision("0009", "0008", INSPECTS)
    result = project.alembic("upgrade", "head")
    assert result.returncode == 0, result.stdout + result.stderr
    assert project.version() == ["0009"]
    assert sorted(n for (n,) in project.query("SELECT name FROM seen")) == sorted(before)


def test_with_transaction_per_migration_it_sees_the_revisions_before(
    project: Project,
) -> None:
    env = project.root / "alembic" / "env.py"
    env.write_text(env.read_text().replace(
        "run_migrations(context, target_metadata",
        "run_migrations(context, target_metadata, transaction_per_migration=True"))
    project.add_revision("0009", "0008", INSPECTS)
    result = project.alembic("upgrade", "head")
    assert result.returncode == 0, result.stdout + result.stderr
    seen = {n for (n,) in project.query("SELECT name FROM seen")}
    # Every table of 0001-0008 (committed one by one before 0009 began), none of 0009's.
    assert seen == project.tables() - {"seen", "post_summaries"}  # a view is no table


def test_a_revision_that_writes_through_a_second_connection_fails_clearly(
    project: Project,
) -> None:
    assert alembic_sqlite_lock.upgrade(project.ini) == DEMO_REVISIONS  # tags is committed
    project.add_revision("0009", "0008", """\
with op.get_bind().engine.begin() as other:
    other.exec_driver_sql("INSERT INTO tags (name) VALUES ('second')")
""")
    result = project.alembic("upgrade", "head")
    assert result.returncode == 255
    assert "FAILED: Migration 0009 (test revision 0009) failed" in result.stdout
    assert "wrote through a second connection" in result.stdout
    assert "database is locked" not in result.stdout
    assert project.version() == ["0008"]
    assert project.query("SELECT count(*) FROM tags WHERE name = 'second'") == [(0,)]


# 4. Offline mode keeps the env.py's own options ------------------------------------------


def test_offline_options_of_the_env_py_win(project: Project) -> None:
    env = project.root / "alembic" / "env.py"
    env.write_text(env.read_text().replace(
        "run_migrations(context, target_metadata",
        "run_migrations(context, target_metadata, literal_binds=True, "
        "dialect_opts={'paramstyle': 'named'}, url='postgresql://u@h/db'"))
    result = project.alembic("upgrade", "head", "--sql")
    assert result.returncode == 0, result.stdout + result.stderr
    # The URL given wins over alembic.ini's: PostgreSQL's dialect renders the SQL, in
    # a transaction (SQLite's has none: its DDL is not transactional for Alembic).
    assert "CREATE TABLE alembic_version" in result.stdout
    assert result.stdout.lstrip().startswith("BEGIN;")
    assert "SERIAL" in result.stdout  # PostgreSQL's integer primary keys
    assert not project.db.exists()


def test_offline_dialect_name_instead_of_a_url(project: Project) -> None:
    env = project.root / "alembic" / "env.py"
    env.write_text(env.read_text().replace(
        "run_migrations(context, target_metadata",
        "run_migrations(context, target_metadata, dialect_name='mysql'"))
    result = project.alembic("upgrade", "head", "--sql")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "AUTO_INCREMENT" in result.stdout  # MySQL's integer primary keys
    assert not project.db.exists()

