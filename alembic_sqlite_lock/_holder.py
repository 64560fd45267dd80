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
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

SUFFIX = ".migration-holder"


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
    def from_dict(cls, data: dict[str, Any]) -> Holder:
        start = data.get("process_start")
        return cls(
            host=str(data["host"]),
            pid=int(data["pid"]),
            process_start=int(start) if start is not None else None,
            since=float(data["since"]),
            from_revisions=[str(r) for r in data.get("from_revisions", [])],
            to_revisions=[str(r) for r in data.get("to_revisions", [])],
            boot_id=data.get("boot_id"),
            pid_namespace=data.get("pid_namespace"),
        )


def this_process(from_revisions: list[str], to_revisions: list[str]) -> Holder:
    here = Identity.here()
    pid = os.getpid()
    return Holder(host=here.host, pid=pid, process_start=process_start(pid),
                  since=time.time(), from_revisions=from_revisions,
                  to_revisions=to_revisions, boot_id=here.boot_id,
                  pid_namespace=here.pid_namespace)


def write(path: str, holder: Holder) -> bool:
    """Write the record atomically (temporary file, then rename); False if it failed."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as out:
            json.dump(holder.as_dict(), out)
        os.replace(tmp, path)
    except OSError as error:
        logger.debug("Could not write the holder record %s: %s", path, error)
        _unlink(tmp)
        return False
    return True


def read(path: str) -> Holder | None:
    """The record, or None when there is none or it cannot be read."""
    try:
        with open(path, encoding="utf-8") as source:
            return Holder.from_dict(json.load(source))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def remove(path: str, holder: Holder) -> None:
    """Remove the record if it is still ``holder``'s."""
    if read(path) == holder:
        _unlink(path)


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


def provably_alive(holder: Holder) -> bool:
    """True only on proof that the recorded process still runs: same host, same boot and
    pid namespace, the pid alive and started when the record says (not a reused pid)."""
    if Identity.here().same_as(holder.identity) is not True or not _pid_alive(holder.pid):
        return False
    started = process_start(holder.pid)
    return started is not None and started == holder.process_start


def describe(holder: Holder, now: float | None = None) -> str:
    """``pid 4711 on web-2, a1b2 -> c3d4, for 1.4 s``."""
    elapsed = max(0.0, (time.time() if now is None else now) - holder.since)
    before = "+".join(holder.from_revisions) or "base"
    after = "+".join(holder.to_revisions) or "base"
    return f"pid {holder.pid} on {holder.host}, {before} -> {after}, for {elapsed:.1f} s"


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
    if pid <= 0:
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


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as error:
        logger.debug("Could not remove %s: %s", path, error)
