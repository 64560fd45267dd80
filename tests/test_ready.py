"""``migration_lock(target, ready=...)``: warm starts do not queue for the lock.

Real processes on SQLite, PostgreSQL and MariaDB (the ``backend`` fixture of
test_backend_contract.py). Another process holds the migration lock throughout (a
``Holder`` of test_migration_lock.py): a block whose ``ready`` says yes runs anyway,
which it could only do without the lock; one whose ``ready`` says no, cannot tell, or
finds the database behind its Alembic environment's heads waits (seen waiting, or
``LockTimeout`` at a short deadline), and runs once the holder lets go.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from alembic.config import Config
from conftest import DEMO_REVISIONS, Project, make_project
from servers import wait_until
from test_backend_contract import Backend, SQLite, backend
from test_exec import waiting_here
from test_migration_lock import WORKERS, Holder, lock_url, released_together

from alembic_sqlite_lock import (
    ConfigurationError,
    LockTimeout,
    migration_lock,
    migration_lock_async,
)
from alembic_sqlite_lock._lock import BlockLock

__all__ = ["backend"]  # the fixture, shared with the contract tests

PY = sys.executable


def environment(project: Project, kind: str) -> Any:
    """``ready=`` naming the project's Alembic environment, as ``kind`` says."""
    if kind == "Config":
        return Config(str(project.ini))
    if kind == "alembic.ini":
        return str(project.ini)
    if kind == "script folder":
        return str(project.root / "alembic")
    assert kind == "script folder (Path)"
    return project.root / "alembic"


ENVIRONMENTS = ["Config", "alembic.ini", "script folder", "script folder (Path)"]


def at_revision(project: Project, revision: str) -> None:
    done = project.alembic("upgrade", revision)
    assert done.returncode == 0, done.stderr


# A block in a process of its own -----------------------------------------------------------
BLOCK = textwrap.dedent("""\
    import sys
    from alembic_sqlite_lock import migration_lock
    url, ready, asked, entered = sys.argv[1:5]

    def answer():
        open(asked, "w").close()
        if ready == "raises":
            raise RuntimeError("cannot tell")
        return ready == "yes"

    with migration_lock(url, ready=answer if ready in ("yes", "no", "raises") else ready,
                        deadline_s=60):
        open(entered, "w").close()
    """)
"""``migration_lock(url, ready=...)`` whose block writes ``entered``; ``ready`` is a
function answering yes, no, or raising (it writes ``asked`` first), or a path."""


