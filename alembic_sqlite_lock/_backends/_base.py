"""One small interface per database, chosen by the URL's dialect name.

The orchestrator (``_env``) runs the same two passes everywhere: a look at the version
without the lock, then a locked run. What differs per database is how a connection is
made, how the lock is taken and released, and what a failure leaves behind:

* SQLite (``_sqlite``): SQLite's own write lock, BEGIN IMMEDIATE, plus a run lock file.
* PostgreSQL (``_postgresql``): an advisory lock keyed by database, schema and version
  table; the whole run is one transaction.
* MySQL / MariaDB (``_mysql``): ``GET_LOCK`` on a dedicated connection; each revision
  commits on its own because DDL commits implicitly there.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlalchemy import Column, MetaData, String, Table, exc, select
from sqlalchemy.engine import URL, Connection, Engine, engine_from_config, make_url
from sqlalchemy.pool import NullPool

from .._errors import ConfigurationError, DatabaseUnreadable, MigrationLockError
from .._held import Held
from .._retry import RetryPolicy
from .._settings import Settings
from .._urls import describe_url

logger = logging.getLogger(__name__)


class SideFiles(Protocol):
    """What a run keeps beside its database while it holds the lock (SQLite: the holder
    record and the opt-in backup; a server database keeps nothing, see :class:`NoSideFiles`)."""

    def holder_suffix(self) -> str:
        """`` (held by pid 4711 on web-2, ...)`` for a waiter's lines; "" when unknown."""
        ...

    def holder_alive(self) -> bool:
        """The recorded holder provably runs now (for wait_while_holder_alive)."""
        ...

    def running_target(self) -> list[str] | None:
        """Where the running holder's run will leave the version table, if recorded."""
        ...

    def starting(self, heads: Sequence[str], steps: Sequence[Any]) -> None:
        """Inside the lock, once the steps are known, before the first one."""
        ...

    def finished(self) -> None:
        """Before the lock is released, whether the run succeeded or not."""
        ...


class NoSideFiles:
    """A database with no file beside it: no holder record, no backup."""

    def holder_suffix(self) -> str:
        return ""

    def holder_alive(self) -> bool:
        return False

    def running_target(self) -> list[str] | None:
        return None

    def starting(self, heads: Sequence[str], steps: Sequence[Any]) -> None:
        pass

    def finished(self) -> None:
        pass


