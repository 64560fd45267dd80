"""The holder record: written while the lock is held, named in waiters' lines and status,
stale only on proof that its process is gone."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Project

import alembic_sqlite_lock
from alembic_sqlite_lock._backends._sqlite import _holder
from alembic_sqlite_lock._backends._sqlite._holder import Holder
from alembic_sqlite_lock._backends._sqlite._runlock import FIRST_NOTICE_S

CLI = str(Path(sys.executable).with_name("alembic-sqlite-lock"))


def record_path(project: Project) -> Path:
    return Path(str(project.db) + _holder.SUFFIX)


# Staleness --------------------------------------------------------------------------

def test_this_process_is_alive_and_not_stale() -> None:
    me = _holder.this_process(["0007"], ["0008"])
    assert me.pid == os.getpid()
    assert me.host == socket.gethostname()
    assert me.process_start is not None
    assert me.process_start > 0
    assert _holder.is_stale(me) is False


def test_a_dead_pid_on_this_host_is_stale() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    dead = dataclasses.replace(_holder.this_process([], ["0001"]), pid=child.pid)
    assert _holder.is_stale(dead) is True


def test_a_reused_pid_is_stale_and_an_older_start_is_not() -> None:
    me = _holder.this_process([], [])
    assert me.process_start is not None
    earlier = dataclasses.replace(me, process_start=me.process_start - 1)
    assert _holder.is_stale(earlier) is True  # this pid now runs a newer process
    later = dataclasses.replace(me, process_start=me.process_start + 1)
    assert _holder.is_stale(later) is False  # impossible record: no proof, not stale


def test_other_hosts_and_uncheckable_records_are_never_stale() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    dead = dataclasses.replace(_holder.this_process([], []), pid=child.pid)
    assert _holder.is_stale(dataclasses.replace(dead, host="web-2")) is False
    assert _holder.is_stale(dataclasses.replace(dead, boot_id=None)) is False
    assert _holder.is_stale(dataclasses.replace(dead, pid_namespace="pid:[1]")) is False
    assert _holder.is_stale(dataclasses.replace(dead, boot_id="another-boot")) is False


def test_record_is_written_atomically_and_removed_only_by_its_owner(tmp_path: Path) -> None:
    path = str(tmp_path / "app.db.migration-holder")
    mine = _holder.this_process(["a1b2"], ["c3d4"])
    assert _holder.write(path, mine)
    assert _holder.read(path) == mine
    assert sorted(os.listdir(tmp_path)) == ["app.db.migration-holder"]  # no tmp file left
    assert json.loads(Path(path).read_text())["to_revisions"] == ["c3d4"]
    other = dataclasses.replace(mine, pid=mine.pid + 1)
    _holder.remove(path, other)
    assert _holder.read(path) == mine
    _holder.remove(path, mine)
    assert not os.path.exists(path)
    Path(path).write_text("{not json")
    assert _holder.read(path) is None


def test_describe_matches_the_issue_format() -> None:
    holder = Holder(host="web-2", pid=4711, process_start=1, since=100.0,
                    from_revisions=["a1b2"], to_revisions=["c3d4"])
    assert _holder.describe(holder, now=101.4) == "pid 4711 on web-2, a1b2 -> c3d4, for 1.4 s"


def test_process_start_parses_names_with_spaces_and_parens(tmp_path: Path) -> None:
    # A process whose name contains ") (" must not shift the fields.
    script = tmp_path / "a) (b"
    script.write_text("import time\ntime.sleep(30)\n")
    exe = tmp_path / "py) x"
    exe.symlink_to(sys.executable)
    child = subprocess.Popen([str(exe), str(script)])
    try:
        start = _holder.process_start(child.pid)
        assert start is not None
        assert start >= (_holder.process_start(os.getpid()) or 0)
    finally:
        child.kill()
        child.wait()


# A real holder, seen by waiters and by status ---------------------------------------

# A large migration in SQLite's default journal mode: once its changes overflow the page
# cache (one page here), SQLite takes the EXCLUSIVE lock before COMMIT and readers wait.
SPILLING = (
    "op.execute('PRAGMA cache_size = 1')\n"
    "op.execute('CREATE TABLE blobs (b BLOB)')\n"
    "op.execute('INSERT INTO blobs SELECT randomblob(1000) FROM (WITH RECURSIVE c(i) AS "
    "(SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < 2000) SELECT i FROM c)')\n"
)


def parked_holder(
    project: Project, tmp_path: Path, first: str = ""
) -> Iterator[subprocess.Popen[str]]:
    """`alembic upgrade head` in another process, parked inside revision 0009 after
    running ``first``."""
    assert project.alembic("upgrade", "head").returncode == 0
    gate, parked = tmp_path / "go", tmp_path / "parked"
    project.add_revision(
        "0009", "0008",
        f"{first}import os, pathlib, time\npathlib.Path({str(parked)!r}).touch()\n"
        f"while not os.path.exists({str(gate)!r}):\n"
        "    time.sleep(0.01)\nop.add_column('users', sa.Column('nickname', sa.Text()))",
    )
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("alembic")), "-c", str(project.ini),
         "upgrade", "head"],
        cwd=project.root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while _holder.read(str(record_path(project))) is None or not parked.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the holder never parked in 0009"
            time.sleep(0.01)
        yield proc
        gate.touch()
        _out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    finally:
        gate.touch()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture
def slow_holder(project: Project, tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """A holder parked inside revision 0009, readers free to read."""
    yield from parked_holder(project, tmp_path)


@pytest.fixture
def exclusive_holder(project: Project, tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """A holder parked inside revision 0009 with the database locked exclusively."""
    yield from parked_holder(project, tmp_path, SPILLING)


def test_waiters_name_the_holder_and_status_shows_it(
    project: Project, slow_holder: subprocess.Popen[str], caplog: pytest.LogCaptureFixture
) -> None:
    record = _holder.read(str(record_path(project)))
    assert record is not None
    assert (record.pid, record.host) == (slow_holder.pid, socket.gethostname())
    assert (record.from_revisions, record.to_revisions) == (["0008"], ["0009"])

    status = subprocess.run([CLI, "status", "--json"], cwd=project.root, capture_output=True,
                            text=True, timeout=60, check=False)
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["migration_running"] is True
    assert report["holder"]["pid"] == slow_holder.pid
    assert report["holder"]["stale"] is False
    assert report["pending"] == ["0009"]
    text = subprocess.run([CLI, "status"], cwd=project.root, capture_output=True,
                          text=True, timeout=60, check=False).stdout
    assert f"Migration:  running: pid {slow_holder.pid} on {socket.gethostname()}, " \
           "0008 -> 0009, for " in text

    caplog.set_level(logging.DEBUG, logger="alembic_sqlite_lock")
    with pytest.raises(alembic_sqlite_lock.LockTimeout) as caught:
        alembic_sqlite_lock.upgrade(project.ini, max_attempts=3, base_delay_s=0.01,
                                    jitter_s=0, busy_timeout_s=0.05)
    retries = [r.getMessage() for r in caplog.records
               if r.getMessage().startswith("Database locked by another worker")]
    assert len(retries) == 2
    for line in retries:
        assert f" (held by pid {slow_holder.pid} on {socket.gethostname()}, 0008 -> 0009, " \
               "for " in line
        assert line.endswith(" s)")
    assert caught.value.holder is not None
    assert caught.value.holder.startswith(f"held by pid {slow_holder.pid} on ")
    assert f"The lock is held by pid {slow_holder.pid}" in str(caught.value)


def test_a_long_wait_says_so_at_info_and_names_the_holder(
    project: Project, slow_holder: subprocess.Popen[str], caplog: pytest.LogCaptureFixture
) -> None:
    """With the default settings the retry lines of the first attempts are DEBUG, and an
    attempt blocks up to busy_timeout_s: a wait that lasts says so at INFO anyway."""
    caplog.set_level(logging.INFO, logger="alembic_sqlite_lock")
    # The margin over FIRST_NOTICE_S is for a slow look on a loaded machine.
    with pytest.raises(alembic_sqlite_lock.LockTimeout):
        alembic_sqlite_lock.upgrade(project.ini, deadline_s=FIRST_NOTICE_S + 8)
    notices = [r for r in caplog.records
               if r.getMessage().startswith("Still waiting for the migration lock on ")]
    assert notices, [r.getMessage() for r in caplog.records]
    for notice in notices:
        assert notice.levelno == logging.INFO
        assert f"(held by pid {slow_holder.pid} on {socket.gethostname()}, 0008 -> 0009, " \
            in notice.getMessage()


def test_read_only_commands_never_queue_for_a_database_locked_exclusively(
    project: Project, exclusive_holder: subprocess.Popen[str]
) -> None:
    """Readers cannot read while a large migration holds SQLite's EXCLUSIVE lock: current
    gives up with its own error (not a migration lock timeout: it never queues for the
    lock), status still says who migrates, and a waiter's look obeys deadline_s."""
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([CLI, *args], cwd=project.root, capture_output=True,
                              text=True, timeout=120, check=False)

    current = run("current", "--busy_timeout_s", "0.2")
    assert current.returncode == 3, current.stdout + current.stderr
    assert f"Could not read the revision of sqlite:///{project.db}" in current.stderr
    assert "alembic-sqlite-lock status" in current.stderr
    assert "migration lock" not in current.stderr
    assert "Traceback" not in current.stderr

    report = json.loads(run("status", "--json").stdout)
    assert report["current"] is None
    assert report["pending"] is None
    assert report["migration_running"] is True
    assert report["holder"]["pid"] == exclusive_holder.pid
    text = run("status").stdout
    assert "Current:    unknown: the database is locked for writing right now" in text
    assert f"Migration:  running: pid {exclusive_holder.pid} on " in text

    upgrade = run("upgrade", "--deadline_s", "1")
    assert upgrade.returncode == 3, upgrade.stdout + upgrade.stderr
    waited = re.search(r"Could not take the migration lock on \S+ after \d+ attempts? over "
                       r"([\d.]+)s", upgrade.stderr)
    assert waited, upgrade.stderr
    assert float(waited.group(1)) < 10  # about the 1 s deadline, not the look's 30 s
    assert "Applying migration" not in upgrade.stderr