class Block:
    def __init__(self, url: str, ready: str, folder: Path) -> None:
        self.asked, self.entered = folder / "asked", folder / "entered"
        self.proc = subprocess.Popen(
            [PY, "-c", BLOCK, url, ready, str(self.asked), str(self.entered)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)

    def finish(self) -> None:
        _out, err = self.proc.communicate(timeout=60)
        assert self.proc.returncode == 0, err
        assert self.entered.exists()


def assert_waits(backend: Backend, block: Block) -> None:
    """The block is waiting for the lock now, and has not entered."""
    wait_until(lambda: waiting_here(backend, block.proc.pid)
               or block.proc.poll() is not None, "the block to wait for the lock")
    assert block.proc.poll() is None, block.proc.communicate()
    assert not block.entered.exists()


# ready= a function -----------------------------------------------------------------------
def test_ready_yes_runs_the_block_while_another_process_holds_the_lock(
    backend: Backend, tmp_path: Path
) -> None:
    holder = Holder(lock_url(backend), tmp_path / "holder")
    try:
        block = Block(lock_url(backend), "yes", tmp_path)
        block.finish()  # with the lock, it would have waited for the holder
        assert holder.proc.poll() is None  # which holds it still
    finally:
        holder.release()


@pytest.mark.parametrize("answer", ["no", "raises"])
def test_ready_no_or_an_exception_waits_for_the_lock_and_then_runs(
    backend: Backend, tmp_path: Path, answer: str
) -> None:
    holder = Holder(lock_url(backend), tmp_path / "holder")
    try:
        block = Block(lock_url(backend), answer, tmp_path)
        assert_waits(backend, block)
        assert block.asked.exists()  # asked first, without the lock (the holder has it)
    finally:
        holder.release()
    block.finish()


def test_the_answer_is_asked_without_the_lock_and_an_exception_is_logged(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    asked_while_held: list[bool] = []

    def cannot_tell() -> bool:
        asked_while_held.append(not backend.lock_is_free())
        raise RuntimeError("no table yet")

    caplog.set_level(logging.DEBUG, logger="alembic_sqlite_lock")
    with backend.hold_lock(), pytest.raises(LockTimeout), migration_lock(
        lock_url(backend), ready=cannot_tell, deadline_s=0.5
    ):
        pytest.fail("the block ran without the lock")
    assert asked_while_held == [True]
    assert "could not tell" in caplog.text
    assert "no table yet" in caplog.text


# ready= an Alembic environment -------------------------------------------------------------
@pytest.mark.parametrize("kind", ENVIRONMENTS)
def test_a_database_at_the_environments_heads_is_ready(
    backend: Backend, tmp_path: Path, kind: str
) -> None:
    at_revision(backend.project, "head")
    holder = Holder(lock_url(backend), tmp_path / "holder")
    entered = False
    try:
        # A wait for the holder would end in LockTimeout after 0.5 s.
        with migration_lock(lock_url(backend), ready=environment(backend.project, kind),
                            deadline_s=0.5):
            entered = True
        assert holder.proc.poll() is None
    finally:
        holder.release()
    assert entered


@pytest.mark.parametrize(("state", "kind"), [
    ("behind", "Config"),
    ("no version table", "script folder"),
    ("another revision", "alembic.ini"),
])
def test_a_database_not_at_the_heads_takes_the_lock(
    backend: Backend, state: str, kind: str
) -> None:
    project = backend.project
    if state == "behind":
        at_revision(project, DEMO_REVISIONS[-2])
    elif state == "no version table" and isinstance(backend, SQLite):  # a file, no table
        with contextlib.closing(sqlite3.connect(project.db)) as connection:
            connection.execute("CREATE TABLE other (n INTEGER)")
    elif state == "another revision":  # migrated past the heads by code we do not have
        at_revision(project, "head")
        project.add_revision("0009", DEMO_REVISIONS[-1], "pass")
        at_revision(project, "0009")
        (project.versions / "0009_test.py").unlink()
    with backend.hold_lock(), pytest.raises(LockTimeout), migration_lock(
        lock_url(backend), ready=environment(project, kind), deadline_s=0.5
    ):
        pytest.fail("the block ran without the lock")


def test_a_database_behind_waits_and_then_runs(backend: Backend, tmp_path: Path) -> None:
    at_revision(backend.project, DEMO_REVISIONS[-2])
    holder = Holder(lock_url(backend), tmp_path / "holder")
    try:
        block = Block(lock_url(backend), str(backend.project.ini), tmp_path)
        assert_waits(backend, block)
    finally:
        holder.release()
    block.finish()


def test_sqlite_a_missing_database_is_not_ready_and_the_look_does_not_create_it(
    project: Project, tmp_path: Path
) -> None:
    """The look at a database file that does not exist answers no without creating it.
    (The lock path then resolves the database through a connection, as a run does,
    which creates the empty file: the look is checked on its own first.)"""
    url = f"sqlite:///{project.db}"
    look = BlockLock(url, {})
    try:
        assert look.is_ready(str(project.ini)) is False
    finally:
        look.close()
    assert not project.db.exists()

    sqlite = SQLite("sqlite", project, url, transactional_ddl=True, lock_words="")
    with sqlite.hold_lock():
        block = Block(url, str(project.ini), tmp_path)
        assert_waits(sqlite, block)  # not ready: it takes the lock
    block.finish()


@pytest.mark.parametrize("path", ["nope.ini", "nope", "proj"],
                         ids=["no such file", "no such folder", "the project folder"])
def test_ready_a_path_that_is_no_environment_is_a_configuration_error(
    backend: Backend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """A missing path, or a folder that is no script folder (the project's own, which
    holds alembic.ini and alembic/, an easy slip): a wrong ready= is the caller's to
    fix, not a "no" that would quietly make every start queue."""
    assert backend.project.root == tmp_path / "proj"
    at_revision(backend.project, "head")
    monkeypatch.chdir(tmp_path)
    with backend.hold_lock(), pytest.raises(ConfigurationError) as raised, migration_lock(
        lock_url(backend), ready=path, deadline_s=0.5
    ):
        pytest.fail("the block ran")
    assert str(tmp_path / path) in str(raised.value)  # named, made absolute


# Many workers ----------------------------------------------------------------------------------
def _block_after_barrier(url: str, ready: str | None, entered: str, barrier: Any) -> None:
    barrier.wait()
    with migration_lock(url, ready=ready, deadline_s=0.5):
        Path(entered, str(os.getpid())).touch()


def blocks_in_processes(url: str, ready: str | None, entered: Path) -> list[int | None]:
    """WORKERS forked processes enter a block at one instant; their exit codes."""
    entered.mkdir()
    return released_together(_block_after_barrier, url, ready, str(entered))


def test_workers_at_a_ready_database_all_run_while_the_lock_is_held(
    backend: Backend, tmp_path: Path
) -> None:
    at_revision(backend.project, "head")
    holder = Holder(lock_url(backend), tmp_path / "holder")
    try:
        ready = blocks_in_processes(lock_url(backend), str(backend.project.ini),
                                    tmp_path / "ready")
        # Control: without ready=, each waits for the holder and times out.
        control = blocks_in_processes(lock_url(backend), None, tmp_path / "control")
        assert holder.proc.poll() is None
    finally:
        holder.release()
    assert ready == [0] * WORKERS
    assert len(list((tmp_path / "ready").iterdir())) == WORKERS
    assert control == [1] * WORKERS
    assert list((tmp_path / "control").iterdir()) == []


# migration_lock_async ----------------------------------------------------------------------------
async def enter_async(url: str, ready: Callable[[], bool] | str) -> bool:
    async with migration_lock_async(url, ready=ready, deadline_s=0.5):
        return True


def test_the_async_block_asks_a_function_off_the_event_loop(
    backend: Backend, tmp_path: Path
) -> None:
    threads: list[threading.Thread] = []

    def answer(value: bool) -> Callable[[], bool]:
        def ready() -> bool:
            threads.append(threading.current_thread())
            return value
        return ready

    holder = Holder(lock_url(backend), tmp_path / "holder")
    try:
        assert asyncio.run(enter_async(lock_url(backend), answer(True)))  # no wait
        with pytest.raises(LockTimeout):  # it waited for the holder
            asyncio.run(enter_async(lock_url(backend), answer(False)))
    finally:
        holder.release()
    assert len(threads) == 2
    assert threading.main_thread() not in threads  # the loop's thread went on


def test_the_async_block_with_an_alembic_environment(
    backend: Backend, tmp_path: Path
) -> None:
    url, ini = lock_url(backend), str(backend.project.ini)
    at_revision(backend.project, DEMO_REVISIONS[-2])
    holder = Holder(url, tmp_path / "behind")
    try:
        with pytest.raises(LockTimeout):  # behind the heads: it took the lock path
            asyncio.run(enter_async(url, ini))
    finally:
        holder.release()
    at_revision(backend.project, "head")
    holder = Holder(url, tmp_path / "at_head")
    try:
        assert asyncio.run(enter_async(url, ini))  # at the heads: no wait for the holder
    finally:
        holder.release()


def test_the_async_block_awaits_an_async_function(backend: Backend) -> None:
    """``async def ready()``: awaited, so its no is a no (a coroutine object taken for
    an answer would be true, and the block would run without the lock)."""
    def answer(value: bool) -> Callable[[], Coroutine[Any, Any, bool]]:
        async def ready() -> bool:
            await asyncio.sleep(0)
            return value
        return ready

    async def enter(value: bool) -> bool:
        async with migration_lock_async(lock_url(backend), ready=answer(value),
                                        deadline_s=0.5):
            return True

    with backend.hold_lock():
        assert asyncio.run(enter(True))
        with pytest.raises(LockTimeout):
            asyncio.run(enter(False))


def test_a_plain_block_refuses_an_async_function(backend: Backend) -> None:
    async def not_ready() -> bool:
        return False

    with backend.hold_lock(), pytest.raises(ConfigurationError, match="awaitable"), (
        migration_lock(lock_url(backend), ready=not_ready, deadline_s=0.5)
    ):
        pytest.fail("the block ran without the lock")


@pytest.mark.parametrize("which", ["the database file", "env.py"])
def test_ready_a_file_that_is_no_alembic_ini_is_a_configuration_error(
    tmp_path: Path, which: str
) -> None:
    make_project(tmp_path / "proj")
    project = Project(tmp_path / "proj")
    at_revision(project, "head")
    path = project.db if which == "the database file" else project.root / "alembic" / "env.py"
    with pytest.raises(ConfigurationError) as raised, migration_lock(
        f"sqlite:///{project.db}", ready=path, deadline_s=0.5
    ):
        pytest.fail("the block ran")
    assert str(path) in str(raised.value)
