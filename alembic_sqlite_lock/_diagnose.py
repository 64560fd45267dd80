"""Turn a failure into an error that names the file, the cause and the fix.

SQLite reports "unable to open database file" for a missing directory, a directory in
place of a file, a directory it may not write to and more; Alembic reports "Can't locate
revision" both for a mistyped argument and for a database migrated by a newer release.
This module tells those apart, and warns about setups where the lock means little.

It only ever ``stat()``s the database: opening and closing the file outside SQLite would
drop the fcntl locks SQLite holds on it in this process (see ``_sqlite``).
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from alembic.runtime.environment import EnvironmentContext
from alembic.script import ScriptDirectory
from alembic.script.revision import MultipleHeads, ResolutionError
from alembic.util import CommandError
from sqlalchemy import exc
from sqlalchemy.engine import make_url

from ._backend import describe_url
from ._errors import (
    ConfigurationError,
    DatabaseUnusable,
    MigrationLockError,
    MultipleHeadsError,
    UnknownDatabaseRevision,
    UnknownRevision,
)

logger = logging.getLogger(__name__)

# SQLite's primary result codes (sqlite3.SQLITE_* exist from Python 3.11 only).
_PERM, _READONLY, _IOERR, _CORRUPT, _FULL, _CANTOPEN, _NOTADB = 3, 8, 10, 11, 13, 14, 26

SETTING = "allow_unknown_revision"
"""The setting that lets an app start on a database migrated by a newer release."""

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
def open_error(url: str, error: exc.DBAPIError) -> MigrationLockError:
    """The error for a database SQLite could not open or read."""
    path = database_file(url)
    code = _sqlite_code(error)
    reason = _why_unusable(path, code)
    if reason is None:
        msg = (
            f"Could not read the migration state of {url}: {error.orig}. Check that the "
            "path points at a SQLite database this user can read and write."
        )
        return MigrationLockError(msg)
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


def one_line(error: BaseException) -> str:
    """An error as one line: SQLAlchemy's own text spans several (SQL, parameters, link)."""
    if isinstance(error, exc.DBAPIError) and error.orig is not None:
        statement = " ".join(str(error.statement or "").split())
        shown = statement if len(statement) <= 200 else statement[:197] + "..."
        text = f"{type(error.orig).__name__}: {error.orig}"
        return f"{text} (while running: {shown})" if shown else text
    return f"{type(error).__name__}: {' '.join(str(error).split())}".rstrip(".")


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


def bad_url(shown: str, error: Exception, ini: str | None) -> ConfigurationError:
    """sqlalchemy.url cannot be parsed or is not a valid SQLite URL."""
    reason = str(error).splitlines()[0].rstrip(".")
    if reason.startswith("invalid literal for int()"):
        # Not the literal itself: in "user:password" with the "@host" forgotten,
        # SQLAlchemy takes the password for the port.
        reason = "the port is not a number"
    where = ini or "the Alembic configuration"
    if shown.startswith(("postgres", "mysql", "mariadb")):
        msg = (
            f"sqlalchemy.url in {where} is not a valid database URL ({shown}): {reason}. "
            "Use postgresql://user:password@host:5432/dbname or "
            "mysql://user:password@host:3306/dbname (a port is a number; a special "
            "character in the password is %-encoded, and written %% in alembic.ini). "
            "Nothing was run."
        )
        return ConfigurationError(msg)
    msg = (
        f"sqlalchemy.url in {where} is not a valid SQLite URL "
        f"({shown}): {reason}. Use sqlite:///relative/path.db, sqlite:////absolute/path.db, "
        "or sqlite:///%(here)s/app.db for a file beside alembic.ini. Nothing was run."
    )
    return ConfigurationError(msg)


# Revisions --------------------------------------------------------------------------------
@contextmanager
def guarding_revisions(env: EnvironmentContext, allow_unknown: bool) -> Iterator[None]:
    """While inside, the command's work function explains revision errors."""
    original = env.context_opts["fn"]
    env.context_opts["fn"] = revision_guard(original, env.script, allow_unknown=allow_unknown)
    try:
        yield
    finally:
        env.context_opts["fn"] = original


