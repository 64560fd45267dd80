"""PostgreSQL: an advisory lock, held across the version read and every migration.

The key is a stable 64-bit hash of (database, schema, version table), so two apps that
keep their versions apart never wait on each other; the ``lock_key`` setting replaces
it. The whole run is ONE transaction: PostgreSQL's DDL is transactional, so a failing
migration leaves the database at the revision it started from.

Two scopes (setting ``lock_scope``):

* ``session`` (default): ``pg_advisory_lock`` in a short transaction of its own, then
  the migration transaction on the same session. The server releases the lock when the
  session ends, including when the worker is killed.
* ``transaction``: ``pg_advisory_xact_lock`` inside the migration transaction, released
  by COMMIT or ROLLBACK. For connection poolers in transaction-pooling mode (PgBouncer
  ``pool_mode = transaction``), where consecutive transactions of one client may run on
  different server sessions and a session lock would stay behind on one of them.
  Session scope detects that case: after taking the lock it checks, in the next
  transaction, that its own session holds it.

Each attempt waits at most its share of the deadline (``lock_timeout`` for just that
statement), so the retry policy and ``LockTimeout`` work as on SQLite.

A killed worker: its server session ends and the lock with it, but a backend busy in a
statement notices a vanished client only when the statement ends. The migration
session sets ``client_connection_check_interval`` (PostgreSQL 14+) so that the server
checks the socket during long statements too and ends the session within a second.

A connection handed in through ``config.attributes["connection"]`` is locked with the same
key, on that connection (:class:`PostgresHandedIn`); inside the caller's transaction with
``pg_advisory_xact_lock``, held until the caller commits.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

from sqlalchemy import exc, text
from sqlalchemy.engine import URL, Connection, Engine, NestedTransaction

from .._errors import RAISE_DEADLINE, ConfigurationError, LockLost, MigrationLockError
from .._held import Held, bound_to, handed_down, held_here, is_ancestor, take
from .._retry import LockBusy
from .._urls import describe_url
from ._base import Backend, RunOptions, block_url, open_server
from ._drivers import DrivenServer, Route, T, route, server_engine

logger = logging.getLogger(__name__)

CLIENT_CHECK_INTERVAL_MS = 1000
"""How often a backend busy in a migration statement checks that its client is alive."""

_LOCK_NOT_AVAILABLE = "55P03"  # SQLSTATE of a lock_timeout expiry
_INT64 = 1 << 64


def key_for(database: str, schema: str, version_table: str) -> int:
    """The advisory lock key: stable across processes, hosts and Python versions."""
    return _hash64(f"alembic_sqlite_lock\0{database}\0{schema}\0{version_table}")


def key_from_setting(value: str) -> int:
    """``lock_key``: a signed 64-bit integer as written, or any other text hashed."""
    try:
        number = int(value)
    except ValueError:
        return _hash64(f"alembic_sqlite_lock\0{value}")
    if not -(1 << 63) <= number < (1 << 63):
        msg = f"Setting lock_key must fit PostgreSQL's bigint (64-bit signed), got {value}."
        raise ConfigurationError(msg)
    return number


def _hash64(text_: str) -> int:
    digest = hashlib.blake2b(text_.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def migration_url(url: str | URL) -> URL:
    """The URL a run connects with: ``postgresql://`` means psycopg (3) when it is
    installed (our ``[postgresql]``); an async driver gives way to an installed
    synchronous one (see ``_drivers``)."""
    return route(url).url


def create_engine(section: Mapping[str, str], extra: str) -> Engine:
    chosen: Route = route(section["sqlalchemy.url"])
    options: dict[str, object] = {}
    if chosen.url.get_driver_name() in ("psycopg", "psycopg_async"):
        # psycopg 3 prepares a statement it runs 5 times on a connection (_pg3_0...).
        # Behind a transaction pooler (PgBouncer < 1.21) the prepared statement stays on
        # the pooled server session, and the next run that prepares one under that name
        # there fails (DuplicatePreparedStatement). A migration gains nothing from it.
        options["connect_args"] = {"prepare_threshold": None}
    return server_engine(
        section, chosen, extra,
        # The version is read after the lock is taken; under REPEATABLE READ the
        # snapshot could predate the previous holder's commit.
        isolation_level="READ COMMITTED",
        **options,
    )


class PostgresBackend(DrivenServer):
    transactional = True
    unreadable_hint = (
        "Check that the server is up and reachable, that the database named in the URL "
        "exists, and that this user may connect to it."
    )
    _timeout_causes = (
        "another session held the migration's advisory lock (its key is logged at start) "
        "the whole time. Likely causes: another worker is stuck in a long migration, or "
        "a session that took the lock never ended (a pooler keeping a server connection "
        "alive: use lock_scope = transaction behind PgBouncer in transaction mode). Find "
        "the holder with `SELECT pid, state, query FROM pg_stat_activity WHERE pid IN "
        "(SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted)`; "
        "`SELECT pg_terminate_backend(pid)` ends it and frees the lock."
    )

    def __init__(self, section: Mapping[str, str], options: RunOptions) -> None:
        self.url = describe_url(section["sqlalchemy.url"])
        self.engine = create_engine(section, "postgresql")
        self._setup(options)

    def _setup(self, options: RunOptions) -> None:
        self.options = options
        self.session_scope = options.lock_scope == "session"
        self._key = key_from_setting(options.lock_key) if options.lock_key else None
        self._logged = False
        self._nested: dict[int, int | None] = {}
        """Migration connections of runs inside this flow's migration_lock() block (None)
        or under an `exec` (the wrapper's session, checked again before COMMIT)."""

    @property
    def _scope(self) -> str:
        return self.options.lock_scope

    def timeout_causes(self, lock_file: str | None) -> str:
        return f"{self._timeout_causes} If a migration legitimately takes longer, {RAISE_DEADLINE}"

    @property
    def run_long_lock(self) -> bool:
        # A session lock survives commits; a transaction-level one ends with the first.
        return self.session_scope

    def try_lock(
        self,
        timeout_s: float,
        *,
        begin: bool = True,
        still_waiting: Callable[[], None] | None = None,  # the wait is one statement here
    ) -> Connection:
        connection = self.engine.connect()
        try:
            self._lock_on(connection, timeout_s, session=self.session_scope)
        except BaseException:
            connection.close()  # ends the session: a lock taken in it goes too
            raise
        return connection

    def _lock_on(self, connection: Connection, timeout_s: float, *, session: bool) -> None:
        """Take the lock on ``connection``, the migration connection (``session``: a
        session lock); nothing when this flow's migration_lock() block or the `exec`
        this process runs under holds it already."""
        _check_client(connection)
        key = self._lock_key(connection)
        wrapper: list[int] = []
        if held_here(self._block_key(key),
                     lambda: self._inherited(connection, key, wrapper)):
            # This flow's migration_lock() block, or the `exec` this process runs
            # under, holds the key on its own session (taking it here would wait for
            # ourselves): it keeps others out.
            logger.debug("Advisory lock %d is held by the enclosing migration_lock() "
                         "block or exec", key)
            self._nested[id(connection)] = wrapper[0] if wrapper else None
            return
        if session:
            self._still_held(connection, key, before_take=True)
        _take(connection, key, timeout_s, session=session)
        if session:
            # The lock is the session's: the migration transaction starts after it,
            # so its first read sees every commit of the previous holder.
            connection.commit()
            self._still_held(connection, key)
            _check_client(connection)

    def before_commit(self, connection: Connection) -> None:
        """Under an `exec`, the wrapper's session must hold the lock still: a wrapper
        that died took its session, and the lock, with it."""
        session = self._nested.get(id(connection))
        if session is not None and self._key is not None and not _session_holds(
            connection, self._key, session
        ):
            msg = (
                f"The migration lock (advisory lock {self._key}) on {self.url} held for "
                f"this command by `alembic-sqlite-lock exec` (session {session}) was lost "
                "during the run: the wrapper or its session ended. The run was rolled "
                "back; run the command again."
            )
            raise LockLost(msg, url=self.url, lock_name=str(self._key))

    def release(self, connection: Connection) -> None:
        nested = id(connection) in self._nested
        self._nested.pop(id(connection), None)
        try:
            if self.session_scope and self._key is not None and not nested:
                connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": self._key})
                connection.commit()
        except exc.DBAPIError as error:
            logger.debug("pg_advisory_unlock failed (%s); closing the session frees it", error)
        finally:
            connection.close()

    # migration_lock(): the same key, on a session of its own ---------------------------
    def _hold(self, timeout_s: float) -> Held:
        connection = self.engine.connect()
        try:
            key = self._lock_key(connection)
            held = take(self._block_key(key), lambda: self._hold_on(connection, key, timeout_s),
                        inherited=lambda: self._inherited(connection, key, []))
            if held.nested:
                connection.close()
            else:
                # A second lock with a random key, on the same session and scope: a
                # command's check that one session holds both binds the claim to this
                # session (a backend pid alone could be another, later session's).
                nonce = _hash64(secrets.token_hex(16))
                name = "pg_try_advisory_lock" if self.session_scope else (
                    "pg_try_advisory_xact_lock")
                connection.execute(text(f"SELECT {name}(:key)"), {"key": nonce})
                if self.session_scope:
                    connection.commit()  # idle between statements, as _hold_on left it
                held.for_child = {"dialect": "postgresql", "key": key, "nonce": nonce}
        except BaseException:
            connection.close()  # ends the session: a lock taken in it goes too
            raise
        return held

    def _hold_on(self, connection: Connection, key: int, timeout_s: float) -> Callable[[], None]:
        """Session scope: a session lock, the connection idle outside any transaction.
        Transaction scope (a transaction pooler): a transaction-level lock in a
        transaction left open for the whole block, which pins the server session."""
        if self.session_scope:
            self._still_held(connection, key, before_take=True)
        _take(connection, key, timeout_s, session=self.session_scope)
        if self.session_scope:
            connection.commit()
            self._still_held(connection, key)
            connection.commit()

        def release() -> None:
            try:
                if self.session_scope:
                    connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
                    connection.commit()
                else:
                    connection.rollback()
            except exc.DBAPIError as error:
                logger.debug("Releasing the advisory lock failed (%s); closing the session "
                             "frees it", error)
            finally:
                connection.close()

        return release

    def _block_key(self, key: int) -> tuple[str, ...]:
        """The lock's identity for ``_held``: the server and database, and the key."""
        return ("postgresql", block_url(self.engine.url), str(key))

    def _inherited(self, connection: Connection, key: int, wrapper: list[int]) -> bool:
        """This process runs under an `exec` whose session holds ``key`` on this
        database, and that wrapper is an ancestor of this process: one session holds
        both ``key`` and the claim's random second key (a stale or copied variable
        cannot name a session that holds the lock now). ``wrapper`` gets the session,
        for the check before COMMIT."""
        for claim in handed_down("postgresql"):
            nonce = claim.get("nonce")
            if claim.get("key") != key or not isinstance(nonce, int):
                continue
            if not is_ancestor(claim["pid"]):
                continue
            session = _session_holding_both(connection, key, nonce)
            # Relied on from now: die with the chain up to the wrapper (the lock dies
            # with the wrapper's session), and check the chain once that is asked.
            if session is not None and bound_to(claim["pid"]):
                wrapper.append(session)
                return True
        return False

    def _lock_key(self, connection: Connection) -> int:
        if self._key is None:
            database, schema = connection.execute(
                text("SELECT current_database(), current_schema()")
            ).one()
            schema = self.options.version_table_schema or schema or ""
            self._key = key_for(database, schema, self.options.version_table)
            where = f"database {database}, schema {schema}, version table " + (
                self.options.version_table
            )
        else:
            where = f"lock_key setting {self.options.lock_key!r}"
        if not self._logged:
            self._logged = True
            logger.info(
                "PostgreSQL advisory lock key %d (%s, %s scope)",
                self._key,
                where,
                self._scope,
            )
        return self._key

    def _still_held(self, connection: Connection, key: int, *, before_take: bool = False
                    ) -> None:
        """Session scope: the next transaction must run on the session holding the lock.

        ``before_take``: the session must not hold it yet. A new session never does, but
        a transaction pooler may hand this client the server session on which another
        client took it, and there pg_advisory_lock would succeed at once (it is
        re-entrant) while that client holds it. Under contention that is the usual case:
        the other server sessions wait in pg_advisory_lock, so the pooler's only free one
        is the holder's, and the check after the take alone would pass."""
        if _session_holds(connection, key, None) == before_take:
            found = (
                f"The advisory lock on {self.url} is already held by the server session "
                "this run was given, before this run took it (another client took it "
                "there)" if before_take else
                f"The advisory lock taken on {self.url} is not held by the session the "
                "migration would run on"
            )
            msg = (
                f"{found}: the connection goes through a pooler in "
                "transaction-pooling mode (PgBouncer pool_mode = transaction), where a "
                "session-level lock is unsafe. Set lock_scope = transaction (in the "
                "[alembic_sqlite_lock] section of alembic.ini, or -x lock_scope=transaction), "
                "or connect to PostgreSQL directly. "
                + ("Nothing was run." if before_take else
                   "The lock taken may stay held on a pooled server connection until the "
                   "pooler closes it.")
            )
            raise ConfigurationError(msg)


class PostgresHandedIn(PostgresBackend):
    """``config.attributes["connection"]``: the run's lock and migrations on the caller's
    connection (a sync Connection, or the sync face of an AsyncConnection inside
    ``run_sync()``, which its owner drives), locked with the same key.

    From ``engine.connect()``: as a connection of our own, the lock taken and released
    on it (``lock_scope`` as set), the connection left outside any transaction after.
    Inside the caller's transaction (``engine.begin()``, Alembic's cookbook): the lock
    is ``pg_advisory_xact_lock`` whatever ``lock_scope`` says, as only the caller's
    COMMIT makes the migration visible to the next worker, and the lock must last until
    then; the run goes in a SAVEPOINT, released on success (the caller's block commits
    it all) or rolled back on failure. That transaction's snapshot must not predate the
    lock: READ COMMITTED (PostgreSQL's default) only."""

    def __init__(self, connection: Connection, options: RunOptions) -> None:
        self.url = describe_url(connection.engine.url)
        self.engine = connection.engine  # the caller's: never disposed here
        self.connection = connection
        self.callers = connection.in_transaction()
        self._savepoint: NestedTransaction | None = None
        self._setup(options)

    @property
    def run_long_lock(self) -> bool:
        # The caller's transaction cannot be committed midway by the run.
        return not self.callers and self.session_scope

    @property
    def _scope(self) -> str:
        return "transaction (inside the caller's transaction)" if self.callers else (
            self.options.lock_scope)

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
        still_waiting: Callable[[], None] | None = None,
    ) -> Connection:
        connection = self.connection
        if self.callers:
            self._read_committed(connection)
            savepoint = connection.begin_nested()
            try:
                # A lock_timeout expiry fails the statement: the savepoint keeps the
                # caller's transaction usable for the next attempt.
                self._lock_on(connection, timeout_s, session=False)
            except BaseException:
                savepoint.rollback()
                raise
            self._savepoint = savepoint
            return connection
        try:
            if not self.session_scope:
                # Its engine may run REPEATABLE READ: the snapshot of the transaction
                # that takes the lock must be taken after it.
                connection.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
            self._lock_on(connection, timeout_s, session=self.session_scope)
        except BaseException:
            connection.rollback()  # a transaction-level lock taken goes with it
            raise
        return connection

    def _read_committed(self, connection: Connection) -> None:
        level = connection.exec_driver_sql("SHOW transaction_isolation").scalar()
        if level != "read committed":
            msg = (
                "The connection handed to env.py in config.attributes['connection'] "
                f"({self.url}) is inside a {str(level).upper()} transaction, whose "
                "snapshot predates the migration lock: it would not see another "
                "worker's migration. Nothing was migrated. Hand in engine.connect()'s "
                "connection, or begin the transaction READ COMMITTED (PostgreSQL's "
                "default)."
            )
            raise ConfigurationError(msg)

    def commit(self, connection: Connection) -> None:
        if not self.callers:
            super().commit(connection)
        elif self._savepoint is not None and self._savepoint.is_active:
            self._savepoint.commit()  # the caller's COMMIT makes it visible, lock held

    def rollback(self, connection: Connection) -> None:
        if not self.callers:
            super().rollback(connection)
        elif self._savepoint is not None and self._savepoint.is_active:
            self._savepoint.rollback()
        # else the look: it read in the caller's transaction, which stays the caller's

    def release(self, connection: Connection) -> None:
        nested = id(connection) in self._nested
        self._nested.pop(id(connection), None)
        self._savepoint = None
        if self.callers or not self.session_scope or nested or self._key is None:
            return  # a transaction-level lock ended with the transaction (or none taken)
        try:
            connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": self._key})
            connection.commit()
        except exc.DBAPIError as error:
            logger.warning("pg_advisory_unlock on the handed-in connection failed (%s); the "
                           "lock stays held until that session ends", error)

    def autocommit_refused(self) -> MigrationLockError:
        if not self.callers:
            return super().autocommit_refused()
        msg = (
            "A migration uses autocommit_block(), which commits in the middle of the run, "
            f"but the connection handed in for {self.url} is inside the caller's "
            "transaction (engine.begin()), which the run may not commit. The run was "
            "rolled back. Hand in engine.connect()'s connection instead."
        )
        return ConfigurationError(msg)

    def close(self) -> None:
        pass  # the connection and its engine are the caller's


