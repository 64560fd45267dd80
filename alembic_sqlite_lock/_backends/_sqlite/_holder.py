"""The holder record: who holds the migration lock, in ``<database>.migration-holder``.

While it holds the lock, the worker that migrates writes a small JSON record beside the
database (host, pid, the process's start time, since when, from which revisions to
which) and removes it before it releases the lock. Waiters name the holder in their
retry lines and ``alembic-sqlite-lock status`` shows it.

The lock never depends on the record: it is written after the lock is taken, a failure
to write it is only logged, and nobody ever waits for it. A record left behind by a
killed worker is *stale* only on proof that its process is gone: same host (hostname,
boot id and pid namespace all equal) and the pid is dead or now belongs to a process
that started later (pids are reused). A holder on another host or container, or one
that cannot be checked, is never called stale.

The record lies in a folder that other users may write, so it is written, read and
removed through _sidefile.py: written under a random temporary name (``O_EXCL``, never
following a link) with the database file's mode and, when root writes it, owner; read
without following a link or blocking on a FIFO, at most ``MAX_RECORD_BYTES``; removed
only while it still reads back as ours. What is read is not believed unless it belongs
to a user who can write the database anyway (its owner, this process's user, root) and
passes ``Holder.from_dict``'s checks (types, a pid in 1..``PID_MAX``, bounded printable
strings); anything else counts as no record and is logged at DEBUG. Whatever is shown
goes through ``printable()`` as well, so that no control character from a record reaches
a log line or a terminal.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import time
from dataclasses import asdict, dataclass, field
from typing import Any, TypeGuard

from ... import _sidefile

logger = logging.getLogger(__name__)

SUFFIX = ".migration-holder"

MAX_RECORD_BYTES = 64 * 1024
"""A record larger than this is not read (a real one is a few hundred bytes)."""
PID_MAX = 4194304
"""The largest pid Linux can hand out (the maximum of /proc/sys/kernel/pid_max)."""
MAX_TEXT_CHARS = 256
"""The longest host name, boot id, namespace or revision a record may hold."""
MAX_REVISIONS = 1024
"""The most revisions a record may list on either side."""


def record_path_for(database_path: str) -> str | None:
    """``<database>.migration-holder``; None for in-memory and temporary databases."""
    return database_path + SUFFIX if database_path else None


@dataclass(frozen=True)
class Identity:
    """What makes a pid meaningful: the host, its boot, and the pid namespace."""

    host: str
    boot_id: str | None
    pid_namespace: str | None

    @classmethod
    def here(cls) -> Identity:
        return cls(socket.gethostname(), _read("/proc/sys/kernel/random/boot_id"),
                   _readlink("/proc/self/ns/pid"))

    def same_as(self, other: Identity) -> bool | None:
        """True/False when provable, None when this host cannot tell."""
        if self.host != other.host:
            return False
        if None in (self.boot_id, self.pid_namespace, other.boot_id, other.pid_namespace):
            return None
        return self.boot_id == other.boot_id and self.pid_namespace == other.pid_namespace


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    process_start: int | None
    """Start time of the process in clock ticks after boot (/proc/<pid>/stat field 22)."""
    since: float
    """When it took the lock (seconds since the epoch)."""
    from_revisions: list[str] = field(default_factory=list)
    to_revisions: list[str] = field(default_factory=list)
    boot_id: str | None = None
    pid_namespace: str | None = None

    @property
    def identity(self) -> Identity:
        return Identity(self.host, self.boot_id, self.pid_namespace)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> Holder:
        """A record as read from a file; ValueError names the first thing wrong with it
        (so that a forged or damaged record is never half believed)."""
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        pid = data.get("pid")
        if not _is_int(pid) or not 1 <= pid <= PID_MAX:
            raise ValueError(f"pid is not a process id (an integer in 1..{PID_MAX})")
        start = data.get("process_start")
        if start is not None and (not _is_int(start) or not 0 <= start < 2**63):
            raise ValueError("process_start is not a clock tick count")
        since = data.get("since")
        # Within time.localtime()'s range (status prints it as a date); NaN fails too.
        if not isinstance(since, (int, float)) or isinstance(since, bool) \
                or not 0 <= since < 2**35:
            raise ValueError("since is not a time")
        return cls(
            host=_text(data.get("host"), "host"),
            pid=pid,
            process_start=start,
            since=float(since),
            from_revisions=_revisions(data.get("from_revisions", []), "from_revisions"),
            to_revisions=_revisions(data.get("to_revisions", []), "to_revisions"),
            boot_id=_optional_text(data.get("boot_id"), "boot_id"),
            pid_namespace=_optional_text(data.get("pid_namespace"), "pid_namespace"),
        )


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _text(value: object, name: str) -> str:
    """A short string with nothing a terminal or a log reader would act on."""
    if not isinstance(value, str) or not 0 < len(value) <= MAX_TEXT_CHARS:
        raise ValueError(f"{name} is not a string of 1 to {MAX_TEXT_CHARS} characters")
    if not value.isprintable():
        raise ValueError(f"{name} holds control characters: {printable(value)}")
    return value


def _optional_text(value: object, name: str) -> str | None:
    return None if value is None else _text(value, name)


def _revisions(value: object, name: str) -> list[str]:
    if not isinstance(value, list) or len(value) > MAX_REVISIONS:
        raise ValueError(f"{name} is not a list of at most {MAX_REVISIONS} revisions")
    return [_text(revision, name) for revision in value]


def printable(text: str) -> str:
    """``text`` with every character that is not printable (newlines, ANSI escapes, C1
    controls, bidi overrides...) written as a Python escape, ``\\x1b`` say: what a record
    says must not reach a log line or a terminal as anything but plain text."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def this_process(from_revisions: list[str], to_revisions: list[str]) -> Holder:
    here = Identity.here()
    pid = os.getpid()
    return Holder(host=here.host, pid=pid, process_start=process_start(pid),
                  since=time.time(), from_revisions=from_revisions,
                  to_revisions=to_revisions, boot_id=here.boot_id,
                  pid_namespace=here.pid_namespace)


