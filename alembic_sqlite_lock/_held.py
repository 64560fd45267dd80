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
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from types import MappingProxyType

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


def held_here(key: Key) -> bool:
    """This flow of control is inside a block that holds the lock ``key`` now."""
    mine = _mine.get().get(key)
    with _guard:
        return mine is not None and _registry.get(key) is mine


def take(
    key: Key,
    lock: Callable[[], Callable[[], None]],
    in_child: Callable[[], None] | None = None,
) -> Held:
    """The lock ``key`` for a block: a nested :class:`Held` when this flow holds it
    already, else ``lock()`` (which takes it, or raises) registered as held."""
    if held_here(key):
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
