"""A bad day: holders killed or hung, an app writing, both journal modes (issue 5, 1-4)."""

from __future__ import annotations

import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from conftest import Project, run_together
from faultkit import (
    ALEMBIC,
    hanging_revision,
    has_open,
    integrity,
    kill,
    markers_of,
    start_cli,
    wait_for,
)

from alembic_sqlite_lock._backends._sqlite._runlock import SUFFIX
from alembic_sqlite_lock._signals import EXIT_CODE, terminate_as_exit


@pytest.fixture
def hanging(project: Project, tmp_path: Path) -> Path:
    """The project at 0008 plus a revision 0009 that does DDL and then hangs."""
    assert project.alembic("upgrade", "head").returncode == 0
    markers = tmp_path / "markers"
    markers.mkdir()
    project.add_revision("0009", "0008", hanging_revision(markers))
    return markers


def test_holder_killed_mid_migration_leaves_the_previous_revision(
    project: Project, hanging: Path
) -> None:
    holder = start_cli(project.ini, "upgrade", "head")
    try:
        wait_for(lambda: markers_of(hanging, "0009"), "the holder to run DDL of 0009")
        # The DDL of the run is in the file's journal: the kill lands mid-transaction.
        assert Path(str(project.db) + "-journal").exists()
        kill(holder)
    finally:
        kill(holder)
        holder.communicate()
    assert holder.returncode == -signal.SIGKILL

    assert project.version() == ["0008"]  # the next opener rolls the hot journal back
    assert "t9" not in project.tables()
    assert integrity(project.db) == "ok"


def test_next_worker_takes_over_at_once_after_a_kill(project: Project, hanging: Path) -> None:
    holder = start_cli(project.ini, "upgrade", "head")
    waiter = None
    try:
        wait_for(lambda: markers_of(hanging, "0009"), "the holder to run DDL of 0009")
        # A busy timeout far above what the hand-off may take: a waiter that sat out a
        # timeout or a lease would show in the time it took.
        waiter = start_cli(project.ini, "-x", "lock_busy_timeout_s=90", "-x",
                           "lock_deadline_s=150", "upgrade", "head")
        lock_file = Path(str(project.db) + SUFFIX)
        wait_for(lambda: has_open(waiter.pid, lock_file), "the waiter to wait for the lock")
        (hanging / "go").touch()  # the waiter will run 0009 straight through
        kill(holder)
        killed_at = time.monotonic()
        out, err = waiter.communicate(timeout=120)
        took = time.monotonic() - killed_at
    finally:
        kill(holder)
        holder.communicate()
        if waiter is not None:
            kill(waiter)
            waiter.communicate()

    assert waiter.returncode == 0, out + err
    assert "Applied migration: 0009" in err
    assert took < 30, f"the waiter needed {took:.1f}s after the holder died"
    assert set(markers_of(hanging, "0009")) == {holder.pid, waiter.pid}
    assert project.version() == ["0009"]
    assert project.count("t9") == 1
    assert integrity(project.db) == "ok"


def test_sigterm_rolls_back_and_exits_non_zero(project: Project, hanging: Path) -> None:
    holder = start_cli(project.ini, "upgrade", "head")
    try:
        wait_for(lambda: markers_of(hanging, "0009"), "the holder to run DDL of 0009")
        holder.send_signal(signal.SIGTERM)
        out, err = holder.communicate(timeout=60)
    finally:
        kill(holder)
    assert holder.returncode == EXIT_CODE
    assert "SIGTERM received during the migration run: rolled back; the database is at 0008" in err
    assert "Traceback" not in out + err
    # Rolled back by the process itself: no hot journal left for the next worker.
    assert not Path(str(project.db) + "-journal").exists()
    assert project.version() == ["0008"]
    assert "t9" not in project.tables()
    assert integrity(project.db) == "ok"


def test_sigterm_handler_is_only_ours_when_nobody_else_has_one() -> None:
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    with terminate_as_exit():
        ours = signal.getsignal(signal.SIGTERM)
        assert callable(ours)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL

    def app_server_handler(_signum: int, _frame: object) -> None:
        pass

    signal.signal(signal.SIGTERM, app_server_handler)
    try:
        with terminate_as_exit():
            assert signal.getsignal(signal.SIGTERM) is app_server_handler
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    seen: list[object] = []

    def in_a_thread() -> None:
        with terminate_as_exit():
            seen.append(signal.getsignal(signal.SIGTERM))

    thread = threading.Thread(target=in_a_thread)
    thread.start()
    thread.join()
    assert seen == [signal.SIG_DFL]


