"""The run lock beside the database: held across a run, released after, never leaked.

A held lock that makes a worker time out is a scenario of every backend
(test_backend_contract.py).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from conftest import Project, held_flock

import alembic_sqlite_lock
from alembic_sqlite_lock._backends._sqlite._runlock import SUFFIX, RunLock, lock_path_for


def test_the_run_lock_is_held_for_the_run_and_released_after(project: Project) -> None:
    lock_file = Path(str(project.db) + SUFFIX)
    seen_held: list[bool] = []

    def probe(**_kw: object) -> None:  # on_version_apply: runs inside the run
        probe_fd = os.open(lock_file, os.O_RDWR)
        try:
            fcntl.flock(probe_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            seen_held.append(False)
        except BlockingIOError:
            seen_held.append(True)
        finally:
            os.close(probe_fd)

    project.env_py.write_text(
        "from alembic import context\n"
        "from alembic_sqlite_lock import run_migrations\n"
        "run_migrations(context, None, on_version_apply=context.config.attributes['probe'])\n"
    )
    from alembic.config import Config

    config = Config(str(project.ini))
    config.attributes["probe"] = probe
    alembic_sqlite_lock.upgrade(config)

    assert seen_held == [True] * 8
    with held_flock(lock_file):  # free again: this would block forever otherwise
        pass
    assert lock_file.exists()  # never deleted: unlinking a lock file races its waiters


def test_an_abandoned_waiter_releases_the_lock_when_it_finally_gets_it(tmp_path: Path) -> None:
    path = str(tmp_path / "db.sqlite") + SUFFIX
    holder = RunLock(path)
    assert holder.acquire(timeout_s=1)
    waiter = RunLock(path)
    assert not waiter.acquire(timeout_s=0.2)  # gives up; its thread still waits
    assert not waiter.held
    holder.release()

    # The abandoned thread gets the lock, sees it was abandoned and lets go at once.
    late = RunLock(path)
    assert late.acquire(timeout_s=10)
    late.release()


def test_in_memory_and_temporary_databases_have_no_lock_file() -> None:
    assert lock_path_for("") is None
    assert lock_path_for("/srv/app.db") == "/srv/app.db" + SUFFIX