def revision_guard(fn: Any, script: ScriptDirectory, *, allow_unknown: bool) -> Any:
    """Wrap a command's work function: clear errors for revisions nobody can find.

    A database at a revision the code does not have is the classic rolling deploy or
    code rollback: an older release boots against a schema a newer one migrated. With
    ``allow_unknown`` the app starts anyway (nothing migrated) after a WARNING.
    """

    def guarded(heads: tuple[str, ...], context: Any) -> list[Any]:
        try:
            return list(fn(heads, context))
        except MigrationLockError:
            raise
        except CommandError as error:
            url = _shown_url(context)
            unknown = _unknown_revisions(script, heads)
            if unknown:
                ahead = database_ahead(url, script, heads, unknown)
                if not allow_unknown:
                    raise ahead from error
                logger.warning(
                    "Database %s is at revision %s, which this code does not know (its "
                    "heads: %s); starting anyway because %s is set. Nothing was migrated.",
                    url, ", ".join(heads), _heads(script), SETTING,
                )
                return []
            raise revision_error(url, script, error) from error

    return guarded


def _shown_url(context: Any) -> str:
    connection = getattr(context, "connection", None)
    if connection is not None:
        return describe_url(connection.engine.url)
    # No connection yet: a target resolved before a new database file is created.
    env = getattr(context, "environment_context", None)
    url = env.config.get_main_option("sqlalchemy.url") if env is not None else None
    return describe_url(url) if url else "the database"


def _unknown_revisions(script: ScriptDirectory, heads: Iterable[str]) -> list[str]:
    unknown = []
    for head in heads:
        try:
            script.revision_map.get_revision(head)
        except Exception:
            unknown.append(head)
    return unknown


def _heads(script: ScriptDirectory) -> str:
    return ", ".join(script.get_heads()) or "none"


def database_ahead(
    url: str, script: ScriptDirectory, heads: tuple[str, ...], unknown: list[str]
) -> UnknownDatabaseRevision:
    code_heads = _heads(script)
    msg = (
        f"The database {url} is at revision {', '.join(heads)}, but this code does not "
        f"have revision {', '.join(unknown)}: its newest revision is {code_heads} (in "
        f"{script.versions}). Most likely an older release of the app is starting against "
        "a database that a newer release already migrated (a rolling deploy, or a code "
        "rollback without a database downgrade). Deploy the release that contains "
        f"{', '.join(unknown)}, or downgrade the database with that release first "
        f"(`alembic downgrade {code_heads}`). If this release is known to work with the "
        f"newer schema, set {SETTING} = true in [alembic_sqlite_lock] of alembic.ini "
        f"(or -x lock_{SETTING}=true, or upgrade(..., {SETTING}=True)) to start with a "
        "warning instead. Nothing was migrated."
    )
    return UnknownDatabaseRevision(
        msg, url=url, database_revisions=tuple(heads), code_heads=tuple(script.get_heads())
    )


def revision_error(url: str, script: ScriptDirectory, error: CommandError) -> CommandError:
    """A clearer error for a mistyped revision or an ambiguous ``head``."""
    cause = error.__cause__
    code_heads = _heads(script)
    if isinstance(cause, MultipleHeads):
        msg = (
            f"Cannot upgrade {url} to '{cause.argument}': the code in {script.versions} has "
            f"{len(cause.heads)} head revisions ({', '.join(cause.heads)}), so there is no "
            "single newest revision. Merge them (`alembic merge heads -m merge`, commit "
            "and deploy the merge revision), or upgrade to every head with `alembic "
            "upgrade heads`. Nothing was migrated."
        )
        return MultipleHeadsError(msg, url=url, code_heads=tuple(cause.heads))
    if isinstance(cause, ResolutionError):
        msg = (
            f"Revision '{cause.argument}' does not exist in {script.versions}, so {url} "
            f"cannot be migrated to it. The code's newest revision is {code_heads}; "
            "`alembic history` lists them all. Check the revision id (or use head). "
            "Nothing was migrated."
        )
        return UnknownRevision(msg, url=url, revision=str(cause.argument))
    return error


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