def test_waiters_give_up_at_the_deadline_when_the_holder_hangs(
    project: Project, hanging: Path
) -> None:
    holder = start_cli(project.ini, "upgrade", "head")
    waiters: list[subprocess.Popen[str]] = []
    try:
        wait_for(lambda: markers_of(hanging, "0009"), "the holder to run DDL of 0009")
        waiters = [start_cli(project.ini, "-x", "lock_deadline_s=3", "upgrade", "head")
                   for _ in range(3)]
        results = [w.communicate(timeout=60) for w in waiters]  # none hangs
    finally:
        for proc in [holder, *waiters]:
            kill(proc)
            proc.communicate()

    for waiter, (out, err) in zip(waiters, results, strict=True):
        assert waiter.returncode != 0
        assert "Traceback" not in out + err
        match = re.search(
            r"FAILED: Could not take the migration lock on sqlite:///(\S+) after (\d+) "
            r"attempts? over ([\d.]+)s", out)
        assert match, out
        assert match.group(1) == str(project.db)
        assert int(match.group(2)) >= 1
        # The deadline, counted from the start of the run (its look included).
        assert 2.9 <= float(match.group(3)) <= 4.0
    assert project.version() == ["0008"]


# An application writing to the database during the migration ---------------------------
APP = textwrap.dedent("""
    import pathlib, sqlite3, sys, time
    db, mode, held, done = sys.argv[1:5]
    conn = sqlite3.connect(db, isolation_level=None, timeout=60)
    conn.execute(f"PRAGMA journal_mode = {mode}")
    committed = 0
    # One long write transaction: the migration must wait it out.
    conn.execute("BEGIN IMMEDIATE")
    for i in range(50):
        conn.execute("INSERT INTO app_events (note) VALUES ('long')")
    pathlib.Path(held).touch()
    time.sleep(2)
    conn.execute("COMMIT")
    committed += 50
    # Then short writes and reads on the same open connection until the migration is over.
    while not pathlib.Path(done).exists():
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO app_events (note) VALUES ('short')")
        conn.execute("COMMIT")
        committed += 1
        conn.execute("SELECT count(*) FROM users").fetchone()
        time.sleep(0.005)
    print(committed)
""")


@pytest.mark.parametrize("mode", ["delete", "wal"])
def test_an_app_write_transaction_makes_the_migration_wait_and_loses_nothing(
    project: Project, tmp_path: Path, mode: str
) -> None:
    assert project.alembic("upgrade", "0004").returncode == 0
    conn = sqlite3.connect(project.db)
    conn.execute("CREATE TABLE app_events (id INTEGER PRIMARY KEY, note TEXT)")
    conn.commit()
    conn.close()
    held, done = tmp_path / "held", tmp_path / "done"
    app = subprocess.Popen(
        [sys.executable, "-c", APP, str(project.db), mode, str(held), str(done)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_for(held.exists, "the app to hold its write transaction")
        migration = subprocess.run(
            [ALEMBIC, "-c", str(project.ini), "upgrade", "head"],
            cwd=project.root, capture_output=True, text=True, timeout=120, check=False,
        )
        done.touch()
        out, err = app.communicate(timeout=60)
    finally:
        kill(app)
    assert migration.returncode == 0, migration.stdout + migration.stderr
    assert app.returncode == 0, err
    assert project.version() == ["0008"]
    assert project.count("data_migrations") == 1
    assert project.count("app_events") == int(out) >= 51  # every app write is there
    assert project.query("PRAGMA journal_mode")[0][0] == mode
    assert integrity(project.db) == "ok"


@pytest.mark.parametrize("mode", ["delete", "wal"])
def test_workers_at_once_in_both_journal_modes(project: Project, mode: str) -> None:
    conn = sqlite3.connect(project.db)
    assert conn.execute(f"PRAGMA journal_mode = {mode}").fetchone()[0] == mode
    conn.close()

    results = run_together(
        [["alembic", "-c", str(project.ini), "upgrade", "head"]] * 4, cwd=project.root
    )

    assert [r.returncode for r in results] == [0] * 4, [r.stderr for r in results]
    applying = sum(r.stderr.count("Applying migration: ") for r in results)
    assert applying == 8
    assert project.version() == ["0008"]
    assert project.count("data_migrations") == 1
    assert project.query("PRAGMA journal_mode")[0][0] == mode
    assert integrity(project.db) == "ok"
