"""SQLite: the migration lock is SQLite's own write lock, taken with BEGIN IMMEDIATE.

Why BEGIN IMMEDIATE: a plain (DEFERRED) BEGIN takes no lock until the first write, so two
workers can both read "no version yet" and both start migrating; EXCLUSIVE would also
block readers, so a restart would stall the app's reads for the length of a migration.
IMMEDIATE takes the RESERVED lock at once: exactly one writer, readers carry on, and
SQLite releases it when the transaction ends or the process dies (no stale lock rows).

Never open or close the database file outside SQLite: POSIX drops all of a process's
fcntl locks on a file when *any* descriptor of that file is closed, which would silently
release the lock SQLite holds for us.
"""

from __future__ import annotations

import logging
import os
import re
import sqlite3
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

from sqlalchemy import event, exc
from sqlalchemy.engine import URL, Connection, Engine, make_url

from ... import _sidefile
from ..._errors import RAISE_DEADLINE, ConfigurationError, LockFileUnusable, MigrationLockError
from ..._held import Held, held_here, take
from ..._retry import LockBusy, RetryPolicy
from ..._settings import Settings
from ..._urls import describe_url
from .._base import SideFiles, autocommit_refused, migration_engine
from . import _diagnose, _holder
from ._runlock import RunLock, Unusable, inherited, lock_path_for
from ._sidecar import Sidecar

logger = logging.getLogger(__name__)

READ_ONLY_OPTION = "alembic_sqlite_lock_read_only"
"""Execution option marking a connection that only looks at the version (DEFERRED)."""

WRITER_OPTION = "alembic_sqlite_lock_writer"
"""Execution option marking the run's own connection: the only one whose transactions
take SQLite's write lock (BEGIN IMMEDIATE)."""

_READERS: weakref.WeakSet[Engine] = weakref.WeakSet()
"""Migration engines that handed a connection to someone else during a run (a revision's
``sa.inspect(op.get_bind().engine)``): a failed write on one of them gets a hint."""

READER_WROTE = "attempt to write a readonly database"

_BUSY_CODES = {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED}