def _session_holds(connection: Connection, key: int, session: int | None) -> bool:
    """The session ``session`` (None: this connection's) holds the advisory lock ``key``
    on this connection's database."""
    unsigned = key % _INT64
    return bool(connection.execute(
        text(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND pid = coalesce(:session, pg_backend_pid()) AND classid::bigint = :hi "
            "AND objid::bigint = :lo AND objsubid = 1 AND database = "
            "(SELECT oid FROM pg_database WHERE datname = current_database())"
        ),
        {"session": session, "hi": unsigned >> 32, "lo": unsigned & 0xFFFFFFFF},
    ).scalar())


def _session_holding_both(connection: Connection, key: int, nonce: int) -> int | None:
    """The session that holds both advisory locks on this database, if one does."""
    unsigned, second = key % _INT64, nonce % _INT64
    session = connection.execute(
        text(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND objsubid = 1 AND database = "
            "(SELECT oid FROM pg_database WHERE datname = current_database()) "
            "AND ((classid::bigint = :hi AND objid::bigint = :lo) "
            "OR (classid::bigint = :nhi AND objid::bigint = :nlo)) "
            "GROUP BY pid HAVING count(DISTINCT (classid, objid)) = 2"
        ),
        {"hi": unsigned >> 32, "lo": unsigned & 0xFFFFFFFF,
         "nhi": second >> 32, "nlo": second & 0xFFFFFFFF},
    ).scalar()
    return None if session is None else int(session)


