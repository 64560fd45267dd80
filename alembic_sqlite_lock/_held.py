"""The migration locks this process holds for ``migration_lock()`` blocks, so that a
run (or another block) inside such a block does not wait for its own lock.

A block's lock is an flock on one open file description (SQLite's run lock), or a
server lock owned by one session (PostgreSQL's advisory lock, MySQL's ``GET_LOCK``): a
run inside the block would take it again through another description or session, and
wait for itself until its deadline. So each backend, where it takes the lock, first asks
:func:`held_here` with the lock's identity (the run lock file's path; the server URL
without its password and the lock's key or name) and, when the answer is yes, goes on
without taking it again.

Who counts as "here" is the *flow of control* that entered the block, not the whole
process: a ``contextvars`` context. A thread has a context of its own, so another
thread of the same process (a second gunicorn thread serving a request) is not inside
the block and waits for the lock like any other worker: the block's setup stays
exclusive. ``asyncio.to_thread`` and tasks started inside the block copy the context,
so ``await upgrade_async(...)`` inside ``async with migration_lock_async(...)`` proceeds.
The context only points at an entry of the process-wide registry below; once the block
ends its entry is gone, so a copy of the context that outlives the block (a task left
running) no longer counts as holding anything.

A command run by ``alembic-sqlite-lock exec`` is another process: it learns what its
wrapper holds from the environment variable :data:`ENV` (JSON: the wrapper's pid and,
per lock, what proves it). The variable is a claim, not a proof: a backend believes it
only after checking the lock really is held for this process (SQLite: the inherited
descriptor of the run lock file holds its flock; a server: the wrapper's session holds
the lock and the wrapper is an ancestor of this process), so a stale or copied variable
never lets a run go on unlocked.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

ENV = "ALEMBIC_SQLITE_LOCK_HELD"
"""What ``exec`` hands to its command: ``{"pid": wrapper, "locks": [{"dialect": ...}]}``."""

Key = tuple[str, ...]
"""A lock's identity: ("sqlite", lock file path) or (dialect, URL without password, key)."""


@dataclass(eq=False)
class Held:
    """One lock held for a block; ``release()`` lets it go (at most once)."""

    key: Key
    release_lock: Callable[[], None] = field(repr=False)
    in_child: Callable[[], None] | None = field(default=None, repr=False)
    """What a process forked while the lock is held does with its copy (close it)."""
    nested: bool = False
    """Taken inside a block that holds it already: holds nothing of its own."""
    for_child: dict[str, Any] | None = field(default=None, repr=False)
    """What a command run under this lock is told, so that it can check the lock is
    held for it (the descriptor it inherits, the server session holding it)."""
    _released: bool = field(default=False, repr=False)

    def release(self) -> None:
        if self._released or self.nested:
            return
        self._released = True
        with _guard:
            if _registry.get(self.key) is self:
                del _registry[self.key]
        self.release_lock()


_guard = threading.Lock()
_registry: dict[Key, Held] = {}
_mine: ContextVar[Mapping[Key, Held]] = ContextVar(
    "alembic_sqlite_lock_held", default=MappingProxyType({})
)


def held_here(key: Key, inherited: Callable[[], bool] | None = None) -> bool:
    """This flow of control is inside a block that holds the lock ``key`` now, or (when
    ``inherited`` checks it) this process runs under an ``exec`` that holds it."""
    mine = _mine.get().get(key)
    with _guard:
        if mine is not None and _registry.get(key) is mine:
            return True
    return inherited is not None and inherited()


def take(
    key: Key,
    lock: Callable[[], Callable[[], None]],
    in_child: Callable[[], None] | None = None,
    inherited: Callable[[], bool] | None = None,
) -> Held:
    """The lock ``key`` for a block: a nested :class:`Held` when this flow holds it
    already, else ``lock()`` (which takes it, or raises) registered as held."""
    if held_here(key, inherited):
        return Held(key, lambda: None, nested=True)
    release = lock()
    held = Held(key, release, in_child)
    with _guard:
        _registry[key] = held  # the lock itself keeps every other holder out
    return held


def enter(held: Held) -> Callable[[], None]:
    """Mark the current context as inside the block; returns what unmarks it (call it
    in the same context)."""
    if held.nested:
        return lambda: None
    token = _mine.set({**_mine.get(), held.key: held})
    return lambda: _mine.reset(token)


def handed_down(dialect: str) -> list[dict[str, Any]]:
    """The locks of ``dialect`` that ``exec`` wrappers say they hold for this process,
    each with its wrapper's ``pid``: claims, for the backend to check."""
    return [lock for lock in _claims() if lock.get("dialect") == dialect]


def _claims() -> list[dict[str, Any]]:
    raw = os.environ.get(ENV)
    if not raw:
        return []
    try:
        claim = json.loads(raw)
        pid = int(claim["pid"])
        return [{"pid": pid, **lock} for lock in claim["locks"] if isinstance(lock, dict)]
    except (ValueError, KeyError, TypeError):  # not ours, or mangled: claims nothing
        return []


def child_environment(helds: Iterable[Held]) -> dict[str, str]:
    """The environment for a command run while holding ``helds``: this process's, with
    :data:`ENV` naming the locks, this process's and those its own wrappers claim for
    it (``exec`` inside ``exec`` on another database: the command runs under both)."""
    environment = dict(os.environ)
    mine = [{"pid": os.getpid(), **held.for_child} for held in helds
            if held.for_child is not None]
    if mine:
        environment[ENV] = json.dumps({"pid": os.getpid(), "locks": [*_claims(), *mine]})
    return environment


def is_ancestor(pid: int) -> bool:
    """``pid`` is this process's parent, or its parent's, and so on (Linux /proc)."""
    current = os.getppid()
    for _ in range(4096):  # a cycle cannot happen; a bound costs nothing
        if current == pid:
            return True
        if current <= 1:
            return False
        try:
            with open(f"/proc/{current}/stat", encoding="ascii", errors="replace") as file:
                # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
                current = int(file.read().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            return False
    return False


def die_with_parent() -> Callable[[], None]:
    """What asks the kernel to SIGKILL the calling process when its parent dies
    (``PR_SET_PDEATHSIG``, Linux; elsewhere nothing). Loaded here, called later: in a
    child between fork and exec, or by a process that relies on a lock its ``exec``
    ancestor holds in a server session."""
    try:
        import ctypes
        import signal

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (ImportError, OSError, AttributeError):  # not Linux
        return lambda: None
    pr_set_pdeathsig = 1
    return lambda: prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)


def bound_to(pid: int) -> bool:
    """For a process that relies on a server lock its ``exec`` ancestor ``pid`` holds:
    die if the process between us dies (the command is killed with the wrapper, and so,
    in turn, are its children that rely on the lock), then check that the chain up to
    ``pid`` is still whole (it may have broken before the request)."""
    if os.getppid() != pid:
        die_with_parent()()
    return is_ancestor(pid)


def _forget_in_child() -> None:
    """A forked child holds no block: its copies of the locks would keep them held
    after the parent lets go (an flock lives as long as any copy of its descriptor)."""
    with contextlib.suppress(Exception):
        for held in list(_registry.values()):
            if held.in_child is not None:
                with contextlib.suppress(OSError):
                    held.in_child()
    _registry.clear()
    global _guard  # noqa: PLW0603 - a lock held by another thread at fork stays held
    _guard = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)