def is_busy(error: BaseException) -> bool:
    """True when ``error`` means another connection holds a lock SQLite needs."""
    if isinstance(error, exc.DBAPIError) and error.orig is not None:
        error = error.orig
    if not isinstance(error, sqlite3.OperationalError):
        return False
    code = getattr(error, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in _BUSY_CODES
    text = str(error).lower()
    return "database is locked" in text or "database table is locked" in text


SAME_FILE_DRIVERS = ("aiosqlite",)
"""SQLite drivers whose files pysqlite reads and writes just the same."""


def migration_url(url: str | URL) -> URL:
    """The URL we migrate through: always the synchronous pysqlite driver.

    An app may use ``sqlite+aiosqlite://``; the lock is SQLite's, whatever the driver,
    so migrating the same file through pysqlite is equivalent and keeps this code sync.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.get_driver_name() == "pysqlite":
        return parsed
    if parsed.get_driver_name() not in SAME_FILE_DRIVERS:
        # pysqlcipher and the like: through sqlite3 an encrypted file is unreadable, and
        # a missing one would be created unencrypted.
        msg = (
            f"{describe_url(parsed)} uses the {parsed.get_driver_name()} driver; the "
            "migration lock works through the standard sqlite3 module, which opens "
            "plain SQLite files only (an encrypted one would be unreadable, and a new one "
            "would be created unencrypted). Nothing was migrated. Use sqlite:// or "
            "sqlite+aiosqlite:// URLs with alembic-sqlite-lock, or Alembic's stock env.py "
            "for this database."
        )
        raise ConfigurationError(msg)
    return parsed.set(drivername="sqlite")


def create_engine(section: Mapping[str, str]) -> Engine:
    """An engine whose transactions start with BEGIN IMMEDIATE (the SQLAlchemy recipe).

    ``section`` is the alembic.ini section holding ``sqlalchemy.url`` and friends.
    """
    engine = migration_engine(
        section, migration_url(section["sqlalchemy.url"]),
        # pysqlite's own transaction handling issues a deferred BEGIN before DML only
        # (and none before DDL); isolation_level=None turns it off so that the BEGIN
        # we emit below is the only one.
        connect_args={"isolation_level": None},
    )
    event.listen(engine, "connect", _on_connect)
    event.listen(engine, "begin", _on_begin)
    return engine


def _on_connect(dbapi_connection: Any, _record: Any) -> None:
    # PRAGMA foreign_keys is a no-op inside a transaction, so it is set here, before
    # BEGIN. OFF is SQLite's documented procedure for schema changes: a batch rebuild
    # (copy, DROP, RENAME) of a parent table would otherwise cascade-delete its children.
    # foreign_key_check() runs before COMMIT instead.
    dbapi_connection.execute("PRAGMA foreign_keys = OFF")


def _on_begin(connection: Connection) -> None:
    """The run's own connection begins with BEGIN IMMEDIATE (the write lock), a look at
    the version with BEGIN DEFERRED. Any other connection of the engine is one a
    revision opened itself (``sa.inspect(op.get_bind().engine)``, a common idiom): it
    reads as under stock Alembic, statement by statement with no transaction (one left
    open would hold a SHARED lock that blocks the run's own COMMIT in rollback-journal
    mode), and may not write (``query_only``): a write would wait for the run's write
    lock, which the run holds until the revision returns, and fail as "locked" seconds
    later; it fails at once instead, and the error says why."""
    options = connection.get_execution_options()
    if options.get("isolation_level") == "AUTOCOMMIT":
        return
    dbapi = _dbapi(connection)
    if dbapi.in_transaction:
        return
    if options.get(READ_ONLY_OPTION):
        dbapi.execute("PRAGMA query_only = 0")  # the pooled connection may have been a reader
        connection.exec_driver_sql("BEGIN DEFERRED")
    elif options.get(WRITER_OPTION):
        dbapi.execute("PRAGMA query_only = 0")
        connection.exec_driver_sql("BEGIN IMMEDIATE")
    else:
        dbapi.execute("PRAGMA query_only = 1")
        _READERS.add(connection.engine)


def set_busy_timeout(connection: Connection, seconds: float) -> None:
    """How long SQLite's busy handler retries before a statement fails as locked."""
    _dbapi(connection).execute(f"PRAGMA busy_timeout = {round(seconds * 1000)}")


def begin_write(
    connection: Connection, busy_timeout_s: float, *, owned: bool, callers: bool = False
) -> None:
    """Start the migration transaction, holding SQLite's write lock from now on.

    Raises LockBusy when another connection kept the lock for ``busy_timeout_s``.
    ``owned`` connections come from :func:`create_engine`, whose ``begin`` listener
    emits BEGIN IMMEDIATE; a connection handed in by the user gets it emitted here.
    ``callers``: the handed-in connection is inside the caller's SQLAlchemy transaction
    (``engine.begin()``), which has sent nothing to SQLite yet: only SQLite's
    transaction is begun.
    """
    set_busy_timeout(connection, busy_timeout_s)
    try:
        if not owned:
            _dbapi(connection).execute("BEGIN IMMEDIATE")
        if not callers:
            connection.begin()
    except (exc.OperationalError, sqlite3.OperationalError) as error:
        if is_busy(error):
            raise LockBusy(str(error)) from error
        if not owned and "within a transaction" in str(error):
            _dbapi(connection).rollback()  # our BEGIN IMMEDIATE: nothing ran in it
            raise _own_begin_listener(connection) from error
        raise


def _own_begin_listener(connection: Connection) -> ConfigurationError:
    """A handed-in connection whose engine emits BEGIN itself (a ``begin`` listener)."""
    msg = (
        "The connection handed in through config.attributes['connection'] for "
        f"{describe_url(connection.engine.url)} comes from an engine that emits its own "
        "BEGIN when a transaction starts (a 'begin' event listener, as in SQLAlchemy's "
        "pysqlite recipe), so the migration cannot start the BEGIN IMMEDIATE that takes "
        "the lock. Nothing was migrated. Hand in a connection of an engine without that "
        "listener (create_engine(url); engine.connect()), or hand in none and let the "
        "library open its own."
    )
    return ConfigurationError(msg)


_FOREIGN_KEYS_PRAGMA = re.compile(r"^\s*PRAGMA\s+(?:\w+\.)?foreign_keys\s*=", re.IGNORECASE)


def warn_on_ignored_pragmas(
    connection: Connection, running: Callable[[], str]
) -> Callable[[], None]:
    """Warn when a revision sets PRAGMA foreign_keys inside the run's transaction.

    Alembic's docs advise ``PRAGMA foreign_keys=OFF`` around a batch rebuild of a parent
    table; inside a transaction SQLite silently ignores it. Our connection already runs
    with foreign keys OFF (so no child row is lost), but the author should know.
    Returns the function that removes the listener.
    """

    def check(conn: Connection, _cursor: Any, statement: str, *_args: Any) -> None:
        if _FOREIGN_KEYS_PRAGMA.match(statement) and _dbapi(conn).in_transaction:
            logger.warning(
                "Migration %s runs %r inside the migration transaction, where SQLite "
                "ignores it. No harm done: the migration connection already runs with "
                "foreign keys OFF and runs PRAGMA foreign_key_check before COMMIT.",
                running(),
                statement.strip(),
            )

    event.listen(connection, "before_cursor_execute", check)
    return lambda: event.remove(connection, "before_cursor_execute", check)


def foreign_key_violations(connection: Connection) -> list[str]:
    """Rows that break a foreign key, described; run before COMMIT."""
    rows = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
    return [f"{table} rowid {rowid} -> {parent}" for table, rowid, parent, _fk in rows]


def database_path(connection: Connection) -> str:
    """The main database's file path as SQLite resolved it ("" for in-memory)."""
    for _seq, name, path in _dbapi(connection).execute("PRAGMA database_list"):
        if name == "main":
            return str(path or "")
    return ""


def read_pragma(connection: Connection, name: str) -> Any:
    return _dbapi(connection).execute(f"PRAGMA {name}").fetchone()[0]


def foreign_connection_guard(connection: Connection) -> Callable[[], None]:
    """Prepare a user's connection like ours; return what puts its settings back."""
    foreign_keys = read_pragma(connection, "foreign_keys")
    busy_timeout_ms = read_pragma(connection, "busy_timeout")
    _dbapi(connection).execute("PRAGMA foreign_keys = OFF")

    def restore() -> None:
        dbapi = _dbapi(connection)
        dbapi.execute(f"PRAGMA foreign_keys = {int(foreign_keys)}")
        dbapi.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")

    return restore


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def select_versions(
    connection: Connection, table: str, schema: str | None
) -> tuple[str, ...] | None:
    """The version table's rows by one SELECT on the driver's connection, under the
    connection's own busy timeout. It costs a fraction of Alembic's read (a has_table
    reflection, then a SELECT that SQLAlchemy compiles on first use in a process), which
    a worker that finds the database at head would pay for nothing.

    ``schema`` None means the main database, as for Alembic's has_table (an unqualified
    name would also find a table of that name in an attached database). None when the
    table does not exist (a new database) or cannot be read: the caller then asks
    Alembic. A busy database raises SQLAlchemy's OperationalError, as Alembic's read
    would, so that the caller waits its turn only once.
    """
    name = f"{_quote(schema or 'main')}.{_quote(table)}"
    sql = f"SELECT version_num FROM {name}"
    try:
        rows = _dbapi(connection).execute(sql).fetchall()
    except sqlite3.Error as error:
        if is_busy(error):
            raise exc.OperationalError(sql, None, error) from error
        logger.debug("Could not read %s cheaply: %s", name, error)
        return None
    return tuple(str(row[0]) for row in rows)


def _dbapi(connection: Connection) -> sqlite3.Connection:
    driver = connection.connection.driver_connection
    assert isinstance(driver, sqlite3.Connection), "a pysqlite connection is required"
    return driver


def plain_database_file(url: str) -> str | None:
    """The absolute path of a plain sqlite file URL, whether the file exists or not;
    None for other databases, in-memory ones and URI filenames (SQLite reads those)."""
    try:
        parsed = make_url(url)
    except Exception:
        return None
    if parsed.get_backend_name() != "sqlite":
        return None
    if (parsed.database or "").startswith("file:") or parsed.query.get("uri"):
        return None
    return _diagnose.database_file(url) or None  # "": in-memory


def missing_database_file(url: str) -> str | None:
    """The path of a plain sqlite file URL whose file does not exist, else None.

    Opening it through SQLite would create an empty file: a look must not do that, and
    neither may a run whose target turns out not to exist.
    """
    path = plain_database_file(url)
    return path if path is not None and not os.path.exists(path) else None


class _Source:
    """The SQLite backend: SQLite's write lock, behind the run lock on its file."""

    transactional = True

    url: str

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy
        self.database_path: str | None = None  # as SQLite resolved it, for the run lock
        self._run_lock: RunLock | None = None  # only while really held
        self.run_lock_problem: Unusable | None = None
        """Why the last attempt could not lock the run lock file (None: it could)."""
        self._warned_unusable = False

    def is_busy(self, error: BaseException) -> bool:
        return is_busy(error)

    def _note_path(self, connection: Connection) -> None:
        # The look waits on a busy database no longer than the whole run may.
        set_busy_timeout(connection, self.policy.busy_timeout_for(self.policy.deadline_s))
        if self.database_path is None:  # once per run: one warning, one mountinfo read
            self.database_path = database_path(connection)
            _diagnose.warn_about_setup(self.url, self.database_path)  # :memory:, NFS, FUSE

    def _database_path(self) -> str:
        raise NotImplementedError

    def _begin(self, busy_timeout_s: float, *, begin: bool) -> Connection:
        raise NotImplementedError

    def _lock_path(self) -> str | None:
        if self.database_path is None:
            self.database_path = self._database_path()
        return lock_path_for(self.database_path)

    @property
    def database_file(self) -> str | None:
        self._lock_path()  # resolves the path once
        return self.database_path or None

    @property
    def run_long_lock(self) -> bool:
        """After a lock attempt: this run really holds the run lock. Before one: it can
        (a database file, flock, no attempt found the lock file unusable)."""
        if self._run_lock is not None:
            return self._run_lock.held and self.run_lock_problem is None
        return RunLock(self._lock_path()).usable and self.run_lock_problem is None

    def wait_for_running(
        self,
        timeout_s: float,
        while_waiting: Callable[[], None] | None = None,
        still_waiting: Callable[[], None] | None = None,
    ) -> bool:
        """Wait for a running migration with a *shared* run lock: when it ends, every
        waiter wakes at once and looks at the result in parallel, instead of queueing
        for the exclusive lock only to find, one after another, that the work is done."""
        give_up_at = time.monotonic() + timeout_s
        path = self._lock_path()
        # No run ever started here (and a look creates nothing on disk), or this run's
        # own migration_lock() block holds the run lock: nobody else runs.
        if path is None or not os.path.exists(path) or _held_here(path):
            return False
        run_lock = RunLock(path)
        try:
            if run_lock.acquire(0, shared=True):  # nobody is migrating right now
                run_lock.release()
                return False
        except Unusable as unusable:  # no run can hold it: nothing to wait for
            logger.debug("Not waiting on the run lock: %s", unusable)
            return False
        # Open the connection for the next steps now, while waiting costs nothing: then
        # the look after the wait and the first lock attempt find it ready (no open,
        # no schema load between the holder's COMMIT and this worker taking over).
        self._open_spare()
        if while_waiting is not None:
            while_waiting()
        try:
            if not run_lock.acquire(max(0.0, give_up_at - time.monotonic()), shared=True,
                                    still_waiting=still_waiting):
                return False
        except Unusable as unusable:  # replaced meanwhile by something unlockable
            logger.debug("Not waiting on the run lock: %s", unusable)
            return False
        run_lock.release()
        return True

    def _open_spare(self) -> None:
        """Keep a connection ready for the first lock attempt (none to keep by default)."""

    def read_versions(self, table: str, schema: str | None) -> tuple[str, ...] | None:
        """One plain SELECT with no busy wait: a holder committing right now (or no table
        yet) answers None, and the worker goes to the locked run, which waits its turn."""
        try:
            with self._plain_connection() as connection:
                set_busy_timeout(connection, 0)
                return select_versions(connection, table, schema)
        except (sqlite3.Error, exc.DBAPIError) as error:
            logger.debug("Could not read the version cheaply: %s", error)
            return None

    def look_versions(
        self, connection: Connection, table: str, schema: str | None
    ) -> tuple[str, ...] | None:
        return select_versions(connection, table, schema)

    def _plain_connection(self) -> AbstractContextManager[Connection]:
        raise NotImplementedError

    def try_lock(
        self,
        timeout_s: float,
        *,
        begin: bool = True,
        still_waiting: Callable[[], None] | None = None,
    ) -> Connection:
        """One attempt: the run lock first (prompt wake-up), then SQLite's write lock."""
        lock_path = self._lock_path()
        # A read-only database fails here, clearly, before the lock file is created.
        _diagnose.check_writable(self.database_path or "", self.url)
        if lock_path is not None and _held_here(lock_path):
            # Inside a migration_lock() block of this flow (or under an `exec`) that holds
            # the run lock: taking it again through another descriptor would wait for
            # ourselves. The holder keeps every other worker out; SQLite's write lock is
            # still taken below.
            logger.debug("The run lock %s is held by the enclosing migration_lock() block "
                         "or exec", lock_path)
            lock_path = None
        run_lock = RunLock(lock_path)
        started = time.monotonic()
        try:
            held = run_lock.acquire(timeout_s, still_waiting=still_waiting)
        except Unusable as unusable:
            # begin=False is transaction_per_migration: it commits between revisions,
            # where only the run lock would keep other workers out.
            self._without_run_lock(unusable, needed=not begin)
        else:
            self.run_lock_problem = None
            if not held:
                msg = f"{run_lock.path} is held by another worker"
                raise LockBusy(msg, lock_file=run_lock.path)
            if run_lock.held:
                self._check_long_lock(run_lock, needed=not begin)
        try:
            left = max(0.0, timeout_s - (time.monotonic() - started))
            connection = self._begin(left, begin=begin)
        except BaseException:
            run_lock.release()
            raise
        self._run_lock = run_lock if run_lock.held else None
        return connection

    def check_midway(self) -> None:
        """Someone who can write the database's folder can unlink or replace the run lock
        file while this run holds it; a newcomer then locks the new file at once. Inside
        one transaction SQLite's write lock still keeps it out, but not across a commit
        in the middle of the run: stop there instead of going on side by side."""
        run_lock = self._run_lock
        if run_lock is None or run_lock.intact():
            return
        path = run_lock.path or ""
        unusable = Unusable(
            path,
            "was removed or replaced while this run held it",
            f"Only this library creates that file, and it never deletes it: find out who "
            f"removes or replaces files in {os.path.dirname(path) or '.'} (only the users "
            "who may write the database should be able to), then run again.",
        )
        raise lock_file_refused(
            self.url, unusable,
            "this run commits in the middle (autocommit_block() or "
            "transaction_per_migration), and another worker could start migrating at "
            "such a commit",
            "The run stopped and was rolled back to its last commit.",
        )

    def _check_long_lock(self, run_lock: RunLock, *, needed: bool) -> None:
        """The run lock is held; can it also keep others out across a commit in the
        middle of the run? If not (a folder others may change), a run that commits
        midway is refused, and one in a single transaction goes on: SQLite's write lock
        alone keeps other workers out until its COMMIT."""
        self.run_lock_problem = self._long_lock_problem(run_lock)
        if self.run_lock_problem is None:
            return
        if needed:
            run_lock.release()
            raise lock_file_refused(
                self.url, self.run_lock_problem,
                "transaction_per_migration commits after each revision, and only the "
                "run lock keeps other workers from starting to migrate at those commits",
                "Nothing was migrated.",
            )

    def _long_lock_problem(self, run_lock: RunLock) -> Unusable | None:
        """Why the held run lock could not keep others out across a commit (None: it can)."""
        try:
            problem = run_lock.midway_problem(_sidefile.Owner.of(self.database_path or ""))
        except OSError as error:
            problem = f"is in a folder that cannot be checked ({error.strerror})"
        if problem is None:
            return None
        path = run_lock.path or ""
        return Unusable(
            path, problem,
            "Let only users who may write the database write its folder (chmod g-w,o-w "
            f"{os.path.dirname(path) or '.'}), or make the folder sticky (chmod +t) with "
            "the lock file owned by the database's owner, or move the database to such a "
            "folder; or avoid committing in the middle of the run.",
        )

    # migration_lock(): the run lock alone, held across the block ----------------------
    def hold(
        self, timeout_s: float, *, still_waiting: Callable[[], None] | None = None
    ) -> Held:
        """The run lock for a migration_lock() block, never SQLite's write lock: the
        block's own code (an ORM's engine creating its tables) writes the database."""
        lock_path = self._lock_path()
        if lock_path is None:
            msg = (
                f"migration_lock() cannot lock {self.url}: the lock is the run lock file "
                "beside the database, and this database has none (an in-memory or "
                "temporary database, or a system without flock). Use a database file."
            )
            raise ConfigurationError(msg)
        run_lock = RunLock(lock_path)
        held = take(
            _block_key(lock_path),
            lambda: self._hold_run_lock(run_lock, timeout_s, still_waiting),
            in_child=run_lock.release,
            inherited=lambda: inherited(lock_path),
        )
        if not held.nested:
            held.for_child = {"dialect": "sqlite", "fd": run_lock.fd}
        return held

    def _hold_run_lock(
        self, run_lock: RunLock, timeout_s: float, still_waiting: Callable[[], None] | None
    ) -> Callable[[], None]:
        database = self.database_path or ""
        _diagnose.check_writable(database, self.url)
        why = (
            "a migration_lock() block holds no transaction (its code writes the database "
            "itself), so only the run lock keeps runs and other blocks out"
        )
        try:
            got = run_lock.acquire(timeout_s, still_waiting=still_waiting)
        except Unusable as unusable:
            raise lock_file_refused(self.url, unusable, why, "The block did not run.") from None
        if not got:
            msg = f"{run_lock.path} is held by another worker"
            raise LockBusy(msg, lock_file=run_lock.path)
        problem = self._long_lock_problem(run_lock)
        if problem is not None:
            run_lock.release()
            raise lock_file_refused(self.url, problem, why, "The block did not run.")
        record_path = _holder.record_path_for(database)
        record = _holder.this_process([], [])  # who holds it; the revisions are unknown
        wrote = record_path is not None and _holder.write(record_path, record)

        def release() -> None:
            try:
                if wrote and record_path is not None:
                    _holder.remove(record_path, record)
            finally:
                run_lock.unlock()

        return release

    def _without_run_lock(self, unusable: Unusable, *, needed: bool) -> None:
        """The run lock file cannot be locked: refuse a run that needs a lock outliving
        its transactions; let one in a single transaction go on under SQLite's write
        lock, which alone keeps other workers out until its COMMIT (warned once a run)."""
        self.run_lock_problem = unusable
        if needed:
            raise lock_file_refused(
                self.url, unusable,
                "transaction_per_migration commits after each revision, and only the "
                "run lock keeps other workers from starting to migrate at those commits",
                "Nothing was migrated.",
            )
        if not self._warned_unusable:
            self._warned_unusable = True
            logger.warning(
                "The run lock file %s %s, so this run cannot hold it; it goes on under "
                "SQLite's write lock alone, which keeps other workers out as long as the "
                "run is one transaction (a revision using autocommit_block() is refused). "
                "%s",
                unusable.path, unusable.problem, unusable.fix,
            )

    def before_commit(self, connection: Connection) -> None:
        violations = foreign_key_violations(connection)
        if violations:
            raise ForeignKeyViolation(violations)

    # What the orchestrator asks of every backend, the SQLite way ---------------------
    def creates_database(self) -> bool:
        return False  # a handed-in connection has its database open already

    def side_files(self, settings: Settings) -> SideFiles:
        return Sidecar(settings, self.database_file)

    def no_lock_wait(self, connection: Connection) -> None:
        set_busy_timeout(connection, 0)

    def timeout_causes(self, lock_file: str | None) -> str:
        if lock_file is not None:
            return (
                f"another process held the run lock file {lock_file} the whole time. "
                "Likely causes: another worker is stuck in a migration (check its logs), "
                "or a process that is no migration holds it: any user who can read that "
                f"file can hold its lock. `fuser -v {lock_file}` or `lsof {lock_file}` "
                "shows who has it open; stop that process, and let only the database's "
                "owner read the file. If a migration legitimately takes longer, "
                f"{RAISE_DEADLINE}"
            )
        return (
            "another connection held a write lock on the database the whole time. Likely "
            "causes: another process is stuck in a migration or a long write transaction "
            "(check its logs; `fuser` or `lsof` on the file shows who has it open); the "
            "database file or its directory is not writable by this user (file "
            "permissions); or disk I/O problems. To diagnose, start a single worker "
            f"alone; if a migration legitimately takes longer, {RAISE_DEADLINE}"
        )

    def watch(self, connection: Connection, running: Callable[[], str]) -> Callable[[], None]:
        return warn_on_ignored_pragmas(connection, running)

    def autocommit_refused(self) -> MigrationLockError:
        if self.run_lock_problem is not None:
            # A run lock file that is there but cannot be locked: say which, and the fix.
            return lock_file_refused(
                self.url, self.run_lock_problem,
                "a migration uses autocommit_block(), which commits in the middle of the "
                "run, and only the run lock keeps other workers from starting to migrate "
                "at that commit",
                "The run was rolled back; nothing was migrated.",
            )
        return autocommit_refused(self.url)

    def read_only(self, connection: Connection) -> None:
        connection.execution_options(**{READ_ONLY_OPTION: True})

    def commit(self, connection: Connection) -> None:
        if connection.in_transaction():
            connection.commit()

    def rollback(self, connection: Connection) -> None:
        connection.rollback()

    def database_error(self, error: exc.DBAPIError) -> MigrationLockError:
        return _diagnose.open_error(self.url, error)  # which file, what is wrong, the fix

    def failure_hint(self, error: BaseException) -> str:
        engine = getattr(self, "engine", None)
        if engine is not None and engine in _READERS and READER_WROTE in str(error):
            return (
                " The revision wrote through a second connection (one it opened from "
                "op.get_bind().engine): while the run holds SQLite's write lock only the "
                "run's own connection may write. Write through op.get_bind() or "
                "op.execute() instead; a second connection may read."
            )
        return _diagnose.migration_hint(self.url, error)

    def _release_run_lock(self) -> None:
        run_lock, self._run_lock = self._run_lock, None
        if run_lock is not None:
            run_lock.release()  # after COMMIT: the next worker finds SQLite's lock free


class OwnEngine(_Source):
    """A NullPool engine made from alembic.ini: a new connection for every attempt.

    The one exception is the spare: a connection opened while waiting for another
    worker's run, read from once after the wait (never waiting on a lock: busy timeout
    0), then used by the first lock attempt. No attempt gets a connection that an
    earlier attempt waited on.
    """

    def __init__(self, section: Mapping[str, str], policy: RetryPolicy) -> None:
        super().__init__(policy)
        self.url = describe_url(section["sqlalchemy.url"])
        self._raw_url = section["sqlalchemy.url"]
        self.engine = create_engine(section)
        self._spare: Connection | None = None

    def creates_database(self) -> bool:
        return missing_database_file(self._raw_url) is not None

    def _open_spare(self) -> None:
        if self._spare is None:
            try:
                self._spare = self.engine.connect()
            except exc.DBAPIError as error:  # the lock attempt will open its own, or fail
                logger.debug("Could not open a connection ahead of the lock: %s", error)

    @contextmanager
    def reading(self) -> Iterator[Connection]:
        with self.engine.connect() as raw:
            connection = raw.execution_options(**{READ_ONLY_OPTION: True})
            self._note_path(connection)
            yield connection

    def _database_path(self) -> str:
        with self.engine.connect() as connection:
            return database_path(connection)

    def _plain_connection(self) -> AbstractContextManager[Connection]:
        if self._spare is not None:
            return nullcontext(self._spare)
        return self.engine.connect()

    def _begin(self, busy_timeout_s: float, *, begin: bool) -> Connection:
        connection, self._spare = self._spare, None
        if connection is None:
            try:
                connection = self.engine.connect()
            except exc.OperationalError as error:
                if is_busy(error):
                    raise LockBusy(str(error)) from error
                raise
        try:
            set_busy_timeout(connection, busy_timeout_s)
            # The run's own: its transactions (ours, or transaction_per_migration's,
            # begun by Alembic) take the write lock.
            connection.execution_options(**{WRITER_OPTION: True})
            if begin:
                begin_write(connection, busy_timeout_s, owned=True)
        except BaseException:
            connection.close()
            raise
        return connection

    def release(self, connection: Connection) -> None:
        # The run lock first: after COMMIT or ROLLBACK SQLite's lock is free already,
        # and closing the connection is no reason to keep the next worker waiting.
        try:
            self._release_run_lock()
        finally:
            connection.close()

    def close(self) -> None:
        spare, self._spare = self._spare, None
        if spare is not None:
            spare.close()
        self.engine.dispose()


class HandedIn(_Source):
    """``config.attributes["connection"]``: used as it is, locked the same way."""

    def __init__(self, connection: Connection, policy: RetryPolicy) -> None:
        super().__init__(policy)
        self.url = describe_url(connection.engine.url)
        if not isinstance(connection.connection.driver_connection, sqlite3.Connection):
            msg = (
                f"The connection handed to env.py in config.attributes['connection'] "
                f"({self.url}) uses the {connection.dialect.driver} driver; the migration "
                "lock needs a pysqlite connection (the standard sqlite3 module). For an "
                "aiosqlite app, do not hand in a connection: let run_migrations open its "
                "own from sqlalchemy.url (sqlite+aiosqlite:// URLs are migrated through "
                "pysqlite, on the same file and the same lock), e.g. with "
                "`await alembic_sqlite_lock.upgrade_async(config)`."
            )
            raise ConfigurationError(msg)
        if _dbapi(connection).in_transaction:
            msg = (
                f"The connection handed to env.py in config.attributes['connection'] "
                f"({self.url}) is already inside a transaction that has begun in SQLite "
                "(a statement ran in it). The migration must begin SQLite's transaction "
                "itself to take the lock: commit or roll back first, or hand in a fresh "
                "connection (engine.connect(), or engine.begin() before any statement)."
            )
            raise ConfigurationError(msg)
        self.connection = connection
        self.callers = connection.in_transaction()
        """Inside the caller's ``engine.begin()`` (Alembic's cookbook recipe): SQLite's
        transaction is the run's own, begun and committed by the run while it holds the
        lock; SQLAlchemy's stays the caller's, for its block to end (with nothing left
        to commit, or whatever the caller writes after the run)."""
        self._restore = foreign_connection_guard(connection)

    @property
    def run_long_lock(self) -> bool:
        # The caller's SQLAlchemy transaction cannot be committed midway by the run.
        return not self.callers and super().run_long_lock

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

    def commit(self, connection: Connection) -> None:
        if self.callers:
            _dbapi(connection).commit()  # SQLite's; the caller's block ends SQLAlchemy's
        else:
            super().commit(connection)

    def rollback(self, connection: Connection) -> None:
        if self.callers:
            _dbapi(connection).rollback()
        else:
            super().rollback(connection)

    @contextmanager
    def reading(self) -> Iterator[Connection]:
        self._note_path(self.connection)
        yield self.connection

    def _database_path(self) -> str:
        return database_path(self.connection)

    def _plain_connection(self) -> AbstractContextManager[Connection]:
        return nullcontext(self.connection)  # its busy_timeout is put back by close()

    def _begin(self, busy_timeout_s: float, *, begin: bool) -> Connection:
        set_busy_timeout(self.connection, busy_timeout_s)
        if begin:
            begin_write(self.connection, busy_timeout_s, owned=False, callers=self.callers)
        return self.connection

    def release(self, connection: Connection) -> None:
        self._release_run_lock()

    def close(self) -> None:
        self._restore()


def _block_key(lock_path: str) -> tuple[str, ...]:
    """The identity of the run lock for ``_held``: its file, as a run computes it."""
    return ("sqlite", lock_path)


def _held_here(lock_path: str) -> bool:
    """This flow's migration_lock() block, or the `exec` this process runs under, holds
    the run lock ``lock_path``."""
    return held_here(_block_key(lock_path), lambda: inherited(lock_path))


def lock_file_refused(
    url: str, unusable: Unusable, why_needed: str, outcome: str
) -> LockFileUnusable:
    """The error for a run that needs the run lock when its file cannot be locked."""
    msg = (
        f"The migration of {url} needs the run lock, but the run lock file "
        f"{unusable.path} {unusable.problem}: {why_needed}. {outcome} {unusable.fix}"
    )
    return LockFileUnusable(msg, url=url, path=unusable.path)


class ForeignKeyViolation(Exception):
    def __init__(self, violations: list[str]) -> None:
        shown = "; ".join(violations[:5]) + (" ..." if len(violations) > 5 else "")
        super().__init__(f"{len(violations)} row(s) break a foreign key: {shown}")
