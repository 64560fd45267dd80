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

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Protocol

from sqlalchemy.engine import Connection, Engine

from .._errors import ConfigurationError
from .._retry import RetryPolicy
from .._urls import describe_url


class Backend(Protocol):
    """What the orchestrator needs from a database."""

    url: str
    """The URL with its password hidden: the only form logs and errors may show."""
    transactional: bool
    """True when the locked run is one transaction: a failure leaves the previous revision."""
    unreadable_hint: str
    """Appended to the error when the version cannot be read at all."""
    timeout_causes: str | None
    """What a LockTimeout on this database most likely means (None: the SQLite text)."""
    still_waiting: Callable[[], None] | None
    """Called now and then while a wait for the lock lasts (SQLite's run lock), so that
    a long wait shows in the log; set by the orchestrator."""

    @property
    def database_file(self) -> str | None:
        """The database's file, for the holder record and backups (None: a server)."""
        ...

    @property
    def run_long_lock(self) -> bool:
        """The lock outlives a transaction: a run may commit midway (autocommit blocks,
        transaction_per_migration) and still keep every other worker out."""
        ...

    def reading(self) -> AbstractContextManager[Connection]:
        """A connection for the unlocked look at the version."""
        ...

    def is_busy(self, error: BaseException) -> bool:
        """The unlocked look hit a lock: the locked pass will wait its turn instead."""
        ...

    def wait_for_running(
        self, timeout_s: float, while_waiting: Callable[[], None] | None = None
    ) -> bool:
        """If another worker is migrating now, wait (at most ``timeout_s``) until it has
        finished, without queueing for the lock; True when a run was waited for.
        ``while_waiting`` is called once a run is known to be going on, before blocking."""
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

    def try_lock(self, timeout_s: float, *, begin: bool = True) -> Connection:
        """One attempt: return the migration connection with the lock held, waiting at
        most ``timeout_s``; raise ``LockBusy`` when another worker kept the lock.
        ``begin=False`` (transaction_per_migration) asks for no transaction around the
        run where the backend would otherwise begin one.

        A connection returned inside a transaction runs the whole run in it (Alembic
        sees an external transaction); one returned outside a transaction gets
        Alembic's own transaction handling for the dialect.
        """
        ...

    def before_commit(self, connection: Connection) -> None:
        """Checks that must pass before the run commits (raise to roll back)."""
        ...

    def check_midway(self) -> None:
        """Around a commit in the middle of a run (an autocommit block, between the
        revisions of transaction_per_migration): raise if the lock that outlives the
        transaction is no longer this run's, so that the run stops there."""
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

    database_file = None
    """No file beside the database for a holder record or a backup."""
    still_waiting: Callable[[], None] | None = None
    """Unused: the server's lock wait is one statement with its own timeout."""

    @contextmanager
    def reading(self) -> Iterator[Connection]:
        with self.engine.connect() as connection:
            yield connection

    def is_busy(self, error: BaseException) -> bool:
        return False  # reading the version table never waits on a migration there

    def check_midway(self) -> None:
        pass  # the server's session lock cannot be taken away by a file operation

    def wait_for_running(
        self, timeout_s: float, while_waiting: Callable[[], None] | None = None
    ) -> bool:
        return False  # waiters queue for the server's lock and re-check one at a time

    def read_versions(self, table: str, schema: str | None) -> tuple[str, ...] | None:
        return None  # never asked: wait_for_running() never waits here

    def look_versions(
        self, connection: Connection, table: str, schema: str | None
    ) -> tuple[str, ...] | None:
        return None  # Alembic's read is one query there


@dataclass(frozen=True)
class RunOptions:
    """Everything a backend is built from."""

    policy: RetryPolicy
    lock_key: str | None
    lock_scope: str
    version_table: str
    version_table_schema: str | None


def missing_driver(url: str, error: ImportError, extra: str) -> ConfigurationError:
    """The error for a server URL whose driver is not installed."""
    msg = (
        f"The database driver for {describe_url(url)} is not installed ({error}). "
        f"Install it with: pip install 'alembic-sqlite-lock[{extra}]'"
    )
    return ConfigurationError(msg)


def refuse_handed_in(shown: str) -> ConfigurationError:
    """A connection handed in on a database whose backend cannot lock one yet."""
    msg = (
        f"A connection handed to env.py in config.attributes['connection'] "
        f"({shown}) is supported on SQLite only for now. Let the run make its own "
        "connections from sqlalchemy.url in alembic.ini."
    )
    return ConfigurationError(msg)
