"""The path between a holder's COMMIT and the next worker taking over.

A worker that finds another worker migrating waits for that run on the shared run lock
with a connection already open. When the holder's record says where its run is going
and that leaves work for this worker, it goes straight to the lock after the wait;
otherwise it looks at the version once more with one plain SELECT on that connection:
if the run did its work, it is done without ever taking the write lock; if not, its
first lock attempt uses that same connection. These tests watch every statement the
waiter sends, per connection, while a real holder process migrates.
"""

from __future__ import annotations

import logging
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import CHEAP_LOOK, DEMO_REVISIONS, Project, traced_connect

import alembic_sqlite_lock
from alembic_sqlite_lock._backends._sqlite._backend import OwnEngine
from alembic_sqlite_lock._retry import RetryPolicy

# A holder that takes the lock for real and then waits, inside it, for the test's "go".
HOLDER = textwrap.dedent("""
    import os, sys, time
    from alembic_sqlite_lock._backends._sqlite import _sidecar
    import alembic_sqlite_lock

    ini, target, held, go, record = sys.argv[1:]
    starting = _sidecar.Sidecar.starting
    if record == "no record":  # as when the record cannot be written
        _sidecar._holder.write = lambda path, holder: False

    def hold(self, heads, steps):
        starting(self, heads, steps)
        open(held, "w").close()
        while not os.path.exists(go):
            time.sleep(0.005)

    _sidecar.Sidecar.starting = hold
    alembic_sqlite_lock.upgrade(ini, target)
""")


@contextmanager
def holder_migrating(project: Project, target: str, record: str) -> Iterator[Path]:
    """A holder process inside its locked run to ``target``; touch the yielded path to
    let it finish. Exits the block only after the holder exited cleanly."""
    held, go = project.root / "held", project.root / "go"
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(project.ini), target, str(held), str(go), record],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not held.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the holder never took the lock"
            time.sleep(0.005)
        yield go
        go.touch()
        _out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def upgrade_while_holder_runs(
    project: Project, holder_target: str, monkeypatch: pytest.MonkeyPatch,
    record: str = "record",
) -> tuple[list[str], list[tuple[int, str]]]:
    """This process upgrades to head while the holder migrates to ``holder_target``:
    what it applied and every statement it sent, by connection number."""
    statements: list[tuple[int, str]] = []
    monkeypatch.setattr(sqlite3.dbapi2, "connect", traced_connect(statements))
    applied: list[str] = []
    with holder_migrating(project, holder_target, record) as go:
        waiter = threading.Thread(
            target=lambda: applied.extend(alembic_sqlite_lock.upgrade(project.ini))
        )
        waiter.start()
        # Let the holder finish once this worker is blocked on the run lock.
        deadline = time.monotonic() + 60
        while not any(t.name == "alembic-sqlite-lock-wait" for t in threading.enumerate()):
            assert waiter.is_alive(), "the waiter finished before the holder did"
            assert time.monotonic() < deadline, "the waiter never waited for the run"
            time.sleep(0.005)
        go.touch()
        waiter.join(timeout=60)
    assert not waiter.is_alive()
    return applied, statements


def after_the_wait(statements: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Statements from the look after the wait on: the first plain version SELECT."""
    first = next(i for i, (_key, sql) in enumerate(statements) if sql == CHEAP_LOOK)
    return statements[first:]


def test_a_waiter_the_holder_leaves_work_for_goes_straight_to_the_lock(
    project: Project, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="alembic_sqlite_lock")

    applied, statements = upgrade_while_holder_runs(project, "0004", monkeypatch)

    assert applied == DEMO_REVISIONS[4:]  # 0001-0004 were the holder's
    assert project.version() == ["0008"]
    assert project.count("data_migrations") == 1
    # The record said 0004: no look after the wait, the lock taken on the connection
    # opened while waiting (the first look's was number 1), and Alembic's version read
    # run once ahead, while waiting, on a connection of its own (number 3).
    assert CHEAP_LOOK not in [sql for _key, sql in statements]
    begins = [key for key, sql in statements if sql.startswith("BEGIN IMMEDIATE")]
    assert begins == [2]
    assert {key for key, _sql in statements} == {1, 2, 3}
    # It only reads (the table is not committed yet, so SQLite refuses the SELECT
    # before running it; SQLAlchemy's first-use costs are paid by then, the point).
    warm_up = [sql for key, sql in statements if key == 3]
    assert warm_up[-2:] == ["BEGIN DEFERRED", "ROLLBACK"]
    assert "All migrations already applied by another worker" not in caplog.text


def test_without_a_record_the_waiter_looks_and_locks_on_the_connection_it_waited_with(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    applied, statements = upgrade_while_holder_runs(project, "0004", monkeypatch,
                                                    record="no record")

    assert applied == DEMO_REVISIONS[4:]
    assert project.version() == ["0008"]
    later = after_the_wait(statements)
    spare = later[0][0]
    begins = [key for key, sql in statements if sql.startswith("BEGIN IMMEDIATE")]
    assert begins == [spare], "the first lock attempt did not use the connection it waited with"
    assert {key for key, _sql in statements} == {1, spare}


def test_a_waiter_whose_work_was_done_finishes_without_the_write_lock(
    project: Project, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="alembic_sqlite_lock")

    applied, statements = upgrade_while_holder_runs(project, "head", monkeypatch)

    assert applied == []
    assert project.version() == ["0008"]
    assert project.count("data_migrations") == 1
    assert not [sql for _key, sql in statements if sql.startswith("BEGIN IMMEDIATE")]
    # After the wait: one cheap read that never waits on a lock, and nothing else.
    assert [sql for _key, sql in after_the_wait(statements)] == [CHEAP_LOOK]
    assert [sql for _key, sql in statements].count("PRAGMA busy_timeout = 0") == 1
    assert "All migrations already applied by another worker" in caplog.text


def test_the_look_after_the_wait_answers_none_instead_of_waiting_on_a_lock(
    project: Project,
) -> None:
    assert project.alembic("upgrade", "0002").returncode == 0
    source = OwnEngine({"sqlalchemy.url": f"sqlite:///{project.db}"}, RetryPolicy())
    try:
        assert source.read_versions("alembic_version", None) == ("0002",)
        assert source.read_versions("alembic_version", "main") == ("0002",)
        assert source.read_versions('no "such" table', None) is None
        committing = sqlite3.connect(project.db, isolation_level=None)
        try:
            # EXCLUSIVE is what a committing holder takes; readers get SQLITE_BUSY.
            committing.execute("BEGIN EXCLUSIVE")
            assert source.read_versions("alembic_version", None) is None
        finally:
            committing.close()
        assert source.read_versions("alembic_version", None) == ("0002",)
    finally:
        source.close()
