"""Turn a SQLite failure into an error that names the file, the cause and the fix.

SQLite reports "unable to open database file" for a missing directory, a directory in
place of a file, a directory it may not write to and more; this module tells those
apart, and warns about setups where the lock means little (in-memory databases, network
filesystems).

It only ever ``stat()``s the database: opening and closing the file outside SQLite would
drop the fcntl locks SQLite holds on it in this process (see ``_backend``).
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3

from sqlalchemy import exc
from sqlalchemy.engine import make_url

from ..._errors import DatabaseUnreadable, DatabaseUnusable

logger = logging.getLogger(__name__)

# SQLite's primary result codes (sqlite3.SQLITE_* exist from Python 3.11 only).
_PERM, _READONLY, _IOERR, _CORRUPT, _FULL, _CANTOPEN, _NOTADB = 3, 8, 10, 11, 13, 14, 26

NETWORK_FILESYSTEMS = frozenset(
    {"nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "afs", "ceph", "glusterfs", "lustre",
     "gpfs", "ocfs2", "gfs2", "davfs", "sshfs", "fuseblk"}
)
"""Mount types on which SQLite's file locking is unreliable or absent (plus fuse.*)."""


# Paths ----------------------------------------------------------------------------------
def database_file(url: str) -> str:
    """The database's file path from a SQLite URL, absolute; "" for in-memory."""
    try:
        database = make_url(url).database or ""
    except (exc.ArgumentError, ValueError):
        return ""
    if database.startswith("file:"):  # a SQLite URI filename: file:path?mode=...
        database = database[len("file:"):].partition("?")[0]
    if database in ("", ":memory:") or "mode=memory" in url:
        return ""
    return os.path.abspath(database)


def _user() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.geteuid()).pw_name
    except (ImportError, KeyError):  # pragma: no cover - not POSIX, or no passwd entry
        return f"uid {os.geteuid()}"


def _can(path: str, mode: int) -> bool:
    effective = os.access in os.supports_effective_ids
    return os.access(path, mode, effective_ids=effective)


def _sqlite_code(error: BaseException | None) -> int | None:
    """SQLite's primary result code for an error (or one it was caused by)."""
    seen = 0
    while error is not None and seen < 10:
        if isinstance(error, exc.DBAPIError) and error.orig is not None:
            error = error.orig
        if isinstance(error, sqlite3.Error):
            code = getattr(error, "sqlite_errorcode", None)
            return None if code is None else int(code) & 0xFF
        error = error.__cause__
        seen += 1
    return None


# Opening and writing the database -------------------------------------------------------
def open_error(url: str, error: exc.DBAPIError) -> DatabaseUnreadable | DatabaseUnusable:
    """The error for a database SQLite could not open or read."""
    path = database_file(url)
    code = _sqlite_code(error)
    reason = _why_unusable(path, code)
    if reason is None:
        msg = (
            f"Could not read the migration state of {url}: {error.orig}. Check that the "
            "path points at a SQLite database this user can read and write."
        )
        return DatabaseUnreadable(msg, url=url)
    return DatabaseUnusable(f"{reason} Nothing was migrated.", url=url, path=path)


def _why_unusable(path: str, code: int | None) -> str | None:
    if not path:
        return None
    return _wrong_place(path) or _wrong_file(path, code) or _no_access(path, code)


def _wrong_place(path: str) -> str | None:
    """The path leads nowhere a database can be."""
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        return (
            f"The directory of the database {path} does not exist ({directory}). Create it "
            f"(`mkdir -p {directory}`) before the app starts, or correct sqlalchemy.url "
            "(a relative sqlite:///path is relative to the working directory; use "
            "sqlite:///%(here)s/app.db in alembic.ini for a path beside it)."
        )
    if os.path.isdir(path):
        return (
            f"The database path {path} is a directory, not a file. Point sqlalchemy.url "
            f"at a database file, for example sqlite:///{os.path.join(path, 'app.db')}."
        )
    return None


def _wrong_file(path: str, code: int | None) -> str | None:
    """The file is there but is not a usable database."""
    if code == _NOTADB:
        return (
            f"{path} exists but is not a SQLite database (or is encrypted). Check that "
            "sqlalchemy.url names the right file; this tool never overwrites it. If it is "
            "a damaged database, restore it from a backup."
        )
    if code == _CORRUPT:
        return (
            f"The database {path} is damaged (SQLite: database disk image is malformed). "
            "Stop the app and restore it from a backup; `sqlite3 "
            f"{path} 'PRAGMA integrity_check'` shows the damage."
        )
    return None


def _no_access(path: str, code: int | None) -> str | None:
    """This user may not read, create or write the database."""
    directory = os.path.dirname(path)
    if os.path.exists(path) and not _can(path, os.R_OK):
        return (
            f"The database {path} is not readable by user {_user()}. Give that user read "
            f"and write access (chown/chmod), or run the migration as the file's owner."
        )
    if not os.path.exists(path) and not _can(directory, os.W_OK | os.X_OK):
        return (
            f"The database {path} does not exist and user {_user()} may not create it: "
            f"the directory {directory} is not writable. Make it writable for that user, "
            "or point sqlalchemy.url at a writable location."
        )
    if code in (_READONLY, _CANTOPEN, _PERM):
        return _not_writable(path) or (
            f"SQLite could not open {path} (result code {code}). Check the permissions of "
            f"the file and of {directory} for user {_user()}."
        )
    return None