class Backend(Protocol):
    """What the orchestrator needs from a database."""

    url: str
    """The URL with its password hidden: the only form logs and errors may show."""
    transactional: bool
    """True when the locked run is one transaction: a failure leaves the previous revision."""

    @property
    def run_long_lock(self) -> bool:
        """The lock outlives a transaction: a run may commit midway (autocommit blocks,
        transaction_per_migration) and still keep every other worker out."""
        ...

    def creates_database(self) -> bool:
        """The first connection would create the database (a SQLite file that does not
        exist yet): the run resolves its target first, so that a mistyped revision fails
        with nothing left on disk."""
        ...

    def side_files(self, settings: Settings) -> SideFiles:
        """What the run keeps beside the database while it holds the lock (the holder
        record, the backup), from the run's resolved settings."""
        ...

    def reading(self) -> AbstractContextManager[Connection]:
        """A connection for the unlocked look at the version."""
        ...

    def is_busy(self, error: BaseException) -> bool:
        """The unlocked look hit a lock: the locked pass will wait its turn instead."""
        ...

    def no_lock_wait(self, connection: Connection) -> None:
        """Make statements on this reading connection fail at once on a lock instead of
        waiting for it (the warm-up before the locked run)."""
        ...

    def wait_for_running(
        self,
        timeout_s: float,
        while_waiting: Callable[[], None] | None = None,
        still_waiting: Callable[[], None] | None = None,
    ) -> bool:
        """If another worker is migrating now, wait (at most ``timeout_s``) until it has
        finished, without queueing for the lock; True when a run was waited for.
        ``while_waiting`` is called once a run is known to be going on, before blocking;
        ``still_waiting`` now and then while the wait lasts, so that it shows in the log."""
        ...

    def read_versions(self, table: str, schema: str | None) -> tuple[str, ...] | None:
        """The version table's rows by one plain SELECT, never waiting on a lock: the
        cheap look of a worker that waited for a run. None when it cannot tell (busy,
        unreadable); the locked run then decides, as it always does."""
        ...

    def look_versions(
        self, connection: Connection, table: str, schema: str | None
    ) -> tuple[str, ...] | None:
        """The version table's rows for the look before the lock, on its reading
        connection, where the backend has a cheaper way than Alembic's read; None: let
        Alembic read them. A busy database raises a DBAPIError, as Alembic's read would."""
        ...

    def try_lock(
        self,
        timeout_s: float,
        *,
        begin: bool = True,
        still_waiting: Callable[[], None] | None = None,
    ) -> Connection:
        """One attempt: return the migration connection with the lock held, waiting at
        most ``timeout_s``; raise ``LockBusy`` when another worker kept the lock.
        ``begin=False`` (transaction_per_migration) asks for no transaction around the
        run where the backend would otherwise begin one. ``still_waiting`` is called
        now and then while a long wait lasts (SQLite's run lock), for the log.

        A connection returned inside a transaction runs the whole run in it (Alembic
        sees an external transaction); one returned outside a transaction gets
        Alembic's own transaction handling for the dialect.
        """
        ...

    def hold(
        self, timeout_s: float, *, still_waiting: Callable[[], None] | None = None
    ) -> Held:
        """One attempt at the migration lock for a ``migration_lock()`` block: the same
        lock a run takes (SQLite: the run lock file, never SQLite's write lock; a server:
        its lock on a dedicated session), waiting at most ``timeout_s``; raise
        ``LockBusy`` when another worker kept it. Held until ``release()``; a process
        killed meanwhile frees it at once (kernel flock, server session). Inside a block
        of this flow of control that holds it already, a nested :class:`Held` that
        holds nothing (see ``_held``); ``try_lock`` skips the lock the same way."""
        ...

    def timeout_causes(self, lock_file: str | None) -> str:
        """What a LockTimeout on this database most likely means and what to do: the
        error's text after "Could not take the migration lock on URL after N attempts
        over Ts: ". ``lock_file``: the file the last attempt waited on, if a file."""
        ...

    def watch(self, connection: Connection, running: Callable[[], str]) -> Callable[[], None]:
        """Watch the migration connection for statements the database would silently
        ignore there (warned about, naming ``running()``, the revision being run);
        returns what stops watching."""
        ...

    def autocommit_refused(self) -> MigrationLockError:
        """The error for a migration's autocommit_block() when the lock does not outlive
        a transaction (``run_long_lock`` is False)."""
        ...

    def before_commit(self, connection: Connection) -> None:
        """Checks that must pass before the run commits (raise to roll back)."""
        ...

    def check_midway(self) -> None:
        """Around a commit in the middle of a run (an autocommit block, between the
        revisions of transaction_per_migration): raise if the lock that outlives the
        transaction is no longer this run's, so that the run stops there."""
        ...

    def read_only(self, connection: Connection) -> None:
        """Mark the migration connection, after a failed run, for reading the version
        only: a transaction begun on it takes no write lock."""
        ...

    def database_error(self, error: exc.DBAPIError) -> MigrationLockError:
        """The error for a database whose migration state cannot be read at all: which
        database, what is wrong, the fix."""
        ...

    def failure_hint(self, error: BaseException) -> str:
        """An extra sentence for a failed migration whose cause is the disk or the file
        (" The disk holding ... is full ..."), or ""."""
        ...

    def commit(self, connection: Connection) -> None:
        """Commit the run's transaction on ``connection`` (the lock is still held)."""
        ...

    def rollback(self, connection: Connection) -> None:
        """Roll back the run's transaction on ``connection``, or end a look's."""
        ...

    def release(self, connection: Connection) -> None:
        """Release the lock and the connection; called after COMMIT or ROLLBACK."""
        ...

    def close(self) -> None:
        """End of the run: dispose of engines, restore a handed-in connection."""
        ...


