"""A run that fails leaves nothing behind; a schema change keeps the data it must keep.

Every pending revision and the version row go into one transaction: a failure anywhere
rolls back the whole run, and a rerun after the fix starts from a clean state.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.config import Config
from conftest import DEMO_REVISIONS, Project

import alembic_sqlite_lock
from alembic_sqlite_lock import MigrationError
from alembic_sqlite_lock._backends._sqlite._backend import READ_ONLY_OPTION

# 0009 does real work (a table, a row) before it fails: a rollback must undo both.
AUDIT_LOG = """\
op.create_table(
    "audit_log",
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("note", sa.String(50), nullable=False),
)
op.execute("INSERT INTO audit_log (note) VALUES ('written by 0009')")
"""
BROKEN = 'raise RuntimeError("0009 broke on purpose")\n'


def output(result: subprocess.CompletedProcess[str]) -> str:
    """Both streams: Alembic prints "FAILED: ..." to stdout, the logs go to stderr."""
    return result.stdout + result.stderr


@pytest.fixture
def migrated(project: Project) -> Project:
    assert alembic_sqlite_lock.upgrade(project.ini) == DEMO_REVISIONS
    return project


def fix_revision(project: Project, rev: str, down: str, upgrade: str) -> None:
    project.add_revision(rev, down, upgrade)
    # A rewrite within the same second could otherwise be served from the stale .pyc.
    shutil.rmtree(project.versions / "__pycache__", ignore_errors=True)


# A revision that raises -------------------------------------------------------------


def test_failing_revision_from_the_cli_rolls_back_and_reports(migrated: Project) -> None:
    migrated.add_revision("0009", "0008", AUDIT_LOG + BROKEN)

    result = migrated.alembic("upgrade", "head")

    assert result.returncode != 0
    assert "FAILED: Migration 0009" in result.stdout, output(result)
    assert "0009 broke on purpose" in result.stdout
    assert "rolled back" in result.stdout
    assert "still at 0008" in result.stdout
    assert "Traceback" not in output(result)
    assert migrated.version() == ["0008"]
    assert "audit_log" not in migrated.tables()


def test_failing_revision_in_process_raises_then_the_fixed_one_applies(
    migrated: Project,
) -> None:
    migrated.add_revision("0009", "0008", AUDIT_LOG + BROKEN)

    with pytest.raises(MigrationError) as caught:
        alembic_sqlite_lock.upgrade(migrated.ini)

    assert caught.value.revision == "0009"
    cause = caught.value.__cause__
    assert isinstance(cause, RuntimeError)
    assert str(cause) == "0009 broke on purpose"
    assert migrated.version() == ["0008"]
    assert "audit_log" not in migrated.tables()

    fix_revision(migrated, "0009", "0008", AUDIT_LOG)
    assert alembic_sqlite_lock.upgrade(migrated.ini) == ["0009"]
    assert migrated.version() == ["0009"]
    assert migrated.count("audit_log") == 1


# PRAGMA foreign_key_check before COMMIT ------------------------------------------------


def test_row_breaking_a_foreign_key_fails_the_run(migrated: Project) -> None:
    # foreign_keys is OFF during the run, so the INSERT itself succeeds; the check
    # before COMMIT must catch the orphan.
    migrated.add_revision("0009", "0008", """\
op.execute("INSERT INTO posts (author_id, title, body) VALUES (999, 'orphan', '')")
""")

    result = migrated.alembic("upgrade", "head")

    assert result.returncode != 0
    assert "FAILED:" in result.stdout, output(result)
    assert "foreign key" in result.stdout
    assert "rolled back" in result.stdout
    assert "Traceback" not in output(result)
    assert migrated.version() == ["0008"]
    assert migrated.count("posts") == 0


# Batch rebuild of a parent table ------------------------------------------------------

AUTHORS_AND_BOOKS = """\
op.create_table(
    "authors",
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(50), nullable=False),
)
op.create_table(
    "books",
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("author_id", sa.Integer,
              sa.ForeignKey("authors.id", ondelete="CASCADE"), nullable=False),
)
op.execute("INSERT INTO authors (id, name) VALUES (1, 'ada'), (2, 'grace')")
op.execute("INSERT INTO books (author_id) VALUES (1), (1), (2)")
"""

# recreate="always": copy authors into a new table, DROP the old one, RENAME. With
# foreign keys ON, the DROP deletes every author first and cascades to every book.
REBUILD_AUTHORS = """\
with op.batch_alter_table("authors", recreate="always") as batch:
    batch.add_column(sa.Column("bio", sa.Text))
