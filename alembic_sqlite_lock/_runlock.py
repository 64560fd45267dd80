"""The run lock: an OS lock on a small file beside the database, held for a whole run.

SQLite's write lock (BEGIN IMMEDIATE) is the guarantee for the migration transaction.
This lock comes first and adds two things SQLite cannot give:

* Prompt hand-off. A worker waiting on SQLite's lock sleeps in SQLite's busy handler
  (up to 100 ms between tries), so it keeps sleeping after the lock is free. A worker
  blocked in ``flock()`` is woken by the kernel the moment the holder lets go, and then
  finds SQLite's lock free as well: the holder commits before it releases this lock.
* A lock that outlives a transaction, for runs that must commit in the middle (an
  Alembic ``autocommit_block()``).

The lock file is ``<database>.migration-lock`` and is never deleted (unlinking a lock
file while another process waits on it would let two holders in). It is a different
file from the database on purpose: POSIX drops every fcntl lock a process holds on a
file when *any* descriptor of that file is closed, which would release SQLite's locks.
``flock`` locks belong to one open file description, so they are unaffected by that and
by SQLite's own locking; the kernel releases them when the process dies.

Supported: Linux, macOS and other POSIX systems with ``fcntl.flock``. Elsewhere (Windows)
the run lock is skipped and SQLite's write lock alone serializes runs; waiters then hand
off at the pace of SQLite's busy handler.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Callable

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

SUFFIX = ".migration-lock"

FIRST_NOTICE_S = 5.0
"""A wait for the run lock that lasts this long is reported (``still_waiting``)..."""
NOTICE_EVERY_S = 15.0
"""...and again this often while it lasts."""


def lock_path_for(database_path: str) -> str | None:
    """The lock file for a database file; None for in-memory and temporary databases."""
    if not database_path or fcntl is None:
        return None
    return database_path + SUFFIX


def run_lock_held(lock_path: str | None) -> bool | None:
    """Is a run holding ``lock_path`` now? None when it cannot be told."""
    if lock_path is None or fcntl is None:
        return None
    try:
        fd = os.open(lock_path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return False  # no run ever took it
    except OSError as error:
        if error.errno in (errno.EACCES, errno.EPERM):
            return None
        raise
    try:
        # LOCK_SH: it conflicts with a holder's LOCK_EX just the same, and a worker that
        # tries in this instant is woken by the kernel as soon as the descriptor closes.
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # releases the probe's lock at once, if it got it
    return False


class RunLock:
    """An exclusive ``flock`` on the lock file, taken with a timeout."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._fd: int | None = None

    @property
    def usable(self) -> bool:
        """Whether this lock can really exclude others (POSIX, a file-backed database)."""
        return self.path is not None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(
        self,
        timeout_s: float,
        *,
        shared: bool = False,
        still_waiting: Callable[[], None] | None = None,
    ) -> bool:
        """Take the lock within ``timeout_s``; False if another process kept it.

        ``shared``: many holders at once, none while a run holds it exclusively; waiters
        use it to wait for a run to end and then all look at the result in parallel.
        ``still_waiting`` is called after FIRST_NOTICE_S of blocking, then every
        NOTICE_EVERY_S: a long wait says so, a short one stays quiet.
        """
        assert self._fd is None, "RunLock is not reentrant"
        fd = self._open()
        if fd is None:
            return True  # no usable lock file: SQLite's lock alone serializes the run
        mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        if _try_flock(fd, mode) or _flock_waiting(fd, timeout_s, mode, still_waiting):
            self._fd = fd
            return True
        return False

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the descriptor releases its flock
            # Let the woken waiter run now: on a small machine the kernel would otherwise
            # keep running this process through its teardown first (about 1-2 ms).
            os.sched_yield()

    def _open(self) -> int | None:
        if self.path is None:
            return None
        for flags in (os.O_RDWR | os.O_CREAT, os.O_RDONLY):
            try:
                return os.open(self.path, flags | getattr(os, "O_CLOEXEC", 0), 0o666)
            except OSError as error:
                if error.errno not in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT):
                    raise
        logger.debug("Cannot open %s; relying on SQLite's lock alone", self.path)
        return None


def _try_flock(fd: int, mode: int) -> bool:
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _flock_waiting(
    fd: int, timeout_s: float, mode: int, still_waiting: Callable[[], None] | None = None
) -> bool:
    """Block in the kernel for the lock, giving up after ``timeout_s``.

    ``flock`` has no timeout, so a daemon thread blocks in it while this thread waits
    on an Event. On time-out the thread is abandoned: it takes ownership of ``fd`` and
    closes it (releasing the lock at once) when its ``flock`` finally returns.
    """
    if timeout_s <= 0:
        os.close(fd)
        return False
    got_it = threading.Event()
    guard = threading.Lock()
    abandoned = False

    def wait() -> None:
        fcntl.flock(fd, mode)
        with guard:
            if abandoned:
                os.close(fd)
            else:
                got_it.set()

    threading.Thread(target=wait, name="alembic-sqlite-lock-wait", daemon=True).start()
    started = time.monotonic()
    give_up_at, notice_at = started + timeout_s, started + FIRST_NOTICE_S
    while True:
        now = time.monotonic()
        if now >= give_up_at:
            break
        wake_at = give_up_at if still_waiting is None else min(give_up_at, notice_at)
        if got_it.wait(max(0.0, wake_at - now)):
            return True
        if still_waiting is not None and notice_at <= time.monotonic() < give_up_at:
            still_waiting()
            notice_at += NOTICE_EVERY_S
    with guard:
        if got_it.is_set():
            return True
        abandoned = True
    return False
