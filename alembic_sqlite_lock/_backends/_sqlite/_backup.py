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

The folder may be shared with other users (a group-writable volume) and the library
often runs as root, so a backup is written the way _sidefile.py writes every side file:

* The folder is opened once (never through a symlink, never one that belongs to a user
  who cannot write the database: whoever owns it could read every backup and swap one
  for a trojan before the next restore), and everything below goes through that
  descriptor. Created by us, it gets the database's mode plus ``x`` and its owner.
* ``VACUUM INTO`` opens its target itself, by name, following links; so its target is a
  fixed name inside a private folder (0700, random name) that we just made inside the
  backup folder, where nobody else can plant anything.
* The copy gets the database's mode and owner, is fsynced, and only then is hard-linked
  to its final name: ``link`` never follows or replaces anything at the new name (a
  dangling link included), so a taken name moves on to ``-2``, ``-3``... A ``.bak``
  therefore exists only once it is complete; a killed or failed backup leaves at most its
  private folder, which the next backup of this database removes.

With ``backup_keep`` > 0 the same worker, still inside the lock, then deletes this
database's oldest backups so that at most ``backup_keep`` remain. Only names that match
that pattern exactly for this database's file name count, so another database's backups
(``app.db.old.0001-to-0002.<time>.bak``) and anything a person put in the folder are
never touched; nor are links, folders or files of users who cannot write the database.
A name dated in the future is not believed: it counts as the oldest, so two planted
names from the year 2099 cannot push the real backups out.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import secrets
import sqlite3
import stat
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from ..._errors import BackupFailed
from ..._sidefile import (
    Owner,
    UnsafeSideFile,
    open_existing,
    open_folder,
    path_in,
    private_folder,
)

__all__ = ["EXTENSION", "STAMP_FORMAT", "Backup", "BackupFailed", "backup_directory",
           "file_name", "folder_problem", "listing", "make", "name_pattern", "prune"]

logger = logging.getLogger(__name__)

EXTENSION = ".bak"
STAMP_FORMAT = "%Y%m%dT%H%M%SZ"
_REVISIONS = r"[A-Za-z0-9_]+(?:\+[A-Za-z0-9_]+)*"  # what _revisions() writes
_PART = "copy.db"
"""The copy's name inside the private folder, until it is complete."""
CLOCK_SKEW_S = 600.0
"""A name dated more than this ahead of our clock is not believed (see _scan)."""
_SEQUENTIAL_SUFFIXES = 99
_RANDOM_SUFFIXES = 100
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


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


# Writing ------------------------------------------------------------------------------

def make(database_path: str, directory: str, before: Iterable[str],
         after: Iterable[str]) -> str:
    """Copy the committed database into ``directory``; returns the backup's path."""
    try:
        # The owner of the file SQLite has locked, not of whatever is at the path now:
        # the backup and its folder are handed to that owner and its group.
        owner = Owner.of_locked(database_path)
    except UnsafeSideFile as error:
        msg = (
            f"Could not back up {database_path} before migrating: {error}. Nothing was "
            "migrated. Someone who may write its folder replaced the database file during "
            "the run: check who else can write that folder, keep it to the users trusted "
            "with the database, then run again."
        )
        raise BackupFailed(msg, database_path=database_path, backup_dir=directory) from error
    except OSError as error:
        raise _failed(database_path, directory, error) from error
    try:
        dir_fd = _open_directory(directory, owner)
    except UnsafeSideFile as error:
        raise _unsafe_folder(database_path, directory, error, owner) from error
    except OSError as error:
        raise _failed(database_path, directory, error) from error
    try:
        _remove_leftovers(dir_fd, directory, database_path, owner)
        try:
            work = private_folder(dir_fd, _work_prefix(database_path))
        except OSError as error:
            raise _failed(database_path, directory, error) from error
        try:
            name = _write(database_path, directory, dir_fd, work, owner=owner,
                          name=file_name(database_path, before, after))
        except (OSError, sqlite3.Error) as error:
            raise _failed(database_path, directory, error) from error
        finally:
            _remove_work_folder(dir_fd, directory, work)
    finally:
        os.close(dir_fd)
    target = os.path.join(directory, name)
    logger.info("Backed up the database to %s", target)
    return target


def _open_directory(directory: str, owner: Owner) -> int:
    """The backup folder's descriptor; missing folders above it are created like it."""
    missing = []
    parent = os.path.dirname(directory)
    while parent and not os.path.lexists(parent):
        missing.append(parent)
        parent = os.path.dirname(parent)
    for folder in reversed(missing):
        os.close(open_folder(folder, owner, create=True))
    return open_folder(directory, owner, create=True)