def owner_for(path: str) -> _sidefile.Owner:
    """Whose record ``path`` is: the database file's owner, group and mode."""
    database_path = path[: -len(SUFFIX)] if path.endswith(SUFFIX) else path
    return _sidefile.Owner.of(database_path)


def write(path: str, holder: Holder, owner: _sidefile.Owner | None = None) -> bool:
    """Write the record atomically (a random temporary name, then a rename over ``path``)
    with the database's mode and owner; False if it failed (then nothing is left)."""
    data = json.dumps(holder.as_dict()).encode("utf-8")
    try:
        _sidefile.replace(path, data, owner or owner_for(path))
    except OSError as error:
        logger.debug("Could not write the holder record %s: %s", path, error)
        return False
    return True


def read(path: str, owner: _sidefile.Owner | None = None) -> Holder | None:
    """The record, or None: none there, or none to believe (not a regular file, too
    large, written by an untrusted user, or not a valid record; logged at DEBUG)."""
    data = _sidefile.read_bounded(path, owner or owner_for(path), MAX_RECORD_BYTES)
    if data is None:
        return None
    try:
        return Holder.from_dict(json.loads(data))
    except (ValueError, RecursionError) as error:  # RecursionError: [[[[... nested deep
        logger.debug("Ignoring the holder record %s: %s", path, printable(str(error)))
        return None


def remove(path: str, holder: Holder, owner: _sidefile.Owner | None = None) -> None:
    """Remove the record if it still reads back as ``holder``'s (another worker's record
    written since, after we were judged stale, stays)."""
    if read(path, owner) == holder:
        _sidefile.remove(path)