class ServerBackend:
    """What the server databases share: a pooled look at the version, no file beside."""

    engine: Engine
    url: str
    unreadable_hint: str
    """Appended to the error when the version cannot be read at all."""

    @contextmanager
    def reading(self) -> Iterator[Connection]:
        with self.engine.connect() as connection:
            yield connection

    def creates_database(self) -> bool:
        return False  # a server database exists before the run, or the connection fails

    def side_files(self, settings: Settings) -> SideFiles:
        return NoSideFiles()  # no file beside the database for a holder record or a backup

    def is_busy(self, error: BaseException) -> bool:
        return False  # reading the version table never waits on a migration there

    def no_lock_wait(self, connection: Connection) -> None:
        pass  # reading the version table never waits on a migration there

    def check_midway(self) -> None:
        pass  # the server's session lock cannot be taken away by a file operation

    def wait_for_running(
        self,
        timeout_s: float,
        while_waiting: Callable[[], None] | None = None,
        still_waiting: Callable[[], None] | None = None,
    ) -> bool:
        return False  # waiters queue for the server's lock and re-check one at a time

    def read_versions(self, table: str, schema: str | None) -> tuple[str, ...] | None:
        """One SELECT of the version table on a connection of the pool (None: no table
        yet, or it cannot be read). Runs never ask (wait_for_running() never waits
        here); migration_lock(ready=<an Alembic environment>) does."""
        version = Table(table, MetaData(), Column("version_num", String(32)), schema=schema)
        try:
            with self.engine.connect() as connection:
                rows = connection.execute(select(version.c.version_num)).scalars().all()
        except exc.DBAPIError as error:
            logger.debug("Could not read the version of %s: %s", self.url, error)
            return None
        return tuple(rows)

    def look_versions(
        self, connection: Connection, table: str, schema: str | None
    ) -> tuple[str, ...] | None:
        return None  # Alembic's read is one query there

    def watch(self, connection: Connection, running: Callable[[], str]) -> Callable[[], None]:
        return lambda: None  # nothing the server ignores silently inside a transaction

    def autocommit_refused(self) -> MigrationLockError:
        return autocommit_refused(self.url)

    def read_only(self, connection: Connection) -> None:
        pass  # the version read takes no lock there

    def database_error(self, error: exc.DBAPIError) -> DatabaseUnreadable:
        msg = (
            f"Could not read the migration state of {self.url}: {error.orig}. "
            f"{self.unreadable_hint}"
        )
        return DatabaseUnreadable(msg, url=self.url)

    def failure_hint(self, error: BaseException) -> str:
        return ""  # the server's own error says it

    def commit(self, connection: Connection) -> None:
        if connection.in_transaction():
            connection.commit()

    def rollback(self, connection: Connection) -> None:
        connection.rollback()


def autocommit_refused(url: str) -> ConfigurationError:
    """autocommit_block() in a run whose lock ends with a transaction."""
    msg = (
        "A migration uses autocommit_block(), which commits in the middle of the run, "
        f"but the migration lock on {url} ends with a transaction here (lock_scope = "
        "transaction on PostgreSQL, for a transaction pooler; or SQLite without a run "
        "lock file: an in-memory database, or a system without flock), so other "
        "workers could start migrating at that commit. The run was rolled back; "
        "nothing was migrated. Use lock_scope = session on a direct or session-pooled "
        "connection, or move those statements out of autocommit_block()."
    )
    return ConfigurationError(msg)


class HolderShown(Protocol):
    """A holder record as ``status`` shows it."""

    @property
    def since(self) -> float:
        """When it took the lock (seconds since the epoch)."""
        ...

    def as_dict(self) -> dict[str, Any]:
        ...

    def describe(self) -> str:
        """``pid 4711 on web-2, a1b2 -> c3d4, for 1.4 s``."""
        ...