"""


def with_authors_and_books(project: Project) -> None:
    project.add_revision("0009", "0008", AUTHORS_AND_BOOKS)
    assert alembic_sqlite_lock.upgrade(project.ini) == ["0009"]
    assert project.count("books") == 3
    project.add_revision("0010", "0009", REBUILD_AUTHORS)


def assert_books_survived(project: Project) -> None:
    assert project.version() == ["0010"]
    assert "bio" in {row[1] for row in project.query("PRAGMA table_info(authors)")}
    assert project.count("authors") == 2
    assert project.count("books") == 3
    assert project.query("PRAGMA foreign_key_check") == []
    (fk,) = project.query("PRAGMA foreign_key_list(books)")
    assert (fk[2], fk[6]) == ("authors", "CASCADE")  # the constraint is still there


def test_batch_rebuild_of_a_parent_keeps_its_children(migrated: Project) -> None:
    with_authors_and_books(migrated)

    result = migrated.alembic("upgrade", "head")

    assert result.returncode == 0, output(result)
    assert_books_survived(migrated)


@pytest.fixture
def engine_with_foreign_keys(project: Project) -> Iterator[sa.Engine]:
    """An app engine that turns foreign keys ON for every connection, as apps do."""
    engine = sa.create_engine(f"sqlite:///{project.db}")

    @sa.event.listens_for(engine, "connect")
    def _foreign_keys_on(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.execute("PRAGMA foreign_keys = ON")

    yield engine
    engine.dispose()


def test_batch_rebuild_through_a_handed_in_connection_with_foreign_keys_on(
    migrated: Project, engine_with_foreign_keys: sa.Engine
) -> None:
    with_authors_and_books(migrated)
    config = Config(str(migrated.ini))

    with engine_with_foreign_keys.connect() as connection:
        config.attributes["connection"] = connection
        assert alembic_sqlite_lock.upgrade(config) == ["0010"]

    assert_books_survived(migrated)


# A rollback that fails too -----------------------------------------------------------


def test_a_failed_rollback_is_logged_critical_and_raises_rollback_failed(
    migrated: Project, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A mock only to force the rare path: the rollback itself raises."""
    migrated.add_revision("0009", "0008", AUDIT_LOG + BROKEN)

    real_rollback = sa.engine.Connection.rollback

    def broken_rollback(self: sa.engine.Connection) -> None:
        if self.get_execution_options().get(READ_ONLY_OPTION):
            return real_rollback(self)  # the unlocked look at the version may roll back
        raise sa.exc.OperationalError("ROLLBACK", {}, Exception("disk I/O error"))

    monkeypatch.setattr(sa.engine.Connection, "rollback", broken_rollback)

    with pytest.raises(alembic_sqlite_lock.RollbackFailed) as caught:
        alembic_sqlite_lock.upgrade(migrated.ini)

    assert isinstance(caught.value, MigrationError)
    assert "rolling it back failed too" in str(caught.value)
    assert "integrity_check" in str(caught.value)
    critical = [r for r in caught_records(caplog) if r.levelname == "CRITICAL"]
    assert len(critical) == 1
    assert "rollback failed" in critical[0].getMessage()
    # Closing the connection still ended the transaction inside SQLite: nothing of 0009.
    assert migrated.version() == ["0008"]
    assert "audit_log" not in migrated.tables()


def caught_records(caplog: pytest.LogCaptureFixture) -> list[Any]:
    return [r for r in caplog.records if r.name.startswith("alembic_sqlite_lock")]