def test_the_record_is_gone_after_the_run(project: Project) -> None:
    assert project.alembic("upgrade", "head").returncode == 0
    assert not record_path(project).exists()
    assert sorted(p.name for p in project.root.iterdir() if p.name.startswith("app.db")) == [
        "app.db", "app.db.migration-lock"]


def test_a_stale_record_blocks_nobody_and_is_replaced(project: Project) -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    stale = dataclasses.replace(_holder.this_process([], ["0008"]), pid=child.pid)
    _holder.write(str(record_path(project)), stale)

    status = subprocess.run([CLI, "status", "--json"], cwd=project.root, capture_output=True,
                            text=True, timeout=60, check=False)
    report = json.loads(status.stdout)
    assert report["migration_running"] is False
    assert report["holder"]["stale"] is True
    assert "none running (stale holder record: pid" in subprocess.run(
        [CLI, "status"], cwd=project.root, capture_output=True, text=True, timeout=60,
        check=False).stdout

    assert alembic_sqlite_lock.upgrade(project.ini, deadline_s=5)[-1] == "0008"
    assert not record_path(project).exists()  # replaced by ours, then removed


# wait_while_holder_alive -------------------------------------------------------------

def test_waiting_past_the_deadline_while_the_holder_is_alive(
    project: Project, slow_holder: subprocess.Popen[str], tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A long migration: the waiter keeps waiting past deadline_s while the recorded
    holder provably runs, and goes on as soon as it commits."""
    caplog.set_level(logging.WARNING, logger="alembic_sqlite_lock")
    results: list[object] = []

    def wait() -> None:
        try:
            results.append(alembic_sqlite_lock.upgrade(
                project.ini, deadline_s=0.5, busy_timeout_s=0.2, wait_while_holder_alive=True))
        except Exception as error:  # asserted below
            results.append(error)

    import threading

    waiter = threading.Thread(target=wait)
    waiter.start()
    give_up = time.monotonic() + 60
    # The waiter passes its deadline and says it waits on; it must not time out.
    while not any("holder is alive on this host" in r.getMessage() for r in caplog.records):
        assert results == [], results
        assert time.monotonic() < give_up, "the waiter never passed its deadline"
        time.sleep(0.05)
    time.sleep(0.5)  # a few more attempts past the deadline
    assert results == []  # still waiting
    (tmp_path / "go").touch()  # the slow holder's revision finishes
    waiter.join(timeout=60)
    assert results == [[]]  # the holder did the work; the waiter found it done


def test_waiting_past_the_deadline_still_times_out_without_a_live_holder(
    project: Project,
) -> None:
    """The lock held with no holder record (nothing provable): LockTimeout at the deadline."""
    from conftest import held_flock

    with held_flock(Path(str(project.db) + ".migration-lock")), pytest.raises(
        alembic_sqlite_lock.LockTimeout
    ):
        alembic_sqlite_lock.upgrade(project.ini, deadline_s=0.5, busy_timeout_s=0.2,
                                    wait_while_holder_alive=True)
    assert project.version() == []


@pytest.mark.parametrize("whose", ["another host", "a live process here"])
def test_a_left_over_record_is_not_blamed_while_nobody_migrates(
    project: Project, whose: str
) -> None:
    """A record that outlived its run (no process holds the run lock) while an app's write
    transaction keeps the database busy: the waiter neither names the record's process as
    the holder nor waits on for it past the deadline."""
    assert project.alembic("upgrade", "0007").returncode == 0
    record = _holder.this_process(["0007"], ["0008"])  # this test's own, live process
    if whose == "another host":
        record = dataclasses.replace(record, host="web-2", pid=4711)
    _holder.write(str(record_path(project)), record)
    app = sqlite3.connect(project.db, isolation_level=None)
    app.execute("BEGIN IMMEDIATE")  # an app's write transaction, not a migration
    try:
        result = subprocess.run(
            [CLI, "upgrade", "--deadline_s", "1", "--busy_timeout_s", "0.2",
             "--wait_while_holder_alive", "true"],
            cwd=project.root, capture_output=True, text=True, timeout=120, check=False)
    finally:
        app.rollback()
        app.close()
    assert result.returncode == 3, result.stderr
    assert "Could not take the migration lock" in result.stderr
    assert "held by" not in result.stderr
    assert f"pid {record.pid}" not in result.stderr
    assert project.version() == ["0007"]

