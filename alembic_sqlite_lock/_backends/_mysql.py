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
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import secrets
from collections.abc import Callable, Mapping

from sqlalchemy import exc, text
from sqlalchemy.engine import URL, Connection, Engine, make_url

from .._errors import RAISE_DEADLINE, ConfigurationError, LockLost, LockNotTaken
from .._held import Held, bound_to, handed_down, held_here, is_ancestor, take
from .._retry import LockBusy
from .._urls import describe_url
from ._base import Backend, RunOptions, ServerBackend, migration_engine, open_server

logger = logging.getLogger(__name__)

MAX_NAME = 64  # GET_LOCK's limit on the name, in characters
_PREFIX = "alembic_sqlite_lock:"


def lock_name(database: str, version_table: str) -> str:
    name = f"{_PREFIX}{database}.{version_table}"
    if len(name) > MAX_NAME:
        name = _PREFIX + hashlib.blake2b(name.encode(), digest_size=16).hexdigest()
    return name


def migration_url(url: str | URL) -> URL:
    """``mysql://`` / ``mariadb://`` mean PyMySQL when it is installed (our ``[mysql]``)."""
    parsed = make_url(url)
    if parsed.drivername in ("mysql", "mariadb") and importlib.util.find_spec("pymysql"):
        parsed = parsed.set(drivername=f"{parsed.drivername}+pymysql")
    return parsed


def create_engine(section: Mapping[str, str]) -> Engine:
    return migration_engine(section, migration_url(section["sqlalchemy.url"]), extra="mysql")


class MySQLBackend(ServerBackend):
    transactional = False
    unreadable_hint = (
        "Check that the server is up and reachable, that the database named in the URL "
        "exists, and that this user may connect to it."
    )

    def __init__(self, section: Mapping[str, str], options: RunOptions) -> None:
        self.url = describe_url(section["sqlalchemy.url"])
        if options.lock_key:
            if len(options.lock_key) > MAX_NAME:
                msg = (
                    f"Setting lock_key is the GET_LOCK name on MySQL and may have at most "
                    f"{MAX_NAME} characters, got {len(options.lock_key)}."
                )
                raise ConfigurationError(msg)
            self.name = options.lock_key
        else:
            database = options.version_table_schema or make_url(
                section["sqlalchemy.url"]
            ).database or ""
            self.name = lock_name(database, options.version_table)
        self.engine = create_engine(section)
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
        if not self._logged:
            self._logged = True
            logger.info("MySQL lock name %r (GET_LOCK on a dedicated connection)", self.name)
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

    def _get_lock(self, timeout_s: float) -> tuple[Connection, int]:
        """GET_LOCK on a new connection of its own: that connection and its id."""
        # AUTOCOMMIT: the lock connection never holds a transaction open.
        lock_connection = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        got = None
        try:
            got, holder_id = lock_connection.execute(
                # A negative timeout would mean "forever"; fractions work on MariaDB
                # and are rounded by MySQL.
                text("SELECT GET_LOCK(:name, :timeout), CONNECTION_ID()"),
                {"name": self.name, "timeout": max(0.0, round(timeout_s, 3))},
            ).one()
            if got is None:
                msg = (
                    f"GET_LOCK('{self.name}') on {self.url} returned NULL: the server "
                    "failed to take the lock (out of memory, or the connection was killed "
                    "while waiting)."
                )
                raise LockNotTaken(msg, url=self.url, lock_name=self.name)
            if int(got) != 1:
                raise LockBusy(f"GET_LOCK('{self.name}') timed out")
        except BaseException:
            self._let_go(lock_connection, held=got is not None and int(got) == 1)
            raise
        return lock_connection, int(holder_id)

    # migration_lock(): the same name, on a connection of its own ----------------------
    def hold(
        self,
        timeout_s: float,
        *,
        still_waiting: Callable[[], None] | None = None,  # the wait is one statement here
    ) -> Held:
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
        return ("mysql", self.engine.url.render_as_string(hide_password=True), self.name)

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

    def close(self) -> None:
        self.engine.dispose()

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


def open_backend(
    section: Mapping[str, str] | None, handed_in: Connection | None, options: RunOptions
) -> Backend:
    """This module's entry in the registry (``_backends.BACKENDS``)."""
    return open_server(MySQLBackend, section, handed_in, options)
