"""The commands around the lock: what takes it, what does not, and what is refused.

Real SQLite files, the real `alembic` console script, and the in-process
``upgrade()/downgrade()/stamp()`` an app calls at start-up.
"""

from __future__ import annotations

import logging
import re
import sqlite3
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import DEMO_REVISIONS, Project, run_together, write_lock_held

import alembic_sqlite_lock
from alembic_sqlite_lock import ConfigurationError, LockTimeout

# Short enough that a command which did try to take the lock fails within seconds.
SHORT_WAIT = ("-x", "lock_deadline_s=2", "-x", "lock_busy_timeout_s=1")

STOCK_ENV_PY = '''\
"""Alembic's stock env.py template: no alembic_sqlite_lock anywhere."""
from alembic import context
from sqlalchemy import engine_from_config, pool

config = context.config
target_metadata = None


def run_migrations_offline():
    context.configure(url=config.get_main_option("sqlalchemy.url"),
                      target_metadata=target_metadata, literal_binds=True,
                      dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online():
    connectable = engine_from_config(config.get_section(config.config_ini_section, {}),
                                     prefix="sqlalchemy.", poolclass=pool.NullPool)
    with connectable.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
'''

# The user's env.py does not look at config.attributes: run_migrations() does.
MINIMAL_ENV_PY = '''\
from alembic import context
from alembic_sqlite_lock import run_migrations

run_migrations(context, None)
'''


def migrate_to_head(project: Project) -> None:
    assert alembic_sqlite_lock.upgrade(project.ini) == DEMO_REVISIONS


def use_empty_metadata(project: Project) -> None:
    """The demo env.py, but with models: an empty MetaData, i.e. no tables at all."""
    text = project.env_py.read_text()
    assert "target_metadata = None" in text
    project.env_py.write_text(text.replace(
        "target_metadata = None",
        "from sqlalchemy import MetaData\n\ntarget_metadata = MetaData()",
    ))




def output(result: subprocess.CompletedProcess[str]) -> str:
    """Both streams: Alembic prints "FAILED: ..." to stdout, the logs go to stderr."""
    return result.stdout + result.stderr


def columns(project: Project, table: str) -> set[str]:
    return {str(row[1]) for row in project.query(f"PRAGMA table_info({table})")}


def driver_pragma(connection: sa.Connection, name: str) -> Any:
    """Read a PRAGMA on the raw sqlite3 connection, so SQLAlchemy does not autobegin."""
    driver = connection.connection.driver_connection
    assert isinstance(driver, sqlite3.Connection)
    return driver.execute(f"PRAGMA {name}").fetchone()[0]


# Already migrated ---------------------------------------------------------------------


def test_workers_started_together_on_a_migrated_database_do_nothing(project: Project) -> None:
    migrate_to_head(project)

    results = run_together(
        [["alembic", "-c", str(project.ini), "upgrade", "head"]] * 4, cwd=project.root
    )

    for result in results:
        assert result.returncode == 0, result.stderr
        assert "Database already at 0008, nothing to do" in result.stderr
        assert "Applying" not in result.stderr
    assert project.version() == ["0008"]
    assert project.count("data_migrations") == 1


# Read-only commands never take the write lock ------------------------------------------


def test_current_runs_while_the_write_lock_is_held(project: Project) -> None:
    migrate_to_head(project)
    with write_lock_held(project.db):
        result = project.alembic(*SHORT_WAIT, "current")
    assert result.returncode == 0, result.stderr
    assert "0008 (head)" in result.stdout


def test_upgrade_at_head_runs_while_the_write_lock_is_held(project: Project) -> None:
    migrate_to_head(project)
    with write_lock_held(project.db):
        result = project.alembic(*SHORT_WAIT, "upgrade", "head")
    assert result.returncode == 0, result.stderr
    assert "Database already at 0008, nothing to do" in result.stderr


def test_history_indicating_current_runs_while_the_write_lock_is_held(
    project: Project,
) -> None:
    migrate_to_head(project)
    with write_lock_held(project.db):
        result = project.alembic(*SHORT_WAIT, "history", "-i")
    assert result.returncode == 0, result.stderr
    assert re.search(r"0007 -> 0008 \(head\) \(current\)", result.stdout), result.stdout


