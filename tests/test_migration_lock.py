"""``migration_lock()``: the run's lock around code that migrates on its own.

Real processes on SQLite, PostgreSQL and MariaDB (the ``backend`` fixture of
test_backend_contract.py): blocks exclude each other and runs both ways, a block inside
which the same flow runs ``upgrade()`` does not wait for itself, and the lock goes with
an exception or a killed process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import DEMO_REVISIONS, Project, make_project
from servers import ServerProject, alembic_popen, wait_until
from sqlalchemy.pool import NullPool
from test_backend_contract import Backend, SQLite, backend

import alembic_sqlite_lock
from alembic_sqlite_lock import LockTimeout, migration_lock, migration_lock_async

__all__ = ["backend"]  # the fixture, shared with the contract tests

WORKERS = 8
WINDOW_S = 0.3
"""The setup's gap between "is the table empty?" and the INSERT: wide, so that without
the lock several workers see it empty."""


def lock_url(backend: Backend) -> str:
    """The URL a block is given: the database's, as the project's runs use it."""
    if isinstance(backend, SQLite):
        return f"sqlite:///{backend.project.db}"
    assert isinstance(backend.project, ServerProject)
    return backend.project.url


def app_url(backend: Backend) -> str:
    """The URL the app's own engine uses (its own driver, not the library's)."""
    if isinstance(backend, SQLite):
        return f"sqlite:///{backend.project.db}"
    assert isinstance(backend.project, ServerProject)
    return backend.project.engine().url.render_as_string(hide_password=False)


def seed_once(url: str) -> None:
    """A framework's non-idempotent start-up: create the table if missing, and insert
    the first row only if the table is empty, on the app's own connections."""
    engine = sa.create_engine(url, poolclass=NullPool)
    try:
        with engine.begin() as connection:
            connection.exec_driver_sql("CREATE TABLE IF NOT EXISTS seeded (n INTEGER)")
        with engine.connect() as connection:
            empty = connection.exec_driver_sql("SELECT count(*) FROM seeded").scalar() == 0
        time.sleep(WINDOW_S)
        if empty:
            with engine.begin() as connection:
                connection.exec_driver_sql("INSERT INTO seeded VALUES (1)")
    finally:
        engine.dispose()


def _seed_after_barrier(lock: str | None, url: str, barrier: object) -> None:
    barrier.wait()  # type: ignore[attr-defined]
    if lock is None:
        seed_once(url)
        return
    with migration_lock(lock, deadline_s=60):
        seed_once(url)


def seed_in_processes(lock: str | None, url: str) -> list[int | None]:
    """WORKERS forked processes run the setup at one instant; their exit codes."""
    return released_together(_seed_after_barrier, lock, url)


