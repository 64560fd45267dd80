"""A worker that finds the database at head (issue 6): one plain SELECT, no write lock.

Stock Alembic reads the version with a ``has_table`` reflection and then a SELECT that
SQLAlchemy compiles on first use; the look here reads the same rows with one SELECT on
the driver's connection, and never takes the write lock. It must still see every
pending migration.
"""

from __future__ import annotations

import logging
import sqlite3

import pytest
from conftest import Project, traced_connect

import alembic_sqlite_lock

CHEAP_LOOK = 'SELECT version_num FROM "alembic_version"'


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
