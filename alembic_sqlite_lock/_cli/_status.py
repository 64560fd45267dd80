"""``alembic-sqlite-lock status``: where the database is, and who is migrating it now.

Read-only. The revisions are read in run_migrations()'s unlocked pass. Whether a run is
in progress is told by the run lock (an ``flock`` on ``<database>.migration-lock``, see
_runlock.py): a non-blocking attempt on a descriptor of our own, released at once. The
probe never creates the lock file, never waits, and never opens the database file
itself (closing a descriptor of the database would drop SQLite's locks in this process).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from alembic.config import Config
from alembic.script import ScriptDirectory
from alembic.util import CommandError

from .._alembic import upgrade_revs
from .._backends import BackupShown, FilesBeside, HolderShown, database_path, files_beside
from .._errors import LockTimeout
from .._settings import resolve_settings
from .._urls import describe_url
from ._inspect import DatabaseState, read_state

STATUS_READ_WAIT_S = 1.0
"""How long status waits to read a database locked for writing (busy_timeout_s, if lower,
or a --busy_timeout_s flag, wins)."""

LOCKED_FOR_WRITING = (
    "the database is locked for writing right now (a migration or another write "
    "transaction holds it exclusively, or is committing); see Migration below"
)


@dataclass
class StatusReport:
    database: str
    database_path: str
    database_exists: bool
    current: list[str] | None
    """None when the database could not be read (locked for writing right now)."""
    heads: list[str]
    pending: list[str] | None
    """Revisions `upgrade heads` would apply, in order; None when it cannot be told."""
    problem: str | None
    beside: FilesBeside = field(default_factory=FilesBeside)
    """The run lock, the holder record and the backups (a database file's only)."""

    @property
    def migration_running(self) -> bool | None:
        """True/False from the run lock; None when this system cannot tell."""
        return self.beside.migration_running

    @property
    def lock_problem(self) -> str | None:
        """Why migration_running is None, when the run lock file is to blame."""
        return self.beside.lock_problem

    @property
    def holder(self) -> HolderShown | None:
        return self.beside.holder

    @property
    def holder_stale(self) -> bool:
        return self.beside.holder_stale

    @property
    def backup_dir(self) -> str | None:
        return self.beside.backup_dir

    @property
    def backups(self) -> Sequence[BackupShown]:
        return self.beside.backups

    @property
    def up_to_date(self) -> bool:
        return self.pending == []

    def as_dict(self) -> dict[str, Any]:
        holder = None
        if self.holder is not None:
            holder = dict(self.holder.as_dict(), stale=self.holder_stale,
                          held_for_s=round(max(0.0, time.time() - self.holder.since), 3),
                          description=self.holder.describe())
        return {
            "database": self.database,
            "database_path": self.database_path,
            "database_exists": self.database_exists,
            "current": self.current,
            "heads": self.heads,
            "pending": self.pending,
            "up_to_date": self.up_to_date,
            "problem": self.problem,
            "migration_running": self.migration_running,
            "lock_problem": self.lock_problem,
            "holder": holder,
            "backup_dir": self.backup_dir,
            "backups": [
                {"path": b.path, "size_bytes": b.size_bytes, "created": b.created}
                for b in self.backups
            ],
        }


def gather(config: Config, **settings: Any) -> StatusReport:
    # An operator asking "what is going on" wants the answer now: a database locked by
    # a writer is reported as such after a moment, with who migrates it, not waited out.
    resolved = resolve_settings(config, settings)
    if "busy_timeout_s" not in settings:  # a --busy_timeout_s flag wins
        wait_s = min(resolved.policy.busy_timeout_s, STATUS_READ_WAIT_S)
        resolved = dataclasses.replace(
            resolved, policy=dataclasses.replace(resolved.policy, busy_timeout_s=wait_s))
    script = ScriptDirectory.from_config(config)
    heads = list(script.get_heads())
    current: list[str] | None
    pending: list[str] | None
    problem = None
    try:
        state = read_state(config, resolved)
    except LockTimeout:
        url = config.get_main_option("sqlalchemy.url") or ""
        state = DatabaseState(describe_url(url), database_path(url) or "", True, ())
        current, pending, problem = None, None, LOCKED_FOR_WRITING
    else:
        current = list(state.current)
        try:
            steps = upgrade_revs(script, "heads", state.current)
            pending = [str(step.revision.revision) for step in steps]
        except CommandError as error:
            pending, problem = None, str(error)
    return StatusReport(
        database=state.url,
        database_path=state.database_path,
        database_exists=state.exists,
        current=current,
        heads=heads,
        pending=pending,
        problem=problem,
        beside=files_beside(state.url, state.database_path, resolved.backup_dir),
    )


def format_text(report: StatusReport) -> str:
    lines = [f"Database:   {report.database}"]
    if not report.database_exists:
        lines.append(f"            (the file {report.database_path} does not exist yet)")
    if report.current is None:
        lines.append(f"Current:    unknown: {report.problem}")
    else:
        lines.append(f"Current:    {', '.join(report.current) or 'base (no revision)'}")
    label = "Head:" if len(report.heads) == 1 else "Heads:"
    lines.append(f"{label:<12}{', '.join(report.heads) or '(no revisions)'}")
    if report.pending is None:
        lines.append(f"Pending:    unknown: {report.problem}" if report.current is not None
                     else "Pending:    unknown")
    elif report.pending:
        lines.append(f"Pending:    {len(report.pending)}: {', '.join(report.pending)}")
    else:
        lines.append("Pending:    none, up to date")
    lines.append(f"Migration:  {_running_text(report)}")
    if report.backup_dir is None:
        lines.append("Backups:    off (set backup_dir to turn them on)")
    else:
        missing = "" if os.path.isdir(report.backup_dir) else " (no such folder yet)"
        problem = report.beside.backup_folder_problem
        if problem is not None:  # a link, another user's folder: its files are not listed
            missing = f" (not listed: it {problem})"
        lines.append(f"Backups:    {len(report.backups)} in {report.backup_dir}{missing}")
        for backup in report.backups:
            created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(backup.created))
            lines.append(f"  {created}  {backup.size_bytes:>12,d} B  "
                         f"{os.path.basename(backup.path)}")
    return "\n".join(lines)


def _running_text(report: StatusReport) -> str:
    holder = report.holder
    running = report.migration_running
    who = holder.describe() if holder is not None else ""
    since = ""
    if holder is not None:
        since = time.strftime(" (since %Y-%m-%d %H:%M:%S)", time.localtime(holder.since))
    if running is True:
        return f"running: {who}{since}" if holder else "running (holder not recorded yet)"
    if holder is not None:
        kind = "stale" if report.holder_stale else "left over"
        return f"none running ({kind} holder record: {who}{since})"
    if running is None and report.lock_problem is not None:
        return f"cannot tell: {report.lock_problem}"
    if running is None:
        return "cannot tell on this system"
    return "none running"
