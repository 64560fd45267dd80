"""A holder killed or hung mid-migration on SQLite: the hot journal rolls its run back,
the next worker takes over at once, waiters give up at their deadline.

The same scenarios on the servers are in test_postgresql.py and test_mysql.py; SIGTERM
is in test_sigterm.py.
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path

from conftest import Project
from faultkit import (
    has_open,
    integrity,
    kill,
    markers_of,
    start_cli,
    wait_for,
)

from alembic_sqlite_lock._backends._sqlite._runlock import SUFFIX


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
