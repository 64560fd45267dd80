"""A worker that finds the database at head: one plain SELECT, no write lock.

Stock Alembic reads the version with a ``has_table`` reflection and then a SELECT that
SQLAlchemy compiles on first use; the look here reads the same rows with one SELECT on
the driver's connection, and never takes the write lock. It must still see every
pending migration.
"""

from __future__ import annotations

import logging
import shutil
import sqlite3
from pathlib import Path
from types import SimpleNamespace

import pytest
import sqlalchemy as sa
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from conftest import CHEAP_LOOK, DEMO_REVISIONS, Project, traced_connect

import alembic_sqlite_lock
from alembic_sqlite_lock._backends import RunOptions
from alembic_sqlite_lock._backends._sqlite._backend import HandedIn
from alembic_sqlite_lock._env import _OnlineRun
from alembic_sqlite_lock._retry import RetryPolicy


def traced_upgrade(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> tuple[list[str], list[str]]:
    statements: list[tuple[int, str]] = []
    with monkeypatch.context() as patch:
        patch.setattr(sqlite3.dbapi2, "connect", traced_connect(statements))
        applied = alembic_sqlite_lock.upgrade(project.ini)
    return applied, [sql for _key, sql in statements]


def test_at_head_the_look_is_one_select_and_takes_no_write_lock(
    project: Project, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    assert project.alembic("upgrade", "head").returncode == 0
    caplog.set_level(logging.INFO, logger="alembic_sqlite_lock")

    applied, statements = traced_upgrade(project, monkeypatch)

    assert applied == []
    assert statements.count(CHEAP_LOOK) == 1
    assert not [sql for sql in statements if "table_info" in sql or "sqlite_master" in sql]
    assert not [sql for sql in statements if sql.startswith("BEGIN IMMEDIATE")]
    assert "Database already at 0008, nothing to do" in caplog.text


def test_the_cheap_look_still_sees_a_new_revision(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert project.alembic("upgrade", "head").returncode == 0
    project.add_revision("0009", "0008", "op.create_table('extra', sa.Column('id', sa.Integer))")

    applied, statements = traced_upgrade(project, monkeypatch)

    assert applied == ["0009"]
    assert project.version() == ["0009"]
    assert "extra" in project.tables()
    assert statements.count(CHEAP_LOOK) == 1  # the look; the locked run reads via Alembic
    assert [sql for sql in statements if sql.startswith("BEGIN IMMEDIATE")] != []


def test_a_new_database_falls_back_to_alembics_read(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No version table yet: the SELECT fails, Alembic's read says "base", the run
    migrates everything."""
    applied, _statements = traced_upgrade(project, monkeypatch)

    assert applied[-1] == "0008"
    assert project.version() == ["0008"]


def test_a_version_table_in_an_attached_database_is_not_mistaken_for_mains(
    project: Project, tmp_path: Path
) -> None:
    """An unqualified name would find the attached database's table; Alembic's read
    (has_table on main) would not, and neither does the look: main gets migrated."""
    assert project.alembic("upgrade", "head").returncode == 0
    other = tmp_path / "other.db"
    shutil.move(project.db, other)  # a database at head to attach; main is new
    engine = sa.create_engine(f"sqlite:///{project.db}")
    with engine.connect() as connection:
        connection.exec_driver_sql(f"ATTACH DATABASE '{other}' AS other")
        connection.commit()
        config = Config(project.ini)
        config.attributes["connection"] = connection
        applied = alembic_sqlite_lock.upgrade(config)
    engine.dispose()
    assert applied == DEMO_REVISIONS
    assert project.version() == ["0008"]


def test_a_busy_database_is_waited_for_once_in_the_look(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While another connection holds SQLite's EXCLUSIVE lock, the cheap read fails as
    busy: the look ends there, without waiting a second time in Alembic's read, and the
    locked pass times out as it should (it never got the lock, so it read nothing)."""
    assert project.alembic("upgrade", "0007").returncode == 0
    alembic_reads: list[object] = []
    real_read = MigrationContext.get_current_heads

    def counted_read(self: MigrationContext) -> tuple[str, ...]:
        alembic_reads.append(self)
        return real_read(self)

    monkeypatch.setattr(MigrationContext, "get_current_heads", counted_read)
    holder = sqlite3.connect(project.db, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        with pytest.raises(alembic_sqlite_lock.LockTimeout):
            alembic_sqlite_lock.upgrade(project.ini, busy_timeout_s=0.2, deadline_s=0.5,
                                        max_attempts=2)
    finally:
        holder.close()
    assert alembic_reads == []
    assert project.version() == ["0007"]


def test_the_warm_up_leaves_a_handed_in_connection_without_a_transaction(
    project: Project,
) -> None:
    """The waiter's warm-up fails while the version table does not exist yet; on a
    handed-in connection (the run's own) it must leave no transaction behind, or the
    run's BEGIN IMMEDIATE would fail."""
    engine = sa.create_engine(f"sqlite:///{project.db}")
    with engine.connect() as connection:
        source = HandedIn(connection, RetryPolicy())
        run = SimpleNamespace(options=RunOptions(
            policy=RetryPolicy(), lock_key=None, lock_scope="session",
            version_table="alembic_version", version_table_schema=None,
        ))
        _OnlineRun._warm_up(run, source)  # type: ignore[arg-type]
        assert not connection.in_transaction()
        locked = source.try_lock(1.0)
        assert locked.in_transaction()
        locked.rollback()
        source.release(locked)
        source.close()
    engine.dispose()
