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

The file is opened through ``_sidefile`` (no symlink followed, no FIFO blocked on; created
with the database's owner and mode). A file that is there but cannot be locked (a
symlink, a FIFO or a folder at its name, or one this user may not open) makes an attempt
raise :class:`Unusable`, never pass as held: the caller decides (a run in one transaction
is safe under SQLite's write lock alone; one that commits midway is refused).

Supported: Linux, macOS and other POSIX systems with ``fcntl.flock``. Elsewhere (Windows)
the run lock is skipped and SQLite's write lock alone serializes runs; waiters then hand
off at the pace of SQLite's busy handler.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import threading
import time
from collections.abc import Callable

from ... import _sidefile
from ..._held import handed_down

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


class Unusable(Exception):
    """The lock file cannot be locked at all (internal): ``problem`` completes "The run
    lock file <path> ...", ``fix`` says what to do about it."""

    def __init__(self, path: str, problem: str, fix: str) -> None:
        super().__init__(f"{path} {problem}")
        self.path = path
        self.problem = problem
        self.fix = fix


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
        fd = _sidefile.open_existing(lock_path)  # a FIFO there would block a plain open
    except FileNotFoundError:
        return False  # no run ever took it
    except OSError as error:  # unreadable, or not a regular file: no run can lock it
        logger.debug("Cannot probe the run lock: %s", error)
        return None
    try:
        # LOCK_SH: it conflicts with a holder's LOCK_EX just the same, and a worker that
        # tries in this instant is woken by the kernel as soon as the descriptor closes.
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # releases the probe's lock at once, if it got it
    return False


def run_lock_problem(lock_path: str | None) -> str | None:
    """Why :func:`run_lock_held` cannot tell, when the lock file is to blame: "the run
    lock file <path> is a FIFO", say (None: it can tell, or the system cannot)."""
    if lock_path is None or fcntl is None:
        return None
    try:
        os.close(_sidefile.open_existing(lock_path))
    except FileNotFoundError:
        return None
    except _sidefile.UnsafeSideFile as error:
        return f"the run lock file {lock_path} {error.what}"
    except OSError as error:
        return f"the run lock file {lock_path} cannot be opened ({error.strerror})"
    return None


def inherited(lock_path: str) -> bool:
    """This process runs under ``alembic-sqlite-lock exec``, which holds ``lock_path``
    for it: the descriptor the wrapper handed down is open here, is the file at the path,
    and its flock is held (by the wrapper's lock: LOCK_EX|LOCK_NB on the same open file
    description succeeds; on another one held by anyone else, it fails). The lock then
    lasts while this process lives, even if the wrapper dies: the descriptor is ours."""
    if fcntl is None:
        return False
    for claim in handed_down("sqlite"):
        fd = claim.get("fd")
        if not isinstance(fd, int) or fd < 0:
            continue
        try:
            if not _sidefile.same_file(fd, lock_path):
                continue
            # Someone holds it exclusively (a probe through a description of its own
            # cannot share it), not free: a free file would be locked anew below, and
            # then held until this process exits. Not /proc/locks: in a pid namespace
            # (a container) the line of a wrapper that died is not shown.
            if run_lock_held(lock_path) is not True:
                continue
            # ... and that someone is the description we inherited: on another one
            # this fails.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:  # EBADF: not handed down after all; EWOULDBLOCK: not ours
            logger.debug("The run lock %s handed down as descriptor %d is not held here: "
                         "%s", lock_path, fd, error)
            continue
        return True
    return False


class RunLock:
    """An exclusive ``flock`` on the lock file, taken with a timeout."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._fd: int | None = None

    @property
    def usable(self) -> bool:
        """Whether this database can have a run lock at all (POSIX, a file-backed
        database). Whether its file can really be locked shows when :meth:`acquire` tries."""
        return self.path is not None

    @property
    def held(self) -> bool:
        return self._fd is not None

    @property
    def fd(self) -> int | None:
        """The descriptor holding the lock (to hand down to a command run under it)."""
        return self._fd

    def acquire(
        self,
        timeout_s: float,
        *,
        shared: bool = False,
        still_waiting: Callable[[], None] | None = None,
    ) -> bool:
        """Take the lock within ``timeout_s``: True when held, False if another process
        kept it. Raises :class:`Unusable` (at once, never blocking) when the file cannot
        be locked. Without a lock file (not :attr:`usable`) it returns True, holding
        nothing: SQLite's lock alone serializes such runs.

        ``shared``: many holders at once, none while a run holds it exclusively; waiters
        use it to wait for a run to end and then all look at the result in parallel.
        ``still_waiting`` is called after FIRST_NOTICE_S of blocking, then every
        NOTICE_EVERY_S: a long wait says so, a short one stays quiet.
        """
        assert self._fd is None, "RunLock is not reentrant"
        if self.path is None:
            return True
        mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        give_up_at = time.monotonic() + timeout_s
        while True:
            fd = self._open()
            if not (
                _try_flock(fd, mode)
                or _flock_waiting(fd, give_up_at - time.monotonic(), mode, still_waiting)
            ):
                return False
            # A lock on a file that was unlinked or replaced while we waited excludes
            # nobody who opens the path now: take the one at the path instead. Two
            # system calls, no sleep: the hand-off after a COMMIT stays prompt.
            if _sidefile.same_file(fd, self.path):
                self._fd = fd
                return True
            os.close(fd)
            logger.debug("%s was replaced while this worker waited for it; trying again",
                         self.path)
            if time.monotonic() >= give_up_at:
                return False

    def intact(self) -> bool:
        """The file at the path is still the one this lock holds (see :meth:`acquire`)."""
        return self._fd is not None and self.path is not None and _sidefile.same_file(
            self._fd, self.path
        )

    def midway_problem(self, owner: _sidefile.Owner) -> str | None:
        """Why holding this lock would not keep others out across a commit in the middle
        of a run (None: it would). Checking the file at each commit cannot do it: someone
        who may rename files in its folder can swap another one in and back between two
        checks, and a newcomer locks the swapped-in one. So the folder must be one that
        only users trusted with the database change: no write for group or others, or
        the sticky bit (then only an entry's owner may rename it) with a lock file of a
        trusted user. ``owner``: the database's."""
        assert self._fd is not None
        assert self.path is not None
        folder = os.path.dirname(self.path) or "."
        info = os.stat(folder)
        if not owner.trusts(info.st_uid):
            return f"is in {folder}, a folder of uid {info.st_uid}, who cannot write the database"
        if info.st_mode & stat.S_ISVTX:
            file_uid = os.fstat(self._fd).st_uid
            if owner.trusts(file_uid):
                return None
            return (f"belongs to uid {file_uid}, who cannot write the database, and may "
                    f"rename it in the sticky folder {folder}")
        if info.st_mode & 0o022:
            who = "every user" if info.st_mode & 0o002 else f"group {info.st_gid}"
            return (f"is in {folder}, which {who} may write: they could swap the lock file "
                    "between two commits")
        return None

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the descriptor releases its flock
            # Let the woken waiter run now: on a small machine the kernel would otherwise
            # keep running this process through its teardown first (about 1-2 ms).
            os.sched_yield()

    def unlock(self) -> None:
        """Release the lock for every copy of the descriptor, then close ours: a command
        run under ``exec`` inherits it, and may leave a process behind that keeps it."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        self.release()

    def _open(self) -> int:
        """A descriptor of the lock file, created (the database's owner and mode) when
        missing, read-only when this user may not write it: flock needs only a read
        descriptor. Raises :class:`Unusable`."""
        path = self.path
        assert path is not None
        try:
            try:
                return _sidefile.open_existing(path, os.O_RDWR)  # the usual case: one call
            except FileNotFoundError:
                database = path[: -len(SUFFIX)] if path.endswith(SUFFIX) else path
                fd, created = _sidefile.open_or_create(path, _sidefile.Owner.of(database))
                if created:
                    logger.debug("Created the run lock file %s", path)
                return fd
        except _sidefile.UnsafeSideFile as error:
            raise _unsafe(path, error) from error
        except OSError as error:
            if error.errno not in _TRY_READ_ONLY:
                raise _unopenable(path, error) from error
            refused = error
        try:
            return _sidefile.open_existing(path, os.O_RDONLY)
        except _sidefile.UnsafeSideFile as error:  # a folder: O_RDWR said EISDIR
            raise _unsafe(path, error) from error
        except FileNotFoundError as error:
            raise _uncreatable(path, refused) from error
        except OSError as error:
            raise _unopenable(path, error) from error


_TRY_READ_ONLY = (errno.EACCES, errno.EPERM, errno.EROFS, errno.EISDIR, errno.ETXTBSY)
"""Errors of a read-write open after which a read-only one may still work."""


def _user() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.geteuid()).pw_name
    except (ImportError, KeyError):  # pragma: no cover - not POSIX, or no passwd entry
        return f"uid {os.geteuid()}"


def _like_the_database(path: str) -> str:
    """The shell command that gives ``path`` the database's owner and mode."""
    database = path[: -len(SUFFIX)] if path.endswith(SUFFIX) else path
    return f"chown --reference={database} {path} && chmod --reference={database} {path}"


def _unsafe(path: str, error: _sidefile.UnsafeSideFile) -> Unusable:
    fix = (
        "The library only ever creates a regular file there, so someone or something "
        f"else put this in its place: look at it (`ls -l {path}`), remove it while no "
        f"migration runs (`rm {path}`; the next run creates the lock file again, with the "
        "database's owner and mode), and check who else may write to "
        f"{os.path.dirname(path) or '.'}."
    )
    return Unusable(path, error.what, fix)


def _uncreatable(path: str, error: OSError) -> Unusable:
    folder = os.path.dirname(path) or "."
    problem = (f"does not exist and user {_user()} cannot create it in {folder} "
               f"({error.strerror})")
    fix = (
        f"Create it once as a user who may, with the database's owner and mode (`touch "
        f"{path} && {_like_the_database(path)}`), or let user {_user()} write {folder}."
    )
    return Unusable(path, problem, fix)


def _unopenable(path: str, error: OSError) -> Unusable:
    problem = f"cannot be opened by user {_user()} ({error.strerror}"
    try:
        info = os.lstat(path)
        problem += f"; it belongs to uid {info.st_uid} with mode {info.st_mode & 0o7777:04o}"
    except OSError:
        pass
    fix = (
        f"Give it the database's owner and mode (`{_like_the_database(path)}`), or remove "
        "it while no migration runs (the next run creates it again with the database's "
        "owner and mode)."
    )
    return Unusable(path, problem + ")", fix)


def _try_flock(fd: int, mode: int) -> bool:
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


_waiting_fds: set[int] = set()
"""Descriptors that a waiting thread blocks on (abandoned ones too) until it hands them
over or closes them. A process forked meanwhile (gunicorn --preload, after a master caught
LockTimeout) gets copies that share their open file description: when the parent's thread
then gets the lock and closes its copy, the child's copy would keep the lock held for the
child's lifetime, and no thread in the child would ever close it."""


def _close_waiting_fds_in_child() -> None:
    for fd in list(_waiting_fds):
        with contextlib.suppress(OSError):
            os.close(fd)
    _waiting_fds.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_waiting_fds_in_child)


def _flock_waiting(
    fd: int, timeout_s: float, mode: int, still_waiting: Callable[[], None] | None = None
) -> bool:
    """Block in the kernel for the lock, giving up after ``timeout_s``.

    ``flock`` has no timeout, so a daemon thread blocks in it while this thread waits
    on an Event. On time-out the thread is abandoned: it takes ownership of ``fd`` and
    closes it (releasing the lock at once) when its ``flock`` finally returns.
    Always takes ownership of ``fd``: on False it is closed, or will be.
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
            _waiting_fds.discard(fd)  # first: once closed, the number may be reused
            if abandoned:
                os.close(fd)
            else:
                got_it.set()

    _waiting_fds.add(fd)
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