class BackupShown(Protocol):
    """A backup file as ``status`` lists it."""

    @property
    def path(self) -> str: ...

    @property
    def size_bytes(self) -> int: ...

    @property
    def created(self) -> float: ...


@dataclass(frozen=True)
class FilesBeside:
    """What ``status`` shows about the files a database keeps beside it; the defaults are
    a database without files (a server, an in-memory database)."""

    migration_running: bool | None = None
    """True/False from the run lock; None when this system cannot tell."""
    lock_problem: str | None = None
    """Why migration_running is None, when the run lock file is to blame."""
    holder: HolderShown | None = None
    holder_stale: bool = False
    backup_dir: str | None = None
    backups: Sequence[BackupShown] = field(default_factory=list)
    backup_folder_problem: str | None = None
    """Why the backups in backup_dir are not listed (a link, a foreign owner)."""


# What the command line asks about a database, for a backend module that does not say
# (each backend module may define these functions; see ``_backends.missing_database``).
def missing_database(url: str) -> str | None:
    """The file a URL names that does not exist yet (a look must not create it)."""
    return None


def database_path(url: str) -> str | None:
    """The database's file a URL names, whether it exists or not."""
    return None


def database_file(connection: Connection) -> str:
    """The file the connection's database lives in, as the database resolved it."""
    return ""


def files_beside(database_path: str, backup_dir_setting: str) -> FilesBeside:
    """What ``status`` shows about the files beside the database."""
    return FilesBeside()


@dataclass(frozen=True)
class RunOptions:
    """Everything a backend is built from."""

    policy: RetryPolicy
    lock_key: str | None
    lock_scope: str
    version_table: str
    version_table_schema: str | None


def migration_engine(
    section: Mapping[str, str], url: URL, *, extra: str | None = None, **options: Any
) -> Engine:
    """The engine a run migrates through, made the same way for every database: the
    alembic.ini section's ``sqlalchemy.*`` options with ``url`` (the backend's migration
    URL) as sqlalchemy.url, and a new connection for every attempt (NullPool), so that a
    connection that waited in vain for the lock is never reused and nothing stays open
    between runs. ``options`` are the backend's own; ``extra`` names our pip extra that
    installs its driver, for the error when the driver is missing."""
    config = dict(section)
    config["sqlalchemy.url"] = url.render_as_string(hide_password=False)
    try:
        return engine_from_config(config, prefix="sqlalchemy.", poolclass=NullPool, **options)
    except ImportError as error:
        if extra is None:
            raise
        raise missing_driver(section["sqlalchemy.url"], error, extra) from error


def missing_driver(url: str, error: ImportError, extra: str) -> ConfigurationError:
    """The error for a server URL whose driver is not installed."""
    backend = make_url(url).get_backend_name()
    msg = (
        f"The database driver for {describe_url(url)} is not installed ({error}). "
        f"Install it, or the one our extra brings with: pip install "
        f"'alembic-sqlite-lock[{extra}]' (then write {backend}:// without a driver)"
    )
    return ConfigurationError(msg)


def open_server(
    backend: Callable[[Mapping[str, str], RunOptions], Backend],
    handed_in_backend: Callable[[Connection, RunOptions], Backend],
    section: Mapping[str, str] | None,
    handed_in: Connection | None,
    options: RunOptions,
) -> Backend:
    """A server backend's entry in the registry: its own engine from the alembic.ini
    section, or the connection handed in (``config.attributes["connection"]``), locked
    the same way."""
    if handed_in is not None:
        return handed_in_backend(handed_in, options)
    assert section is not None
    return backend(section, options)


def block_url(url: URL) -> str:
    """A server database's URL as the identity of its lock in ``_held``: without its
    password, and without its driver (a run through asyncpg inside a block taken
    through psycopg holds the same lock)."""
    return url.set(drivername=url.get_backend_name()).render_as_string(hide_password=True)