def _check_client(connection: Connection) -> None:
    """Make the server notice a killed worker even in the middle of a long statement."""
    if (connection.dialect.server_version_info or (0,)) >= (14,):
        connection.execute(
            text("SELECT set_config('client_connection_check_interval', :ms, true)"),
            {"ms": str(CLIENT_CHECK_INTERVAL_MS)},
        )


def _take(connection: Connection, key: int, timeout_s: float, *, session: bool) -> None:
    """Take the lock, waiting at most ``timeout_s``; LockBusy when it stayed held."""
    name = "pg_advisory_lock" if session else "pg_advisory_xact_lock"
    wait_ms = int(timeout_s * 1000)
    if wait_ms < 1:
        # lock_timeout = 0 would mean "wait forever": ask without waiting instead.
        try_name = name.replace("pg_", "pg_try_", 1)
        got = connection.execute(text(f"SELECT {try_name}(:key)"), {"key": key}).scalar()
        if not got:
            raise LockBusy("the advisory lock is held by another session")
        return
    previous = connection.execute(text("SELECT current_setting('lock_timeout')")).scalar()
    connection.execute(
        text("SELECT set_config('lock_timeout', :v, true)"), {"v": f"{wait_ms}ms"}
    )
    try:
        connection.execute(text(f"SELECT {name}(:key)"), {"key": key})
    except exc.DBAPIError as error:
        if getattr(error.orig, "sqlstate", None) == _LOCK_NOT_AVAILABLE:
            raise LockBusy(str(error.orig)) from error
        raise
    # Back to the session's own lock_timeout for the migration's statements.
    connection.execute(text("SELECT set_config('lock_timeout', :v, true)"), {"v": previous})


def open_backend(
    section: Mapping[str, str] | None, handed_in: Connection | None, options: RunOptions
) -> Backend:
    """This module's entry in the registry (``_backends.BACKENDS``)."""
    return open_server(PostgresBackend, PostgresHandedIn, section, handed_in, options)
