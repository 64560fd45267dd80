"""Backups before migrating: ``VACUUM INTO`` a file named after the revisions.

Opt-in with the ``backup_dir`` setting. The worker that holds the lock and is about to
apply migrations copies the database first; a run with nothing to migrate copies
nothing. The copy is made through a second SQLite connection: ``VACUUM INTO`` cannot
run inside the migration transaction, and the second connection sees the committed
database, i.e. the state before this run (SQLite shares file locks between the
connections of one process, so opening and closing it never drops the lock we hold).

A file is ``<database name>.<from>-to-<to>.<UTC time>.bak`` (``app.db.0007-to-0008.
20250101T120000Z.bak``): a complete SQLite database; to restore, stop every worker and
copy it over the database file (see the README).

With ``backup_keep`` > 0 the same worker, still inside the lock, then deletes this
database's oldest backups so that at most ``backup_keep`` remain. Only names that match
that pattern exactly for this database's file name count, so another database's backups
(``app.db.old.0001-to-0002.<time>.bak``) and anything a person put in the folder are
never touched.
"""

from __future__ import annotations

import logging
import os
import re
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass

from ._errors import MigrationLockError

logger = logging.getLogger(__name__)

EXTENSION = ".bak"
STAMP_FORMAT = "%Y%m%dT%H%M%SZ"
_REVISIONS = r"[A-Za-z0-9_]+(?:\+[A-Za-z0-9_]+)*"  # what _revisions() writes


class BackupFailed(MigrationLockError):
    """The opt-in backup could not be written; nothing was migrated."""


@dataclass(frozen=True)
class Backup:
    path: str
    size_bytes: int
    created: float
    """Modification time of the file (seconds since the epoch)."""
    step: str
    """``<from>-to-<to>`` from the name, e.g. ``0007-to-0008``."""


def backup_directory(setting: str, database_path: str) -> str | None:
    """The folder of backups: ``setting`` relative to the database's folder; None if off."""
    if not setting or not database_path:
        return None
    return os.path.join(os.path.dirname(os.path.abspath(database_path)),
                        os.path.expanduser(setting))


def file_name(database_path: str, before: Iterable[str], after: Iterable[str],
              now: float | None = None) -> str:
    stamp = time.strftime(STAMP_FORMAT, time.gmtime(time.time() if now is None else now))
    return (f"{os.path.basename(database_path)}.{_revisions(before)}-to-"
            f"{_revisions(after)}.{stamp}{EXTENSION}")


def _revisions(revisions: Iterable[str]) -> str:
    joined = "+".join(re.sub(r"[^A-Za-z0-9_]", "_", r) for r in revisions)
    return joined or "base"


def make(database_path: str, directory: str, before: Iterable[str],
         after: Iterable[str]) -> str:
    """Copy the committed database into ``directory``; returns the backup's path."""
    try:
        os.makedirs(directory, exist_ok=True)
        base = os.path.join(directory, file_name(database_path, before, after))
        target, n = base, 1
        while os.path.exists(target):  # the same step twice in one second
            n += 1
            target = f"{base[: -len(EXTENSION)]}-{n}{EXTENSION}"
        connection = sqlite3.connect(database_path, isolation_level=None)
        try:
            connection.execute("VACUUM INTO ?", (target,))
        finally:
            connection.close()
    except (OSError, sqlite3.Error) as error:
        msg = (
            f"Could not back up {database_path} into {directory} before migrating: "
            f"{error}. Nothing was migrated. Make the folder writable (or fix "
            "backup_dir), or turn backups off with backup_dir = (empty)."
        )
        raise BackupFailed(msg) from error
    logger.info("Backed up the database to %s", target)
    return target


def name_pattern(database_path: str) -> re.Pattern[str]:
    """The names :func:`make` gives this database's backups, and nothing else.

    The revisions part never holds a dot, so ``app.db.old.0001-to-0002.<time>.bak`` (a
    backup of ``app.db.old``) does not match for ``app.db``. ``-<n>`` is the suffix of a
    second backup of the same step within one second.
    """
    return re.compile(
        re.escape(os.path.basename(database_path))
        + rf"\.(?P<step>{_REVISIONS}-to-{_REVISIONS})\.(?P<stamp>\d{{8}}T\d{{6}}Z)"
        + r"(?:-(?P<n>\d+))?"
        + re.escape(EXTENSION)
    )


def listing(directory: str | None, database_path: str) -> list[Backup]:
    """This database's backups in ``directory``, oldest first (see :func:`name_pattern`).

    Oldest by the UTC time in the name, which survives a copy or a restore from archive
    that resets modification times; the modification time only orders backups made
    within the same second (the name has whole seconds), then the ``-<n>`` suffix.
    """
    if directory is None or not os.path.isdir(directory):
        return []
    pattern = name_pattern(database_path)
    found = []
    for entry in os.scandir(directory):
        match = pattern.fullmatch(entry.name)
        if match is None:
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue  # a folder or a link that looks like a backup is not one of ours
            info = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue  # deleted while we looked
        key = (match["stamp"], info.st_mtime_ns, int(match["n"] or 1), entry.name)
        found.append((key, Backup(entry.path, info.st_size, info.st_mtime, match["step"])))
    return [backup for _, backup in sorted(found, key=lambda pair: pair[0])]


def prune(directory: str, database_path: str, keep: int, written: str) -> list[str]:
    """With ``keep`` > 0, after ``written`` (the backup just made, never deleted): delete
    this database's older backups of the same step, then the oldest so that at most
    ``keep`` remain. ``keep`` 0 deletes nothing. Returns the paths deleted.

    The same step again usually means that the earlier run of it failed and was rolled
    back: the database is still at its "from" revision, and the newer copy holds what
    the older ones do plus the app's writes since. Dropping those first keeps a
    crash-looping deploy from pushing every other step's backup out of the N kept.

    Called inside the lock, after a successful backup, so no other worker of this
    database writes or prunes backups meanwhile. Nothing here fails the migration: the
    backup it needs is written, and an old backup that cannot be deleted (permissions,
    a read-only or sticky folder) only costs disk space, so that is a WARNING.
    """
    if keep <= 0:
        return []
    try:
        backups = listing(directory, database_path)
    except OSError as error:
        logger.warning("Could not list old backups in %s to keep %d: %s",
                       directory, keep, error)
        return []
    just_written = os.path.basename(written)
    step = next((b.step for b in backups if os.path.basename(b.path) == just_written), None)
    older = [b for b in backups if os.path.basename(b.path) != just_written]
    deleted = [path for b in older if b.step == step
               if (path := _delete(b.path, f"backup_keep = {keep}, a newer backup of {step}"))]
    older = [b for b in older if b.step != step]
    deleted += [path for b in older[: max(0, len(older) - (keep - 1))]
                if (path := _delete(b.path, f"backup_keep = {keep}"))]
    return deleted


def _delete(path: str, why: str) -> str | None:
    """Delete one old backup; the path, or None when it could not be deleted."""
    try:
        os.remove(path)
    except FileNotFoundError:
        return None  # someone removed it by hand meanwhile: it is gone, as intended
    except OSError as error:
        logger.warning("Could not delete old backup %s (%s): %s; the migration goes on",
                       path, why, error)
        return None
    logger.info("Deleted old backup %s (%s)", path, why)
    return path