def is_stale(holder: Holder) -> bool:
    """True only on proof that the recorded process is gone."""
    if Identity.here().same_as(holder.identity) is not True:
        return False
    if not _pid_alive(holder.pid):
        return True
    started = process_start(holder.pid)
    if started is None or holder.process_start is None:
        return False
    return started > holder.process_start  # the pid was reused by a newer process


def provably_alive(holder: Holder, lock_path: str | None) -> bool:
    """True only on proof that the recorded process migrates now: same host, same boot and
    pid namespace, the pid alive and started when the record says (not a reused pid), and
    it holds the run lock ``lock_path`` (``holds_run_lock``).

    wait_while_holder_alive waits past the deadline on this alone, so it must not be
    fooled by a record naming a process that merely lives: pid 1, say, which never exits.
    No pid is refused as such (pid 1 may be the migration itself, a container's
    ``alembic upgrade`` entrypoint); the last check asks the kernel instead whether that
    very process holds the run lock, which only the migrating worker does."""
    if Identity.here().same_as(holder.identity) is not True or not _pid_alive(holder.pid):
        return False
    started = process_start(holder.pid)
    if started is None or started != holder.process_start:
        return False
    return lock_path is not None and holds_run_lock(holder.pid, lock_path)


def holds_run_lock(pid: int, lock_path: str) -> bool:
    """Does process ``pid`` hold the exclusive ``flock`` on ``lock_path``? Told by
    /proc/locks (Linux; False where it is missing or unreadable): a holder's line reads
    ``1: FLOCK  ADVISORY  WRITE <pid> <major>:<minor>:<inode> 0 EOF``, and a waiter's is
    marked ``->``. The inode is compared, not the device: an overlay filesystem (a
    container's) may show one device in stat() and another in /proc/locks."""
    try:
        info = os.stat(lock_path, follow_symlinks=False)
    except OSError:
        return False
    if not stat.S_ISREG(info.st_mode):
        return False
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as locks:
            for line in locks:
                fields = line.split()
                if len(fields) < 6 or fields[1] != "FLOCK" or fields[3] != "WRITE":
                    continue  # a blocked waiter ("->"), a POSIX or OFD lock, a reader
                if fields[4] == str(pid) and fields[5].rpartition(":")[2] == str(info.st_ino):
                    return True
    except OSError:
        return False
    return False


def describe(holder: Holder, now: float | None = None) -> str:
    """``pid 4711 on web-2, a1b2 -> c3d4, for 1.4 s``."""
    elapsed = max(0.0, (time.time() if now is None else now) - holder.since)
    before = "+".join(holder.from_revisions) or "base"
    after = "+".join(holder.to_revisions) or "base"
    # A migration_lock() block records no revisions: it does not know what it runs.
    what = f"{before} -> {after}" if holder.from_revisions or holder.to_revisions else (
        "in a migration_lock() block")
    return printable(f"pid {holder.pid} on {holder.host}, {what}, for {elapsed:.1f} s")


def suffix(path: str | None) -> str:
    """`` (held by ...)`` for a waiter's retry line; "" without a live-looking record."""
    if path is None:
        return ""
    holder = read(path)
    if holder is None or is_stale(holder):
        return ""
    return f" (held by {describe(holder)})"


def process_start(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat: the start time in clock ticks after boot."""
    text = _read(f"/proc/{pid}/stat")
    if text is None:
        return None
    # The command name (field 2) is in parentheses and may hold spaces or ")".
    fields_after_name = text.rpartition(")")[2].split()
    try:
        return int(fields_after_name[19])  # field 22 is the 20th after the name
    except (IndexError, ValueError):
        return None


def _pid_alive(pid: int) -> bool:
    if not 0 < pid <= PID_MAX:
        return True  # not a process id (0 and -1 mean groups to kill): cannot prove
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as source:
            return source.read().strip()
    except OSError:
        return None


def _readlink(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None
