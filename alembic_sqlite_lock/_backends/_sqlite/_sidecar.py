"""What the lock holder does beside the database: the holder record and the backup.

The SQLite backend's ``side_files()``. The locked run calls three things (see
``_env._OnlineRun._run_locked``): ``holder_suffix()`` for the waiters' retry lines,
``starting()`` once the lock is held and the steps are known, ``finished()`` just before
the lock is released. A worker waiting for another
worker's run asks ``running_target()`` where that run is going.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

from alembic.runtime.migration import RevisionStep

from ..._held import is_ancestor
from ..._settings import Settings
from . import _backup, _holder
from ._runlock import lock_path_for, run_lock_held

logger = logging.getLogger(__name__)


class Sidecar:
    def __init__(self, settings: Settings, database_path: str | None) -> None:
        """``settings``: the run's, resolved once (backup_dir, backup_keep)."""
        self.database_path = database_path or ""
        self.record_path = _holder.record_path_for(self.database_path)
        self.lock_path = lock_path_for(self.database_path)
        self.backup_dir = _backup.backup_directory(settings.backup_dir, self.database_path)
        self.backup_keep = settings.backup_keep
        self._record: _holder.Holder | None = None
        self._enclosing: _holder.Holder | None = None

    def _no_run_going(self) -> bool:
        """The run lock proves that nobody migrates now: a record is left over then, on
        whichever host it names (a holder removes its record before it lets go)."""
        try:
            return run_lock_held(self.lock_path) is False
        except OSError as error:  # cannot tell: believe the record, as before
            logger.debug("Cannot probe the run lock: %s", error)
            return False

    def holder_alive(self) -> bool:
        """The recorded holder provably runs on this host and holds the run lock now (for
        wait_while_holder_alive: a record, even one that names a live process, is not
        enough to wait past the deadline; see ``_holder.provably_alive``)."""
        if self.record_path is None or self._no_run_going():
            return False
        holder = _holder.read(self.record_path)
        return holder is not None and _holder.provably_alive(holder, self.lock_path)

    def running_target(self) -> list[str] | None:
        """Where the recorded holder's run will leave the version table, if a record of a
        holder that may be alive says so (None: no record, or it cannot tell)."""
        if self.record_path is None:
            return None
        holder = _holder.read(self.record_path)
        if holder is None or not holder.to_revisions or _holder.is_stale(holder):
            return None
        return holder.to_revisions

    def holder_suffix(self) -> str:
        """`` (held by pid 4711 on web-2, a1b2 -> c3d4, for 1.4 s)``, or "" when no record
        may be true: none, a stale one, or one left over while nobody migrates (then the
        lock is busy because of someone else, an app's write transaction say)."""
        if self._no_run_going():
            return ""
        return _holder.suffix(self.record_path)

    def starting(self, heads: Sequence[str], steps: Sequence[Any]) -> None:
        """Inside the lock, before the first step: record who we are, back up if asked
        (and then delete the backups beyond backup_keep)."""
        if not steps:
            return
        before = list(heads)
        after = revisions_after(heads, steps)
        if self.record_path is not None:
            self._enclosing = _enclosing_record(self.record_path)
            record = _holder.this_process(before, after)
            if _holder.write(self.record_path, record):
                self._record = record
        if self.backup_dir is not None and any(isinstance(s, RevisionStep) for s in steps):
            written = _backup.make(self.database_path, self.backup_dir, before, after)
            _backup.prune(self.backup_dir, self.database_path, self.backup_keep, written)

    def finished(self) -> None:
        """Before the lock is released: the record goes (it was only true while held)."""
        record, self._record = self._record, None
        enclosing, self._enclosing = self._enclosing, None
        if record is not None and self.record_path is not None:
            _holder.remove(self.record_path, record)
            if enclosing is not None:  # the block still holds the lock: it is the holder
                _holder.write(self.record_path, enclosing)


def _enclosing_record(record_path: str) -> _holder.Holder | None:
    """The record of a migration_lock() block (of this process) or an `exec` (an
    ancestor) that this run runs inside, to put back when the run ends."""
    holder = _holder.read(record_path)
    if holder is None or _holder.Identity.here().same_as(holder.identity) is not True:
        return None
    return holder if holder.pid == os.getpid() or is_ancestor(holder.pid) else None


def revisions_after(heads: Sequence[str], steps: Sequence[Any]) -> list[str]:
    """The version table's revisions once ``steps`` have run (for display only)."""
    current = list(heads)
    try:
        for step in steps:
            for gone in step.from_revisions_no_deps:
                if gone in current:
                    current.remove(gone)
            for new in step.to_revisions_no_deps:
                if new not in current:
                    current.append(new)
    except AttributeError:  # an unexpected step type: say nothing rather than guess
        logger.debug("Cannot tell the target revisions of %r", steps)
        return []
    return current