def test_check_runs_while_the_write_lock_is_held(project: Project) -> None:
    use_empty_metadata(project)
    migrate_to_head(project)
    with write_lock_held(project.db):
        result = project.alembic(*SHORT_WAIT, "check")
    # The models (none) differ from the database (eight revisions of tables): check
    # compared them, which is the proof it ran; failing on the lock would say so.
    assert result.returncode != 0
    assert "New upgrade operations detected" in output(result)
    assert "LockTimeout" not in output(result)
    assert "Could not take the migration lock" not in output(result)


def test_autogenerate_runs_while_the_write_lock_is_held(project: Project) -> None:
    use_empty_metadata(project)
    migrate_to_head(project)
    before = set(project.versions.glob("*.py"))
    with write_lock_held(project.db):
        result = project.alembic(*SHORT_WAIT, "revision", "--autogenerate", "-m", "x")
    assert result.returncode == 0, result.stderr
    (generated,) = set(project.versions.glob("*.py")) - before
    assert "op.drop_table('posts')" in generated.read_text()
    assert project.version() == ["0008"]


# A pending upgrade does wait for the lock, and gives up clearly --------------------------


def test_pending_upgrade_gives_up_on_a_held_lock_from_the_cli(project: Project) -> None:
    migrate_to_head(project)
    alembic_sqlite_lock.downgrade(project.ini, "0007")
    assert "display_name" not in columns(project, "users")

    with write_lock_held(project.db):
        result = project.alembic(*SHORT_WAIT, "upgrade", "head")

    assert result.returncode != 0
    assert "FAILED: Could not take the migration lock" in result.stdout, output(result)
    assert str(project.db) in result.stdout
    assert re.search(r"after \d+ attempts?", result.stdout), result.stdout
    assert "Traceback" not in output(result)
    assert project.version() == ["0007"]
    assert "display_name" not in columns(project, "users")


def test_pending_upgrade_raises_lock_timeout_in_process(project: Project) -> None:
    migrate_to_head(project)
    alembic_sqlite_lock.downgrade(project.ini, "0007")

    with write_lock_held(project.db), pytest.raises(LockTimeout) as caught:
        alembic_sqlite_lock.upgrade(project.ini, deadline_s=1, busy_timeout_s=0.5)

    assert caught.value.attempts >= 1
    assert caught.value.waited_s >= 0.9
    assert str(project.db) in caught.value.url
    assert project.version() == ["0007"]
    assert "display_name" not in columns(project, "users")


# Offline (--sql) ------------------------------------------------------------------------


def assert_full_chain_sql(sql: str) -> None:
    assert "CREATE TABLE users" in sql
    assert "CREATE VIEW post_summaries" in sql
    assert "INSERT INTO tags" in sql
    assert "UPDATE alembic_version SET version_num='0008'" in sql


def test_offline_upgrade_from_the_cli_prints_sql_and_creates_no_database(
    project: Project,
) -> None:
    result = project.alembic("upgrade", "head", "--sql")
    assert result.returncode == 0, result.stderr
    assert_full_chain_sql(result.stdout)
    assert not project.db.exists()


def test_offline_upgrade_in_process_prints_sql_and_creates_no_database(
    project: Project, capsys: pytest.CaptureFixture[str]
) -> None:
    alembic_sqlite_lock.upgrade(project.ini, sql=True)
    assert_full_chain_sql(capsys.readouterr().out)
    assert not project.db.exists()


# env.py that does not go through run_migrations() ----------------------------------------


def assert_names_env_py(error: ConfigurationError, project: Project) -> None:
    assert str(project.env_py) in str(error)
    assert "run_migrations" in str(error)


def test_stock_env_py_is_refused_before_any_migration(project: Project) -> None:
    migrate_to_head(project)
    alembic_sqlite_lock.downgrade(project.ini, "0007")
    project.env_py.write_text(STOCK_ENV_PY)

    with pytest.raises(ConfigurationError) as caught:
        alembic_sqlite_lock.upgrade(project.ini)

    assert_names_env_py(caught.value, project)
    assert project.version() == ["0007"]
    assert "display_name" not in columns(project, "users")


