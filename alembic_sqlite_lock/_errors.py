"""Errors raised by alembic-sqlite-lock.

Every error subclasses alembic's ``CommandError``: the stock ``alembic`` command line
prints ``FAILED: <message>`` and exits non-zero for those, instead of a traceback.
Errors carry their facts as attributes (``url`` with the password hidden, ``attempts``,
``waited_s``) and survive pickling, so they cross a ``multiprocessing`` boundary intact.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from alembic.util import CommandError


class MigrationLockError(CommandError):
    """Root of every error this library raises."""

    def __reduce__(self) -> tuple[Any, ...]:
        # Exception pickles as ``cls(*args)``, which would drop (or trip over) the
        # keyword-only fields of the subclasses; rebuild from args plus the instance dict.
        return (_rebuild, (type(self), self.args, dict(self.__dict__)))


def _rebuild(
    cls: type[MigrationLockError], args: tuple[Any, ...], state: dict[str, Any]
) -> MigrationLockError:
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    return error


class ConfigurationError(MigrationLockError):
    """A setting, alembic.ini or env.py is wrong; nothing was run."""


class LockFileUnusable(ConfigurationError):
    """The run lock file beside a SQLite database cannot be locked (a symlink, FIFO or
    folder at its name, or a file this user may not open), and the run needs a lock that
    outlives a transaction (``autocommit_block()``, ``transaction_per_migration``);
    nothing was migrated. A run in one transaction goes on without it, with a warning."""

    def __init__(self, message: str, *, url: str, path: str) -> None:
        super().__init__(message)
        self.url = url
        self.path = path


class LockTimeout(MigrationLockError):
    """The migration lock could not be taken before the attempts or the deadline ran out."""

    def __init__(
        self,
        message: str,
        *,
        url: str,
        attempts: int,
        waited_s: float,
        holder: str | None = None,
    ) -> None:
        super().__init__(message)
        self.url = url
        self.attempts = attempts
        self.waited_s = waited_s
        self.holder = holder


class MigrationError(MigrationLockError):
    """A migration failed under the lock; the run was rolled back (see ``__cause__``)."""

    def __init__(self, message: str, *, url: str, revision: str | None = None) -> None:
        super().__init__(message)
        self.url = url
        self.revision = revision


def as_original(error: MigrationError, original: BaseException) -> MigrationError:
    """``error``, made an instance of ``original``'s type as well, so that code which
    catches what the migration raised (``except IntegrityError:`` around an upgrade, a
    test expecting ``InvalidRequestError``) still catches it, and ``except
    MigrationError`` too. Its message stays ours (the original's text is in it); the
    original's attributes (``orig``, ``statement``, ``params``...) are copied, and it is
    the ``__cause__``. Where such a class cannot be made (layouts that do not mix, such
    as ``OSError``'s), ``error`` as it is."""
    combined = _combined_class(type(error), type(original))
    if combined is None:
        return error
    both = combined.__new__(combined)
    both.__dict__.update(original.__dict__)
    both.__dict__.update(error.__dict__)  # url, revision: ours win
    both.args = error.args
    if isinstance(original, OSError):  # its facts live in slots, not in __dict__
        for name in ("errno", "strerror", "filename", "filename2"):
            setattr(both, name, getattr(original, name))
    return both


_COMBINED: dict[tuple[type[MigrationError], type[BaseException]], type[MigrationError] | None] = {}


def _combined_class(
    ours: type[MigrationError], theirs: type[BaseException]
) -> type[MigrationError] | None:
    """A subclass of both, made once per pair (isinstance checks stay cheap and stable)."""
    key = (ours, theirs)
    if key not in _COMBINED:
        made: type[MigrationError] | None = None
        if issubclass(theirs, Exception) and not issubclass(theirs, ours):
            try:
                made = type(ours.__name__, (ours, theirs), {
                    "__module__": ours.__module__,
                    "__qualname__": ours.__qualname__,
                    # The original type's own __str__ (SQLAlchemy's adds the statement)
                    # would come first otherwise: the message is ours.
                    "__str__": Exception.__str__,
                    "__reduce__": _reduce_as(ours),
                    "__init__": ours.__init__,
                })
            except TypeError:  # an instance lay-out conflict, an inconsistent MRO
                made = None
        _COMBINED[key] = made
    return _COMBINED[key]


def _reduce_as(ours: type[MigrationError]) -> Callable[[MigrationError], tuple[Any, ...]]:
    def reduce(self: MigrationError) -> tuple[Any, ...]:
        # Pickled as plain ``ours``: the combined class exists only in this process, and
        # the original's attributes (a DBAPI connection's error) may not pickle.
        state = {name: getattr(self, name) for name in ("url", "revision")}
        return (_rebuild, (ours, self.args, state))

    return reduce


class RollbackFailed(MigrationError):
    """A migration failed and rolling it back failed too; the database needs a look."""


def busy_reading(url: str, waited_s: float) -> LockTimeout:
    """A read-only command could not read the version: it never queues for the lock."""
    msg = (
        f"Could not read the revision of {url}: another connection kept it locked for "
        f"writing for {waited_s:.1f}s. Read-only commands take no lock and do not queue "
        "for one, so this one gave up: a write transaction is committing, or one holds "
        "the database exclusively (a large migration in SQLite's default rollback-journal "
        "mode keeps readers out until it commits; journal_mode=WAL lets them read). Run "
        "`alembic-sqlite-lock status` to see whether a migration is running and who runs "
        "it, try again later, or wait longer with busy_timeout_s (`-x "
        "lock_busy_timeout_s=60`)."
    )
    return LockTimeout(msg, url=url, attempts=1, waited_s=waited_s)


RAISE_DEADLINE = (
    "raise deadline_s (`-x lock_deadline_s=600`, or the [alembic_sqlite_lock] section "
    "of alembic.ini)."
)
"""The end of every LockTimeout: what to do when a migration legitimately takes longer."""


def lock_timeout(
    url: str,
    attempts: int,
    waited_s: float,
    causes: Callable[[str | None], str] | None = None,
    lock_file: str | None = None,
) -> LockTimeout:
    """``causes(lock_file)``: the backend's explanation after the first words (its
    ``timeout_causes``); ``lock_file``: the file the last attempt waited on, if a file."""
    head = (
        f"Could not take the migration lock on {url} after {attempts} attempt"
        f"{'s' if attempts != 1 else ''} over {waited_s:.1f}s: "
    )
    if causes is not None:
        msg = f"{head}{causes(lock_file)}"
        return LockTimeout(msg, url=url, attempts=attempts, waited_s=waited_s)
    msg = (
        f"{head}another connection held the migration lock the whole time. Likely "
        "causes: another process is stuck in a migration or a long write transaction "
        "(check its logs); the database is not writable by this user (permissions); or "
        "disk I/O problems. To diagnose, start a single worker alone; if a migration "
        f"legitimately takes longer, {RAISE_DEADLINE}"
    )
    return LockTimeout(msg, url=url, attempts=attempts, waited_s=waited_s)


class DatabaseUnusable(MigrationLockError):
    """The database file cannot be used as it is (missing directory, not a database,
    read-only, no room); nothing was migrated."""

    def __init__(self, message: str, *, url: str, path: str) -> None:
        super().__init__(message)
        self.url = url
        self.path = path


class DatabaseUnreadable(MigrationLockError):
    """The database's migration state cannot be read at all (the server or the file
    refused: unreachable, bad credentials, no such database, not readable); the message
    quotes the database's own error. Nothing was migrated."""

    def __init__(self, message: str, *, url: str) -> None:
        super().__init__(message)
        self.url = url


class LockNotTaken(MigrationLockError):
    """The database failed to take the migration lock, rather than timing out waiting
    for it (MySQL's ``GET_LOCK`` returned NULL: out of memory, or its connection was
    killed while waiting). Nothing was migrated."""

    def __init__(self, message: str, *, url: str, lock_name: str) -> None:
        super().__init__(message)
        self.url = url
        self.lock_name = lock_name


class LockLost(MigrationLockError):
    """The migration lock was lost during the run (on MySQL, its connection was closed
    or killed), so another worker may have migrated at the same time; the run was rolled
    back before its COMMIT."""

    def __init__(self, message: str, *, url: str, lock_name: str) -> None:
        super().__init__(message)
        self.url = url
        self.lock_name = lock_name


class BackupFailed(MigrationLockError):
    """The opt-in backup (``backup_dir``) could not be written; nothing was migrated."""

    def __init__(self, message: str, *, database_path: str, backup_dir: str) -> None:
        super().__init__(message)
        self.database_path = database_path
        self.backup_dir = backup_dir


class UnknownRevision(MigrationLockError):
    """The command names a revision the code does not have; nothing was migrated."""

    def __init__(self, message: str, *, url: str, revision: str) -> None:
        super().__init__(message)
        self.url = url
        self.revision = revision


class MultipleHeadsError(MigrationLockError):
    """``upgrade head`` while the code has several heads; nothing was migrated."""

    def __init__(self, message: str, *, url: str, code_heads: tuple[str, ...]) -> None:
        super().__init__(message)
        self.url = url
        self.code_heads = code_heads


class UnknownDatabaseRevision(MigrationLockError):
    """The database is at a revision the code does not have: usually a newer release
    migrated it. Setting ``allow_unknown_revision`` starts the app anyway, with a warning."""

    def __init__(
        self,
        message: str,
        *,
        url: str,
        database_revisions: tuple[str, ...],
        code_heads: tuple[str, ...],
    ) -> None:
        super().__init__(message)
        self.url = url
        self.database_revisions = database_revisions
        self.code_heads = code_heads