def _write(database_path: str, directory: str, dir_fd: int, work: str, *, owner: Owner,
           name: str) -> str:
    """The copy in the private folder ``work``, then linked to ``name`` (or ``-<n>``)."""
    work_fd = os.open(work, _DIR_FLAGS, dir_fd=dir_fd)
    try:
        connection = sqlite3.connect(database_path, isolation_level=None)
        try:
            connection.execute("VACUUM INTO ?", (path_in(work_fd, os.path.join(
                directory, work), _PART),))
        finally:
            connection.close()
        # VACUUM INTO does not fsync; the copy must be whole on disk before it has a name.
        fd = open_existing(_PART, os.O_RDWR, dir_fd=work_fd)
        try:
            owner.adopt(fd, owner.file_mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        name = _link_into_place(work_fd, dir_fd, name)
        os.fsync(dir_fd)
    finally:
        os.close(work_fd)
    return name


def _link_into_place(work_fd: int, dir_fd: int, name: str) -> str:
    """Give the complete copy its name: the first of ``name``, ``-2``, ``-3``... that is
    free. ``link`` fails on anything at the name, a dangling symlink included."""
    for candidate in _candidates(name):
        try:
            os.link(_PART, candidate, src_dir_fd=work_fd, dst_dir_fd=dir_fd,
                    follow_symlinks=False)
        except FileExistsError:
            continue
        except OSError as error:
            if error.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK):
                raise
            # No hard links on this filesystem (some FUSE and network ones): a rename
            # also replaces a link planted meanwhile instead of writing through it.
            try:
                os.lstat(candidate, dir_fd=dir_fd)
            except FileNotFoundError:
                os.rename(_PART, candidate, src_dir_fd=work_fd, dst_dir_fd=dir_fd)
                return candidate
            continue
        return candidate
    raise FileExistsError(errno.EEXIST, "every name for this backup is taken", name)


def _candidates(name: str) -> Iterator[str]:
    stem = name[: -len(EXTENSION)]
    yield name
    for n in range(2, _SEQUENTIAL_SUFFIXES + 2):  # the same step twice in one second
        yield f"{stem}-{n}{EXTENSION}"
    for _ in range(_RANDOM_SUFFIXES):  # someone planted them all: a number nobody guessed
        yield f"{stem}-{100 + secrets.randbelow(10**9)}{EXTENSION}"


def _work_prefix(database_path: str) -> str:
    return f"{os.path.basename(database_path)}.backup"


def _remove_leftovers(dir_fd: int, directory: str, database_path: str, owner: Owner) -> None:
    """Private folders of this database's backups that were killed or lost power. We hold
    the lock, so no backup of this database is being written now."""
    pattern = re.compile(re.escape(f".{_work_prefix(database_path)}.") + r"[0-9a-f]{16}\.tmp")
    try:
        names = [n for n in os.listdir(dir_fd) if pattern.fullmatch(n)]
    except OSError as error:
        logger.debug("Could not list %s: %s", directory, error)
        return
    for name in names:
        try:
            info = os.lstat(name, dir_fd=dir_fd)
        except OSError:
            continue
        # Only what a backup leaves: a 0700 folder of a trusted user holding nothing
        # but the copy and SQLite's files beside it. A folder renamed to this pattern by
        # someone else (with files of root's inside) is not ours to empty.
        if (stat.S_ISDIR(info.st_mode) and owner.trusts(info.st_uid)
                and stat.S_IMODE(info.st_mode) == 0o700
                and _only_copy_files(dir_fd, name)):
            logger.info("Removing %s, left by a backup that did not finish",
                        os.path.join(directory, name))
            _remove_work_folder(dir_fd, directory, name)


def _only_copy_files(dir_fd: int, name: str) -> bool:
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError:
        return False
    try:
        return set(os.listdir(fd)) <= {_PART, *(_PART + end for end in _SQLITE_FILES)}
    except OSError:
        return False
    finally:
        os.close(fd)


_SQLITE_FILES = ("-journal", "-wal", "-shm")
"""What SQLite may leave beside the copy while it writes it."""


