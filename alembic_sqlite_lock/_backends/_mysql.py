"""MySQL and MariaDB: ``GET_LOCK`` on a dedicated connection.

MySQL commits implicitly before and after every DDL statement, so no transaction can
hold a migration run together, and a lock tied to the migration's transaction would be
let go by the first CREATE TABLE. ``GET_LOCK`` is a named lock owned by a *session*: it
is taken on a connection of its own that does nothing else, held while another
connection runs the migrations, and released with ``RELEASE_LOCK`` on every way out.
When the worker dies its lock connection closes and the server frees the lock.

The migrations run with Alembic's normal handling for this dialect: each revision in
its own transaction, together with its version-row update. A failing revision leaves
the revisions before it applied (the version row names the last of them), plus any DDL
statements of the failing revision that ran before the error.

The lock name is server-wide, so it includes the database (schema) and version table;
the ``lock_key`` setting replaces it (64 characters at most).

A connection handed in through ``config.attributes["connection"]`` gets ``GET_LOCK`` with
the same name on that connection itself (:class:`MySQLHandedIn`): no second connection
is opened from the caller's engine.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

from sqlalchemy import exc, text
from sqlalchemy.engine import URL, Connection, Engine, make_url

from .._errors import (
    RAISE_DEADLINE,
    ConfigurationError,
    LockLost,
    LockNotTaken,
    MigrationLockError,
)
from .._held import Held, bound_to, handed_down, held_here, is_ancestor, take
from .._retry import LockBusy
from .._urls import describe_url
from ._base import Backend, RunOptions, block_url, open_server
from ._drivers import DrivenServer, T, route, server_engine

logger = logging.getLogger(__name__)

MAX_NAME = 64  # GET_LOCK's limit on the name, in characters
_PREFIX = "alembic_sqlite_lock:"


def lock_name(database: str, version_table: str) -> str:
    name = f"{_PREFIX}{database}.{version_table}"
    if len(name) > MAX_NAME:
        name = _PREFIX + hashlib.blake2b(name.encode(), digest_size=16).hexdigest()
    return name


def migration_url(url: str | URL) -> URL:
    """The URL a run connects with: ``mysql://`` / ``mariadb://`` mean PyMySQL when it
    is installed (our ``[mysql]``); an async driver gives way to an installed
    synchronous one (see ``_drivers``)."""
    return route(url).url


def get_lock(connection: Connection, name: str, url: str, timeout_s: float) -> int:
    """``GET_LOCK(name)`` on ``connection``; its connection id once held. Raises
    LockNotTaken (NULL: the server could not take it) or LockBusy (timed out), and then
    the lock is not held."""
    got, holder_id = connection.execute(
        # A negative timeout would mean "forever"; fractions work on MariaDB and are
        # rounded by MySQL.
        text("SELECT GET_LOCK(:name, :timeout), CONNECTION_ID()"),
        {"name": name, "timeout": max(0.0, round(timeout_s, 3))},
    ).one()
    if got is None:
        msg = (
            f"GET_LOCK('{name}') on {url} returned NULL: the server failed to take the "
            "lock (out of memory, or the connection was killed while waiting)."
        )
        raise LockNotTaken(msg, url=url, lock_name=name)
    if int(got) != 1:
        raise LockBusy(f"GET_LOCK('{name}') timed out")
    return int(holder_id)


def create_engine(section: Mapping[str, str]) -> Engine:
    return server_engine(section, route(section["sqlalchemy.url"]), "mysql")


class MySQLBackend(DrivenServer):
    transactional = False
    unreadable_hint = (
        "Check that the server is up and reachable, that the database named in the URL "
        "exists, and that this user may connect to it."
    )

    def __init__(self, section: Mapping[str, str], options: RunOptions) -> None:
        self.url = describe_url(section["sqlalchemy.url"])
        self._setup(options, make_url(section["sqlalchemy.url"]).database)
        self.engine = create_engine(section)

    def _setup(self, options: RunOptions, database: str | None) -> None:
        if options.lock_key:
            if len(options.lock_key) > MAX_NAME:
                msg = (
                    f"Setting lock_key is the GET_LOCK name on MySQL and may have at most "
                    f"{MAX_NAME} characters, got {len(options.lock_key)}."
                )
                raise ConfigurationError(msg)
            self.name = options.lock_key
        else:
            self.name = lock_name(options.version_table_schema or database or "",
                                  options.version_table)
        self._held: dict[int, tuple[Connection | None, int]] = {}
        """Per migration connection: its lock connection and that one's id (None, 0: a
        run inside this flow's migration_lock() block, which holds the lock; None and
        the wrapper's connection id: a run under an `exec`, checked before COMMIT)."""
        self._logged = False

    def timeout_causes(self, lock_file: str | None) -> str:
        return (
            f"another connection held GET_LOCK('{self.name}') the whole time. Likely "
            "causes: another worker is stuck in a long migration. `SELECT "
            f"IS_USED_LOCK('{self.name}')` gives the holder's connection id; SHOW "
            "PROCESSLIST shows what it does; KILL <id> ends it and frees the lock. If a "
            f"migration legitimately takes longer, {RAISE_DEADLINE}"
        )

    run_long_lock = True
    """GET_LOCK lives on its own connection, whatever the migration commits."""

    def try_lock(
        self,
        timeout_s: float,
        *,
        begin: bool = True,
        still_waiting: Callable[[], None] | None = None,  # the wait is one statement here
    ) -> Connection:
        self._log_name("on a dedicated connection")
        wrapper: list[int] = []
        if held_here(self._block_key(), lambda: self._inherited(wrapper)):
            # This flow's migration_lock() block, or the `exec` this process runs under,
            # holds GET_LOCK on its own connection (taking it here would wait for
            # ourselves): it keeps others out.
            logger.debug("GET_LOCK('%s') is held by the enclosing migration_lock() block "
                         "or exec", self.name)
            migration = self.engine.connect()
            self._held[id(migration)] = (None, wrapper[0] if wrapper else 0)
            return migration
        lock_connection, holder_id = self._get_lock(timeout_s)
        try:
            migration = self.engine.connect()
        except BaseException:
            self._let_go(lock_connection, held=True)
            raise
        self._held[id(migration)] = (lock_connection, holder_id)
        return migration

    def _log_name(self, where: str) -> None:
        if not self._logged:
            self._logged = True
            logger.info("MySQL lock name %r (GET_LOCK %s)", self.name, where)

    def _get_lock(self, timeout_s: float) -> tuple[Connection, int]:
        """GET_LOCK on a new connection of its own: that connection and its id."""
        # AUTOCOMMIT: the lock connection never holds a transaction open.
        lock_connection = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        try:
            holder_id = get_lock(lock_connection, self.name, self.url, timeout_s)
        except BaseException:
            self._let_go(lock_connection, held=False)  # get_lock raises only unheld
            raise
        return lock_connection, holder_id

    # migration_lock(): the same name, on a connection of its own ----------------------
    def _hold(self, timeout_s: float) -> Held:
        # A second name, random, on the same connection: a command's check that one
        # connection holds both binds the claim to this connection (a connection id
        # alone could be another, later connection's).
        nonce = f"alembic-sqlite-lock exec {secrets.token_hex(16)}"

        def lock() -> Callable[[], None]:
            lock_connection, _holder = self._get_lock(timeout_s)
            try:
                lock_connection.execute(text("SELECT GET_LOCK(:name, 0)"), {"name": nonce})
            except BaseException:
                self._let_go(lock_connection, held=True)
                raise
            return lambda: self._let_go(lock_connection, held=True)  # closing frees both

        held = take(self._block_key(), lock, inherited=lambda: self._inherited([]))
        if not held.nested:
            held.for_child = {"dialect": "mysql", "name": self.name, "nonce": nonce}
        return held

    def _inherited(self, wrapper: list[int]) -> bool:
        """This process runs under an `exec` whose connection holds this lock's name, and
        that wrapper is an ancestor of this process: one connection holds both the name
        and the claim's random second name (a stale or copied variable cannot name a
        connection that holds the lock now). ``wrapper`` gets the connection id."""
        claims = [claim for claim in handed_down("mysql") if claim.get("name") == self.name
                  and isinstance(claim.get("nonce"), str) and is_ancestor(claim["pid"])]
        if not claims:
            return False
        with self.engine.connect() as connection:
            owner = self._owner(connection)
            for claim in claims:
                second = connection.execute(text("SELECT IS_USED_LOCK(:name)"),
                                            {"name": claim["nonce"]}).scalar()
                # Relied on from now: die with the chain up to the wrapper (the lock
                # dies with the wrapper's connection), and check the chain once asked.
                if (owner is not None and second is not None and int(second) == owner
                        and bound_to(claim["pid"])):
                    wrapper.append(owner)
                    return True
        return False

    def _owner(self, connection: Connection) -> int | None:
        """The id of the connection holding this lock's name (None: nobody)."""
        owner = connection.execute(text("SELECT IS_USED_LOCK(:name)"), {"name": self.name}
                                   ).scalar()
        return None if owner is None else int(owner)

    def _block_key(self) -> tuple[str, ...]:
        """The lock's identity for ``_held``: the server, and the lock's name."""
        return ("mysql", block_url(self.engine.url), self.name)

    def before_commit(self, connection: Connection) -> None:
        """The lock must still be ours: its connection could have been killed mid-run."""
        lock_connection, holder_id = self._held[id(connection)]
        if lock_connection is None and not holder_id:
            return  # the enclosing migration_lock() block's lock: its own business
        # Under an `exec`: the wrapper's connection, which dies with the wrapper.
        if self._owner(lock_connection or connection) != holder_id:
            msg = (
                f"The migration lock GET_LOCK('{self.name}') on {self.url} was lost during "
                "the run (its connection was closed or killed); another worker may have "
                "migrated at the same time. Check the schema and the version table."
            )
            raise LockLost(msg, url=self.url, lock_name=self.name)

    def release(self, connection: Connection) -> None:
        lock_connection, _holder = self._held.pop(id(connection))
        try:
            connection.close()
        finally:
            if lock_connection is not None:
                self._let_go(lock_connection, held=True)

    def _let_go(self, lock_connection: Connection, *, held: bool) -> None:
        try:
            if held:
                released = lock_connection.execute(
                    text("SELECT RELEASE_LOCK(:name)"), {"name": self.name}
                ).scalar()
                if released != 1:
                    logger.warning(
                        "RELEASE_LOCK('%s') on %s returned %r: the lock was no longer held",
                        self.name,
                        self.url,
                        released,
                    )
        except exc.DBAPIError as error:
            logger.warning(
                "RELEASE_LOCK('%s') on %s failed (%s); closing its connection frees it",
                self.name,
                self.url,
                error.orig,
            )
        finally:
            lock_connection.close()