def _not_writable(path: str) -> str | None:
    """Why SQLite cannot write ``path``, or None if it looks writable."""
    directory = os.path.dirname(path)
    if os.path.exists(path) and not _can(path, os.W_OK):
        return (
            f"The database file {path} is read-only for user {_user()}. A migration must "
            "write to it: give that user write access (`chmod u+w`, or chown it to the "
            "user the app runs as), or run the migration as a user who can write it. "
            "Nothing was changed on disk."
        )
    # SQLite creates <db>-journal (or <db>-wal and <db>-shm) beside the database at the
    # first write; a WAL database whose two files already exist can do without.
    wal_ready = os.path.exists(path + "-wal") and os.path.exists(path + "-shm")
    if not _can(directory, os.W_OK | os.X_OK) and not wal_ready:
        return (
            f"The directory {directory} is read-only for user {_user()}, so SQLite cannot "
            f"create its journal ({os.path.basename(path)}-journal) beside the database "
            f"{path} and no write can happen. Make the directory writable for that user "
            "(the database file alone is not enough), or move the database to a writable "
            "directory. Nothing was changed on disk."
        )
    return None


def check_writable(path: str, url: str) -> None:
    """Before the locked pass creates anything: fail if SQLite could not write ``path``."""
    if not path:
        return
    reason = _not_writable(path)
    if reason is not None:
        raise DatabaseUnusable(reason, url=url, path=path)


def migration_hint(url: str, error: BaseException) -> str:
    """An extra sentence for a failed migration whose cause is the disk or the file."""
    path = database_file(url) or "the database"
    code = _sqlite_code(error)
    if code == _FULL or _os_errno(error) == errno.ENOSPC:
        return (
            f" The disk holding {path} is full (or the database reached its "
            f"max_page_count): free space on that filesystem (`df -h "
            f"{os.path.dirname(path) or '.'}`) and run the upgrade again."
        )
    if code in (_READONLY, _CANTOPEN, _PERM):
        reason = _not_writable(path) if path != "the database" else None
        return " " + (reason or f"SQLite could not write {path} or its journal: check the "
                      "permissions of the file and its directory and free disk space.")
    if code == _IOERR:
        return (
            f" SQLite reported a disk I/O error on {path}: check the disk and the "
            "filesystem (dmesg), and that the database is not on a network filesystem."
        )
    return ""


def _os_errno(error: BaseException) -> int | None:
    while error is not None:
        if isinstance(error, OSError):
            return error.errno
        error = error.__cause__  # type: ignore[assignment]
    return None


# Questionable setups --------------------------------------------------------------------
def warn_about_setup(url: str, path: str, mountinfo: str | None = None) -> None:
    """WARN when the lock cannot mean what it promises: in-memory or network databases."""
    if not path:
        logger.warning(
            "%s is an in-memory (or temporary) database: it exists only inside one "
            "connection, so no other worker can see it and the migration lock is "
            "meaningless. Use a database file to share it between workers.",
            url,
        )
        return
    fstype = filesystem_type(os.path.dirname(path), mountinfo)
    if fstype is not None and is_network_filesystem(fstype):
        logger.warning(
            "%s is on a %s filesystem. SQLite's file locking is unreliable on network and "
            "FUSE filesystems, so two workers may both believe they hold the lock and "
            "corrupt the database. Keep the database on a local disk, or use a server "
            "database (PostgreSQL, MySQL) with its own migration lock.",
            url,
            fstype,
        )


def is_network_filesystem(fstype: str) -> bool:
    return fstype in NETWORK_FILESYSTEMS or fstype.startswith("fuse.")


def filesystem_type(path: str, mountinfo: str | None = None) -> str | None:
    """The type of the filesystem holding ``path``, from /proc/self/mountinfo (Linux)."""
    if mountinfo is None:
        try:
            with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as file:
                mountinfo = file.read()
        except OSError:
            return None  # not Linux: no check
    target = os.path.realpath(path)
    best: tuple[int, str] | None = None
    for line in mountinfo.splitlines():
        parsed = _parse_mountinfo_line(line)
        if parsed is None:
            continue
        mount_point, fstype = parsed
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        # Later lines win a tie: a mount stacked on the same point hides the earlier one.
        if inside and (best is None or len(mount_point) >= best[0]):
            best = (len(mount_point), fstype)
    return None if best is None else best[1]


def _parse_mountinfo_line(line: str) -> tuple[str, str] | None:
    """(mount point, filesystem type) of one mountinfo line; see proc(5)."""
    fields = line.split()
    if " - " not in line or len(fields) < 5:
        return None
    after = line.split(" - ", 1)[1].split()
    if not after:
        return None
    return _unescape(fields[4]), after[0]


def _unescape(text: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 3 < len(text) + 0 and text[i + 1:i + 4].isdigit():
            out.append(chr(int(text[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(text[i])
            i += 1
    return "".join(out)