def released_together(target: Callable[..., None], *args: object) -> list[int | None]:
    """WORKERS forked processes each run ``target(*args, barrier)``, which waits at the
    barrier first so that they start at one instant; their exit codes."""
    fork = multiprocessing.get_context("fork")
    barrier = fork.Barrier(WORKERS, timeout=60)
    procs = [fork.Process(target=target, args=(*args, barrier)) for _ in range(WORKERS)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
        if proc.is_alive():
            proc.kill()
            proc.join()
    return [proc.exitcode for proc in procs]


def rows(url: str) -> int:
    engine = sa.create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            return int(connection.exec_driver_sql("SELECT count(*) FROM seeded").scalar_one())
    finally:
        engine.dispose()


def test_a_setup_in_blocks_of_workers_released_together_runs_once(backend: Backend) -> None:
    url = app_url(backend)
    codes = seed_in_processes(lock_url(backend), url)
    assert codes == [0] * WORKERS
    assert rows(url) == 1


def test_control_the_same_setup_without_the_lock_goes_wrong(backend: Backend) -> None:
    url = app_url(backend)
    codes = seed_in_processes(None, url)
    # Several workers see the table empty and insert (or some fail on the race).
    assert any(code != 0 for code in codes) or rows(url) > 1, codes


# A block holder in a process of its own ----------------------------------------------
HOLDER = textwrap.dedent("""\
    import os, sys, time
    from alembic_sqlite_lock import migration_lock
    url, held, release = sys.argv[1:]
    with migration_lock(url, deadline_s=60):
        open(held, "w").close()
        while not os.path.exists(release):
            time.sleep(0.01)
    """)


class Holder:
    """A process inside ``with migration_lock(url):`` until released (or killed)."""

    def __init__(self, url: str, folder: Path) -> None:
        folder.mkdir(exist_ok=True)
        self.held = folder / "held"
        self.release_file = folder / "release"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, url, str(self.held), str(self.release_file)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        wait_until(lambda: self.held.exists() or self.proc.poll() is not None,
                   "the holder to enter its block")
        assert self.proc.poll() is None, self.proc.communicate()[1]

    def release(self) -> None:
        self.release_file.touch()
        _out, err = self.proc.communicate(timeout=60)
        assert self.proc.returncode == 0, err

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.communicate(timeout=60)


def waiting_for_lock(backend: Backend, pid: int) -> bool:
    """Process ``pid`` waits for the migration lock now (proof from the OS or server)."""
    if isinstance(backend, SQLite):
        # The waiter has the run lock file open; the holder has it too.
        fds = Path(f"/proc/{pid}/fd")
        with contextlib.suppress(OSError):
            return any(os.readlink(fd) == str(backend.lock_file) for fd in fds.iterdir())
        return False
    assert isinstance(backend.project, ServerProject)
    if backend.name == "postgresql":
        sql = ("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
    else:
        sql = ("SELECT count(*) FROM information_schema.processlist "
               "WHERE info LIKE 'SELECT GET_LOCK%%'")
    return bool(backend.project.query(sql)[0][0])


def test_a_run_waits_for_a_block_and_then_migrates(backend: Backend, tmp_path: Path) -> None:
    holder = Holder(lock_url(backend), tmp_path)
    try:
        run = alembic_popen(backend.project, "upgrade", "head")
        wait_until(lambda: waiting_for_lock(backend, run.pid) or run.poll() is not None,
                   "the run to wait for the block's lock")
        assert run.poll() is None, run.communicate()  # still waiting: the block holds it
        assert backend.project.version() == []
    finally:
        holder.release()
    _out, err = run.communicate(timeout=120)
    assert run.returncode == 0, err
    assert backend.project.version() == [DEMO_REVISIONS[-1]]


def test_a_block_waits_for_another_block(backend: Backend, tmp_path: Path) -> None:
    holder = Holder(lock_url(backend), tmp_path / "a")
    (tmp_path / "b").mkdir()
    try:
        second = subprocess.Popen(
            [sys.executable, "-c", HOLDER, lock_url(backend), str(tmp_path / "b" / "held"),
             str(tmp_path / "b" / "release")], stderr=subprocess.PIPE, text=True)
        wait_until(lambda: waiting_for_lock(backend, second.pid) or second.poll() is not None,
                   "the second block to wait")
        assert not (tmp_path / "b" / "held").exists()
    finally:
        holder.release()
    wait_until((tmp_path / "b" / "held").exists, "the second block to enter")
    (tmp_path / "b" / "release").touch()
    _out, err = second.communicate(timeout=60)
    assert second.returncode == 0, err


# Nesting, exceptions, a killed holder, the deadline ------------------------------------
def test_upgrade_inside_a_block_of_the_same_thread_migrates(backend: Backend) -> None:
    ini = str(backend.project.ini)
    with migration_lock(ini):
        with migration_lock(lock_url(backend)):  # a nested block, by URL this time
            applied = alembic_sqlite_lock.upgrade(ini)
        assert not backend.lock_is_free()  # the outer block still holds it
    assert applied == list(DEMO_REVISIONS)
    assert backend.project.version() == [DEMO_REVISIONS[-1]]
    assert backend.lock_is_free()


def test_another_thread_waits_for_a_block(backend: Backend) -> None:
    """Gunicorn's threads: a block keeps the process's other threads out too."""
    errors: list[BaseException] = []

    def other() -> None:
        try:
            with migration_lock(lock_url(backend), deadline_s=0.5):
                pass
        except BaseException as error:
            errors.append(error)

    with migration_lock(lock_url(backend)):
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
    assert len(errors) == 1, errors
    assert isinstance(errors[0], LockTimeout), errors


def test_an_exception_in_the_block_propagates_and_frees_the_lock(backend: Backend) -> None:
    with pytest.raises(RuntimeError, match="boom"), migration_lock(lock_url(backend)):
        raise RuntimeError("boom")
    assert backend.lock_is_free()
    at_once = subprocess.run(
        [sys.executable, "-c",
         "import sys; from alembic_sqlite_lock import migration_lock\n"
         "with migration_lock(sys.argv[1], max_attempts=1, busy_timeout_s=0): pass",
         lock_url(backend)],
        capture_output=True, text=True, timeout=60, check=False)
    assert at_once.returncode == 0, at_once.stderr


def test_a_killed_holder_frees_the_lock(backend: Backend, tmp_path: Path) -> None:
    holder = Holder(lock_url(backend), tmp_path)
    holder.kill()
    if isinstance(backend, SQLite):  # the kernel lets go with the process
        assert backend.lock_is_free()
    with migration_lock(lock_url(backend), deadline_s=30):
        pass


def test_a_held_lock_gives_lock_timeout_naming_the_url(backend: Backend) -> None:
    url = lock_url(backend)
    if backend.name == "postgresql":  # trust authentication: any password is accepted
        url = url.replace("postgres@", "postgres:s3cret@", 1)
    with backend.hold_lock(), pytest.raises(LockTimeout) as raised, migration_lock(
        url, deadline_s=0.5
    ):
        pytest.fail("the block ran without the lock")
    assert backend.shown_url.split("@")[-1] in str(raised.value)
    assert "s3cret" not in str(raised.value)


# SQLite only ----------------------------------------------------------------------------
def test_the_block_does_not_hold_sqlites_write_lock(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    with migration_lock(f"sqlite:///{db}"):
        other = sqlite3.connect(db, timeout=0, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            other.execute("CREATE TABLE written (n INTEGER)")
            other.execute("INSERT INTO written VALUES (1)")
            other.execute("COMMIT")
        finally:
            other.close()
        record = Path(f"{db}.migration-holder").read_text()
        assert f'"pid": {os.getpid()}' in record
        assert '"to_revisions": []' in record
    assert not Path(f"{db}.migration-holder").exists()


def test_the_async_block_lets_the_event_loop_run_while_it_waits(
    backend: Backend,
) -> None:
    ini = str(backend.project.ini)
    hold = contextlib.ExitStack()
    hold.enter_context(backend.hold_lock())

    async def main() -> tuple[int, list[str]]:
        ticks = 0
        entered = asyncio.Event()

        async def block() -> list[str]:
            async with migration_lock_async(ini, deadline_s=60):
                entered.set()
                return await alembic_sqlite_lock.upgrade_async(ini)  # nested: no wait

        task = asyncio.create_task(block())
        while ticks < 20:  # the loop keeps running while the block waits
            await asyncio.sleep(0.01)
            ticks += 1
        assert not entered.is_set()
        hold.close()
        return ticks, await task

    try:
        ticks, applied = asyncio.run(main())
    finally:
        hold.close()
    assert ticks == 20
    assert applied == list(DEMO_REVISIONS)


def test_an_async_block_cancelled_while_it_waits_leaves_no_lock_behind(
    backend: Backend,
) -> None:
    """The waiting thread cannot be stopped: when it gets the lock after its task was
    cancelled, it lets it go at once instead of keeping it for nobody."""
    hold = contextlib.ExitStack()
    hold.enter_context(backend.hold_lock())

    async def main() -> None:
        entered = asyncio.Event()

        async def block() -> None:
            async with migration_lock_async(lock_url(backend), deadline_s=60):
                entered.set()

        task = asyncio.create_task(block())
        # The waiting thread is this process: wait until the OS or server shows it.
        while not waiting_for_lock(backend, os.getpid()):
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not entered.is_set()
        hold.close()  # now the abandoned thread gets the lock, and must let it go
        # (asyncio.run() waits for the threads of to_thread() when it ends.)

    try:
        asyncio.run(main())
    finally:
        hold.close()
    wait_until(backend.lock_is_free, "the cancelled block's thread to let the lock go")
    with migration_lock(lock_url(backend), deadline_s=10):
        pass


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_a_transaction_scope_block_on_postgresql_excludes_a_run(backend: Backend) -> None:
    """lock_scope = transaction (behind a transaction pooler): the block keeps its
    transaction, and the advisory lock with it, open until it ends."""
    url = lock_url(backend)
    with migration_lock(url, lock_scope="transaction", deadline_s=30):
        run = alembic_popen(backend.project, "-x", "lock_lock_scope=transaction",
                            "upgrade", "head")
        try:
            wait_until(lambda: waiting_for_lock(backend, run.pid) or run.poll() is not None,
                       "the run to wait for the block's transaction-level lock")
            assert run.poll() is None, run.communicate()
            assert backend.project.version() == []
        except BaseException:
            run.kill()
            raise
    _out, err = run.communicate(timeout=120)
    assert run.returncode == 0, err
    assert backend.project.version() == [DEMO_REVISIONS[-1]]


def test_a_run_inside_a_block_puts_the_blocks_holder_record_back(tmp_path: Path) -> None:
    """The nested run records its own migration while it runs; once it ends, the block
    (which still holds the lock) is the holder again, for `status` and the waiters."""
    make_project(tmp_path / "proj")
    project = Project(tmp_path / "proj")
    record = Path(f"{project.db}.migration-holder")
    with migration_lock(str(project.ini)):
        before = json.loads(record.read_text())
        assert alembic_sqlite_lock.upgrade(str(project.ini)) == list(DEMO_REVISIONS)
        after = json.loads(record.read_text())
    assert after == before
    assert before["pid"] == os.getpid()
    assert not record.exists()