class MySQLHandedIn(MySQLBackend):
    """``config.attributes["connection"]``: the run's migrations on the caller's
    connection (a sync Connection, or the sync face of an AsyncConnection inside
    ``run_sync()``, which its owner drives), ``GET_LOCK`` with the same name on that
    same connection: a session lock, which no COMMIT, implicit or not, lets go. No
    second connection is opened (the caller's engine may have a pool, or options a URL
    does not carry); ``RELEASE_LOCK`` ends the run, and the connection closing would.

    After the lock is taken the transaction that read the version before it ends (its
    REPEATABLE READ snapshot, MySQL's default, would predate the previous holder's
    commit). Inside the caller's transaction (``engine.begin()``) that is a COMMIT on
    the driver's connection, as is the run's last: MySQL commits at every DDL statement
    anyway, and the next worker must see the version row before the lock is released.
    SQLAlchemy's transaction stays the caller's, for its block to end."""

    def __init__(self, connection: Connection, options: RunOptions) -> None:
        self.url = describe_url(connection.engine.url)
        self.engine = connection.engine  # the caller's: never disposed here
        self.connection = connection
        self.callers = connection.in_transaction()
        self._running = False
        self._setup(options, connection.engine.url.database)

    @property
    def run_long_lock(self) -> bool:  # type: ignore[override]
        # The caller's transaction cannot be committed midway by the run.
        return not self.callers

    def _drive(self, fn: Callable[[], T]) -> T:
        return fn()  # its owner drives it (inside run_sync for an async driver)

    @contextmanager
    def reading(self) -> Iterator[Connection]:
        yield self.connection

    def try_lock(
        self,
        timeout_s: float,
        *,
        begin: bool = True,
        still_waiting: Callable[[], None] | None = None,  # the wait is one statement here
    ) -> Connection:
        self._log_name("on the handed-in connection")
        connection = self.connection
        wrapper: list[int] = []
        if held_here(self._block_key(), lambda: self._inherited(wrapper)):
            logger.debug("GET_LOCK('%s') is held by the enclosing migration_lock() block "
                         "or exec", self.name)
            self._held[id(connection)] = (None, wrapper[0] if wrapper else 0)
        else:
            try:
                holder_id = get_lock(connection, self.name, self.url, timeout_s)
            except BaseException:
                if not self.callers:
                    connection.rollback()
                raise
            self._held[id(connection)] = (connection, holder_id)
        self._running = True
        self.commit(connection)  # a new snapshot: the version as the last holder left it
        return connection

    def commit(self, connection: Connection) -> None:
        if not self.callers:
            super().commit(connection)
        elif self._running:
            connection.connection.commit()  # the driver's; the caller's block ends SQLAlchemy's

    def rollback(self, connection: Connection) -> None:
        if not self.callers:
            super().rollback(connection)
        elif self._running:
            connection.connection.rollback()
        # else the look: it read in the caller's transaction, which stays the caller's

    def release(self, connection: Connection) -> None:
        self._running = False
        lock_connection, _holder = self._held.pop(id(connection), (None, 0))
        if lock_connection is None:
            return  # the enclosing block's or exec's lock: theirs to release
        try:
            released = connection.execute(
                text("SELECT RELEASE_LOCK(:name)"), {"name": self.name}).scalar()
            if not self.callers:
                connection.commit()  # leave the connection outside any transaction
        except exc.DBAPIError as error:
            logger.warning("RELEASE_LOCK('%s') on the handed-in connection to %s failed "
                           "(%s); the lock stays held until that connection closes",
                           self.name, self.url, error.orig)
            return
        if released != 1:
            logger.warning("RELEASE_LOCK('%s') on %s returned %r: the lock was no longer "
                           "held", self.name, self.url, released)

    def autocommit_refused(self) -> MigrationLockError:
        msg = (
            "A migration uses autocommit_block(), which commits in the middle of the run, "
            f"but the connection handed in for {self.url} is inside the caller's "
            "transaction (engine.begin()), which the run may not commit. The run was "
            "stopped. Hand in engine.connect()'s connection instead."
        )
        return ConfigurationError(msg)

    def close(self) -> None:
        pass  # the connection and its engine are the caller's


def open_backend(
    section: Mapping[str, str] | None, handed_in: Connection | None, options: RunOptions
) -> Backend:
    """This module's entry in the registry (``_backends.BACKENDS``)."""
    return open_server(MySQLBackend, MySQLHandedIn, section, handed_in, options)