def _remove_work_folder(dir_fd: int, directory: str, name: str) -> None:
    """Remove a private folder and what SQLite left in it (the copy, a ``-journal``)."""
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
        try:
            for entry in os.listdir(fd):
                os.unlink(entry, dir_fd=fd)
        finally:
            os.close(fd)
        os.rmdir(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except OSError as error:
        logger.warning("Could not remove the temporary folder %s of a backup: %s",
                       os.path.join(directory, name), error)


def _failed(database_path: str, directory: str, error: BaseException) -> BackupFailed:
    msg = (
        f"Could not back up {database_path} into {directory} before migrating: "
        f"{error}. Nothing was migrated. Make the folder writable (or fix backup_dir), "
        "free space on its disk if it is full, or turn backups off with backup_dir = "
        "(empty)."
    )
    return BackupFailed(msg, database_path=database_path, backup_dir=directory)


def _unsafe_folder(database_path: str, directory: str, error: UnsafeSideFile,
                   owner: Owner) -> BackupFailed:
    if error.what.startswith("belongs to"):
        fix = (f"Whoever owns it could read every backup and replace one before it is "
               f"restored. Remove it, or if you trust its owner give it to the database's "
               f"owner (chown {owner.uid} {error.path}), or point backup_dir elsewhere.")
    elif error.what == "is a symbolic link":
        fix = ("A link there could send the backups anywhere. Point backup_dir at the "
               "folder the link names, or replace the link with a folder.")
    else:
        fix = "Remove it or point backup_dir at a folder."
    msg = (
        f"Could not back up {database_path} before migrating: the backup folder "
        f"{error.path} {error.what}. Nothing was migrated. {fix}"
    )
    return BackupFailed(msg, database_path=database_path, backup_dir=directory)


# Reading and pruning ------------------------------------------------------------------

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


def folder_problem(directory: str | None, database_path: str) -> str | None:
    """Why the backups in ``directory`` are not listed (a link, a foreign owner), or None."""
    if directory is None or not os.path.lexists(directory):
        return None
    try:
        os.close(open_folder(directory, Owner.of(database_path), create=False))
    except UnsafeSideFile as error:
        return error.what
    except OSError as error:
        return f"cannot be opened ({error.strerror})"
    return None


def listing(directory: str | None, database_path: str) -> list[Backup]:
    """This database's backups in ``directory``, oldest first (see :func:`name_pattern`).

    Oldest by the UTC time in the name, which survives a copy or a restore from archive
    that resets modification times; the modification time only orders backups made
    within the same second (the name has whole seconds), then the ``-<n>`` suffix. A name
    dated in the future (beyond :data:`CLOCK_SKEW_S`) comes first: its date is not
    believed. Only regular files of users who can write the database are backups.
    """
    return [backup for backup, _ in _scan(directory, database_path)]


def _scan(directory: str | None, database_path: str) -> list[tuple[Backup, tuple[int, int]]]:
    """:func:`listing`, with each file's (device, inode)."""
    dir_fd = _open_existing_folder(directory, database_path)
    if dir_fd is None or directory is None:
        return []
    try:
        return _scan_folder(dir_fd, directory, database_path)
    except OSError as error:  # an unreadable folder: nothing to list
        logger.debug("Could not list backups in %s: %s", directory, error)
        return []
    finally:
        os.close(dir_fd)


def _open_existing_folder(directory: str | None, database_path: str) -> int | None:
    if directory is None or not os.path.lexists(directory):
        return None
    try:
        return open_folder(directory, Owner.of(database_path), create=False)
    except UnsafeSideFile as error:
        logger.debug("Not looking for backups in %s: it %s", directory, error.what)
    except (FileNotFoundError, NotADirectoryError):
        pass
    return None


def _scan_folder(dir_fd: int, directory: str,
                 database_path: str) -> list[tuple[Backup, tuple[int, int]]]:
    owner = Owner.of(database_path)
    pattern = name_pattern(database_path)
    future = time.strftime(STAMP_FORMAT, time.gmtime(time.time() + CLOCK_SKEW_S))
    found = []
    for name in os.listdir(dir_fd):
        match = pattern.fullmatch(name)
        if match is None:
            continue
        try:
            info = os.lstat(name, dir_fd=dir_fd)
        except FileNotFoundError:
            continue  # deleted while we looked
        if not stat.S_ISREG(info.st_mode) or not owner.trusts(info.st_uid):
            continue  # a folder, a link, another user's file: not one of ours
        # A date in the future is not believed: such a name sorts as the oldest.
        key = (match["stamp"] <= future, match["stamp"], info.st_mtime_ns,
               int(match["n"] or 1), name)
        backup = Backup(os.path.join(directory, name), info.st_size, info.st_mtime,
                        match["step"])
        found.append((key, backup, (info.st_dev, info.st_ino)))
    return [(backup, ident) for _, backup, ident in sorted(found, key=lambda t: t[0])]


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
    dir_fd = _open_existing_folder(directory, database_path)
    if dir_fd is None:
        logger.warning("Could not open %s to keep %d backups", directory, keep)
        return []
    try:
        try:
            backups = _scan_folder(dir_fd, directory, database_path)
            just_written = os.lstat(written)
        except OSError as error:
            logger.warning("Could not list old backups in %s to keep %d: %s",
                           directory, keep, error)
            return []
        ident = (just_written.st_dev, just_written.st_ino)
        step = next((b.step for b, i in backups if i == ident), None)
        older = [b for b, i in backups if i != ident]  # the new one is never deleted
        doomed = [(b, f"backup_keep = {keep}, a newer backup of {step}")
                  for b in older if b.step == step]
        older = [b for b in older if b.step != step]
        doomed += [(b, f"backup_keep = {keep}") for b in older[: max(0, len(older) - (keep - 1))]]
        return [path for b, why in doomed if (path := _delete(dir_fd, b.path, why))]
    finally:
        os.close(dir_fd)


def _delete(dir_fd: int, path: str, why: str) -> str | None:
    """Delete one old backup; the path, or None when it could not be deleted."""
    try:
        os.unlink(os.path.basename(path), dir_fd=dir_fd)
    except FileNotFoundError:
        return None  # someone removed it by hand meanwhile: it is gone, as intended
    except OSError as error:
        logger.warning("Could not delete old backup %s (%s): %s; the migration goes on",
                       path, why, error)
        return None
    logger.info("Deleted old backup %s (%s)", path, why)
    return path