def test_stock_env_py_on_a_fresh_database_creates_no_table(project: Project) -> None:
    project.env_py.write_text(STOCK_ENV_PY)

    with pytest.raises(ConfigurationError) as caught:
        alembic_sqlite_lock.upgrade(project.ini)

    assert_names_env_py(caught.value, project)
    assert project.tables() == set()


def test_stock_env_py_stamp_with_purge_keeps_the_version(project: Project) -> None:
    migrate_to_head(project)
    project.env_py.write_text(STOCK_ENV_PY)

    with pytest.raises(ConfigurationError):
        alembic_sqlite_lock.stamp(project.ini, "0003", purge=True)

    assert project.version() == ["0008"]


def test_env_py_that_does_nothing_is_refused(project: Project) -> None:
    project.env_py.write_text('"""Forgot to run anything."""\n')

    with pytest.raises(ConfigurationError) as caught:
        alembic_sqlite_lock.upgrade(project.ini)

    assert_names_env_py(caught.value, project)
    assert project.tables() == set()


# A connection handed in through config.attributes ------------------------------------


@pytest.fixture
def app_engine(project: Project) -> Iterator[sa.Engine]:
    """The app's own engine: foreign keys ON and its own busy timeout on every connection."""
    engine = sa.create_engine(f"sqlite:///{project.db}")

    @sa.event.listens_for(engine, "connect")
    def _app_pragmas(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.execute("PRAGMA foreign_keys = ON")
        dbapi_connection.execute("PRAGMA busy_timeout = 1234")

    project.env_py.write_text(MINIMAL_ENV_PY)
    yield engine
    engine.dispose()


def test_handed_in_connection_is_migrated_and_its_settings_restored(
    project: Project, app_engine: sa.Engine
) -> None:
    from alembic.config import Config

    config = Config(str(project.ini))
    with app_engine.connect() as connection:
        before = (driver_pragma(connection, "foreign_keys"),
                  driver_pragma(connection, "busy_timeout"))
        assert before == (1, 1234)
        config.attributes["connection"] = connection

        assert alembic_sqlite_lock.upgrade(config) == DEMO_REVISIONS

        after = (driver_pragma(connection, "foreign_keys"),
                 driver_pragma(connection, "busy_timeout"))
        assert after == before
        assert not connection.in_transaction()
    assert project.version() == ["0008"]
    assert project.count("data_migrations") == 1
    assert project.count("tags") == 3


def test_handed_in_connection_inside_a_transaction_is_refused(
    project: Project, app_engine: sa.Engine
) -> None:
    """A transaction SQLite has begun (a write ran in it): the run cannot begin its own.
    (One that SQLAlchemy began but that has sent nothing yet, engine.begin()'s, works:
    tests/test_compat.py.)"""
    from alembic.config import Config

    config = Config(str(project.ini))
    with app_engine.connect() as connection:
        connection.begin()
        connection.exec_driver_sql("CREATE TEMP TABLE notes (x)")
        connection.exec_driver_sql("INSERT INTO notes VALUES (1)")  # pysqlite: BEGIN
        config.attributes["connection"] = connection

        with pytest.raises(ConfigurationError, match="already inside a transaction"):
            alembic_sqlite_lock.upgrade(config)
        connection.rollback()
    assert project.version() == []
    assert project.tables() == set()


def test_handed_in_connection_whose_engine_emits_its_own_begin_is_refused(
    project: Project,
) -> None:
    """SQLAlchemy's pysqlite recipe (driver autocommit, BEGIN from a 'begin' listener)
    would start a second transaction after the lock's BEGIN IMMEDIATE: refused with the
    cause, nothing migrated, the connection left usable."""
    from alembic.config import Config

    engine = sa.create_engine(f"sqlite:///{project.db}")

    @sa.event.listens_for(engine, "connect")
    def _autocommit(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None

    @sa.event.listens_for(engine, "begin")
    def _begin(connection: sa.Connection) -> None:
        connection.exec_driver_sql("BEGIN")

    config = Config(str(project.ini))
    project.env_py.write_text(MINIMAL_ENV_PY)
    try:
        with engine.connect() as connection:
            config.attributes["connection"] = connection
            with pytest.raises(ConfigurationError, match="emits its own BEGIN") as caught:
                alembic_sqlite_lock.upgrade(config)
            assert str(project.db) in str(caught.value)
            assert connection.exec_driver_sql("SELECT 1").scalar() == 1
    finally:
        engine.dispose()
    assert project.version() == []
    assert project.tables() == set()


@pytest.mark.parametrize("kind", ["engine", "sqlite3"])
def test_handing_in_something_other_than_a_connection_is_refused(
    project: Project, kind: str
) -> None:
    from alembic.config import Config

    engine = sa.create_engine(f"sqlite:///{project.db}")
    raw = sqlite3.connect(project.db)
    config = Config(str(project.ini))
    project.env_py.write_text(MINIMAL_ENV_PY)
    config.attributes["connection"] = engine if kind == "engine" else raw
    try:
        with pytest.raises(ConfigurationError, match="must be a SQLAlchemy Connection"):
            alembic_sqlite_lock.upgrade(config)
    finally:
        raw.close()
        engine.dispose()
    assert project.tables() == set()


# Not a supported database -----------------------------------------------------------


def test_unsupported_url_is_refused_without_showing_the_password(project: Project) -> None:
    ini = project.ini.read_text()
    assert "sqlalchemy.url = sqlite:///%(here)s/app.db" in ini
    project.ini.write_text(ini.replace(
        "sqlalchemy.url = sqlite:///%(here)s/app.db",
        "sqlalchemy.url = oracle://u:secret@h/db",
    ))

    result = project.alembic("upgrade", "head")

    assert result.returncode != 0
    assert "FAILED: alembic-sqlite-lock migrates sqlite, postgresql, mysql and mariadb" in (
        result.stdout
    )
    assert "Traceback" not in output(result)
    assert "secret" not in output(result)
    with pytest.raises(ConfigurationError) as caught:
        alembic_sqlite_lock.upgrade(project.ini)
    assert "secret" not in str(caught.value)
    assert not project.db.exists()


def test_the_old_postgres_scheme_gets_the_new_spelling(project: Project) -> None:
    project.ini.write_text(project.ini.read_text().replace(
        "sqlalchemy.url = sqlite:///%(here)s/app.db", "sqlalchemy.url = postgres://u:secret@h/db"))
    with pytest.raises(ConfigurationError, match="Write postgresql:// instead") as caught:
        alembic_sqlite_lock.upgrade(project.ini)
    assert "secret" not in str(caught.value)


def test_an_encrypted_sqlite_driver_is_refused_and_nothing_is_created(project: Project) -> None:
    """Migrating through sqlite3 would create the missing file unencrypted."""
    project.ini.write_text(project.ini.read_text().replace(
        "sqlalchemy.url = sqlite:///%(here)s/app.db",
        "sqlalchemy.url = sqlite+pysqlcipher://:s3cret@/%(here)s/app.db"))
    with pytest.raises(ConfigurationError, match="uses the pysqlcipher driver") as caught:
        alembic_sqlite_lock.upgrade(project.ini)
    assert "s3cret" not in str(caught.value)
    assert not project.db.exists()


# downgrade() and stamp() -------------------------------------------------------------


def test_downgrade_and_stamp_return_what_they_did(
    project: Project, caplog: pytest.LogCaptureFixture
) -> None:
    migrate_to_head(project)
    caplog.set_level(logging.INFO, logger="alembic_sqlite_lock")

    assert alembic_sqlite_lock.downgrade(project.ini, "0006") == ["0008", "0007"]
    assert project.version() == ["0006"]
    assert "post_summaries" not in project.tables()
    assert "display_name" not in columns(project, "users")
    assert "Reverted migration: 0008" in caplog.text
    assert "Reverted migration: 0007" in caplog.text

    tables = project.tables()
    assert alembic_sqlite_lock.stamp(project.ini, "0003") == ["0003"]
    assert project.version() == ["0003"]
    assert project.tables() == tables  # stamp moves the version only
    assert "Stamped: 0003" in caplog.text
