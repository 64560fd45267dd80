"""``run_migrations()``: the one call a user's env.py makes, online or offline.

Online, a run has two passes:

1. A look without the write lock: read the version table and ask the command what it
   would do. Read-only commands (``current``, ``check``, ``revision --autogenerate``)
   finish here, and so does an upgrade that finds the database at its target: a
   restart never blocks the app's writers.
2. Otherwise, the locked run: BEGIN IMMEDIATE, then Alembic reads the version again,
   runs every pending migration and writes the version row, all in that one
   transaction, then COMMIT. A worker that saw work to do in pass 1 decides again here,
   so it never repeats what another worker did in between.

Alembic treats SQLite's DDL as non-transactional and would COMMIT after each revision
(releasing the lock mid-chain). Handing it a connection that is already in a
transaction makes it an "external" transaction that Alembic leaves alone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

from alembic.runtime.environment import EnvironmentContext
from alembic.runtime.migration import MigrationContext, MigrationStep, RevisionStep
from sqlalchemy import exc
from sqlalchemy.engine import Connection, make_url

from . import _sqlite
from ._errors import ConfigurationError, MigrationError, MigrationLockError, RollbackFailed
from ._retry import LockBusy, RetryPolicy, acquire
from ._runlock import RunLock, lock_path_for
from ._settings import resolve_policy
from ._sidecar import Sidecar

logger = logging.getLogger(__name__)

STATE_KEY = "alembic_sqlite_lock.state"
"""``Config.attributes`` key of the :class:`RunState` shared with ``upgrade()``."""

StepsFn = Callable[[tuple[str, ...], MigrationContext], Iterable[MigrationStep]]


@dataclass
class RunState:
    """What ``upgrade()`` needs to know about the env.py it ran."""

    called: bool = False
    """env.py called run_migrations()."""
    inside: bool = False
    """run_migrations() is running now: only then may migration steps be computed."""
    applied: list[str] = field(default_factory=list)


def run_migrations(
    context: Any,
    target_metadata: Any = None,
    **configure_kwargs: Any,
) -> None:
    """Run the current Alembic command under the migration lock.

    Call it from env.py in place of Alembic's ``run_migrations_online()`` /
    ``run_migrations_offline()`` boilerplate::

        from alembic import context
        from alembic_sqlite_lock import run_migrations

        run_migrations(context, target_metadata)

    ``configure_kwargs`` go to ``context.configure()`` untouched. A connection in
    ``config.attributes["connection"]`` is used (and locked) instead of a new engine.
    """
    env = _environment(context)
    state = env.config.attributes.setdefault(STATE_KEY, RunState())
    state.called = True
    state.inside = True
    try:
        kwargs = dict(configure_kwargs, target_metadata=target_metadata)
        if env.is_offline_mode():
            _run_offline(env, kwargs)
        else:
            _OnlineRun(env, kwargs, state).run()
    finally:
        state.inside = False


def _environment(context: Any) -> EnvironmentContext:
    """Accept ``alembic.context`` (the module proxy env.py has) or the instance itself."""
    env = context if isinstance(context, EnvironmentContext) else getattr(context, "_proxy", None)
    if not isinstance(env, EnvironmentContext):
        msg = (
            "run_migrations(context, ...) must be called from env.py while an Alembic "
            "command runs, with `from alembic import context` as its first argument."
        )
        raise ConfigurationError(msg)
    return env


def _run_offline(env: EnvironmentContext, kwargs: dict[str, Any]) -> None:
    """``--sql``: render the SQL; no database is touched, so there is nothing to lock."""
    url = env.config.get_main_option("sqlalchemy.url")
    env.configure(url=url, literal_binds=True, dialect_opts={"paramstyle": "named"}, **kwargs)
    with env.begin_transaction():
        env.run_migrations()


def describe_url(url: Any) -> str:
    """A URL fit for logs and errors: the password is never shown."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except exc.ArgumentError:
        return "<unparseable URL>"


class _Connections(Protocol):
    """Where the run's connections come from: our own engine, or one handed in."""

    url: str

    def reading(self) -> Any: ...
    def database_path(self) -> str: ...
    def try_lock(self, busy_timeout_s: float) -> Connection: ...
    def release(self, connection: Connection) -> None: ...
    def close(self) -> None: ...


class _OwnEngine:
    """A NullPool engine made from alembic.ini: a new connection for every attempt."""

    def __init__(self, env: EnvironmentContext) -> None:
        config = env.config
        section = config.get_section(config.config_ini_section, {})
        raw_url = section.get("sqlalchemy.url")
        if not raw_url:
            msg = (
                f"No sqlalchemy.url in the [{config.config_ini_section}] section of "
                f"{config.config_file_name}. Set it to the SQLite database to migrate, "
                "for example sqlalchemy.url = sqlite:///%(here)s/app.db"
            )
            raise ConfigurationError(msg)
        self.url = describe_url(raw_url)
        _require_sqlite(raw_url, self.url)
        self.engine = _sqlite.create_engine(section)

    @contextmanager
    def reading(self) -> Iterator[Connection]:
        with self.engine.connect() as connection:
            yield connection.execution_options(**{_sqlite.READ_ONLY_OPTION: True})

    def database_path(self) -> str:
        with self.engine.connect() as connection:
            return _sqlite.database_path(connection)

    def try_lock(self, busy_timeout_s: float) -> Connection:
        try:
            connection = self.engine.connect()
        except exc.OperationalError as error:
            if _sqlite.is_busy(error):
                raise LockBusy(str(error)) from error
            raise
        try:
            _sqlite.begin_write(connection, busy_timeout_s, owned=True)
        except BaseException:
            connection.close()
            raise
        return connection

    def release(self, connection: Connection) -> None:
        connection.close()

    def close(self) -> None:
        self.engine.dispose()


class _HandedIn:
    """``config.attributes["connection"]``: used as it is, locked the same way."""

    def __init__(self, connection: Connection) -> None:
        self.url = describe_url(connection.engine.url)
        _require_sqlite(connection.engine.url, self.url)
        if connection.in_transaction():
            msg = (
                f"The connection handed to env.py in config.attributes['connection'] "
                f"({self.url}) is already inside a transaction. The migration must start "
                "its own transaction to take the lock: commit or roll back first, or "
                "hand in a fresh connection (engine.connect())."
            )
            raise ConfigurationError(msg)
        self.connection = connection
        self._restore = _sqlite.foreign_connection_guard(connection)

    @contextmanager
    def reading(self) -> Iterator[Connection]:
        yield self.connection

    def database_path(self) -> str:
        return _sqlite.database_path(self.connection)

    def try_lock(self, busy_timeout_s: float) -> Connection:
        _sqlite.begin_write(self.connection, busy_timeout_s, owned=False)
        return self.connection

    def release(self, connection: Connection) -> None:
        pass

    def close(self) -> None:
        self._restore()


def _require_sqlite(url: Any, shown: str) -> None:
    if make_url(url).get_backend_name() != "sqlite":
        msg = (
            f"alembic-sqlite-lock migrates SQLite databases only, and {shown} is not one. "
            "Point sqlalchemy.url at a SQLite file (sqlite:///path/app.db), or use "
            "Alembic's stock env.py for this database."
        )
        raise ConfigurationError(msg)


class _OnlineRun:
    def __init__(self, env: EnvironmentContext, kwargs: dict[str, Any], state: RunState):
        self.env = env
        self.kwargs = kwargs
        self.state = state
        self.policy: RetryPolicy = resolve_policy(env.config)
        self.command_fn: StepsFn = env.context_opts["fn"]
        # upgrade, downgrade and stamp name a destination; current, check and
        # autogenerate do not, and get no "nothing to do" line.
        self.migrates = "destination_rev" in env.context_opts
        self.database_path: str | None = None  # as SQLite resolved it, for the run lock

    def run(self) -> None:
        handed_in = self.env.config.attributes.get("connection")
        source: _Connections = _HandedIn(handed_in) if handed_in is not None else _OwnEngine(
            self.env
        )
        try:
            # purge empties the version table before the command looks at it, which is
            # a write: such a run goes straight to the lock.
            if self.env.context_opts.get("purge") or not self._finished_unlocked(source):
                self._run_locked(source, saw_work=not self.env.context_opts.get("purge"))
        finally:
            source.close()

    def _finished_unlocked(self, source: _Connections) -> bool:
        """Pass 1: True when the command had nothing to migrate and is done."""
        try:
            with source.reading() as connection:
                _sqlite.set_busy_timeout(connection, self.policy.busy_timeout_s)
                self.database_path = _sqlite.database_path(connection)
                self.env.configure(connection=connection, **self.kwargs)
                migration_context = self.env.get_context()
                heads = migration_context.get_current_heads()
                steps = list(self.command_fn(heads, migration_context))
                if steps:
                    connection.rollback()
                    return False
                connection.commit()
        except exc.DBAPIError as error:
            if _sqlite.is_busy(error):
                return False  # the locked pass waits its turn, with retries
            raise _database_error(source.url, error) from error
        if self.migrates:
            logger.info("Database already at %s, nothing to do", _revisions(heads))
        return True

    def _run_locked(self, source: _Connections, *, saw_work: bool) -> None:
        progress = _Progress()
        command_fn = self.command_fn

        def locked_fn(heads: tuple[str, ...], context: MigrationContext) -> Iterator[Any]:
            progress.before = heads
            steps = list(command_fn(heads, context))
            sidecar.starting(heads, steps)  # holder record; backup (opt-in)
            if not steps and self.migrates:
                if saw_work:
                    logger.info("All migrations already applied by another worker")
                else:
                    logger.info("Database already at %s, nothing to do", _revisions(heads))
            for step in steps:
                progress.running = step
                logger.info("%s: %s", _verb(step, done=False), _describe(step))
                yield step
                progress.done.append(step)
            progress.running = None

        self.env.context_opts["fn"] = locked_fn
        try:
            try:
                if self.database_path is None:
                    self.database_path = source.database_path()
                run_lock = RunLock(lock_path_for(self.database_path))
                sidecar = Sidecar(self.env.config, self.database_path)
                connection = acquire(
                    partial(_lock_both, run_lock, source), self.policy, url=source.url,
                    describe_holder=sidecar.holder_suffix,
                )
            except exc.DBAPIError as error:
                raise _database_error(source.url, error) from error
            try:
                self.env.configure(connection=connection, **self.kwargs)
                self.env.run_migrations()
                violations = _sqlite.foreign_key_violations(connection)
                if violations:
                    raise _ForeignKeyViolation(violations)
                connection.commit()
            except BaseException as error:
                _rollback(connection, source.url, error)
                if isinstance(error, Exception) and not isinstance(error, MigrationLockError):
                    raise _migration_error(source.url, progress, error) from error
                raise
            finally:
                sidecar.finished()
                source.release(connection)
                run_lock.release()  # after COMMIT: the next worker finds SQLite's lock free
        finally:
            self.env.context_opts["fn"] = command_fn
        for step in progress.done:
            logger.info("%s: %s", _verb(step, done=True), _revision_of(step))
            self.state.applied.append(_revision_of(step))


def _lock_both(run_lock: RunLock, source: _Connections, busy_timeout_s: float) -> Connection:
    """One attempt: the run lock first (prompt wake-up), then SQLite's write lock."""
    started = time.monotonic()
    if not run_lock.acquire(busy_timeout_s):
        raise LockBusy(f"{run_lock.path} is held by another worker")
    try:
        return source.try_lock(max(0.0, busy_timeout_s - (time.monotonic() - started)))
    except BaseException:
        run_lock.release()
        raise


@dataclass
class _Progress:
    before: tuple[str, ...] = ()
    running: Any = None
    done: list[Any] = field(default_factory=list)


class _ForeignKeyViolation(Exception):
    def __init__(self, violations: list[str]) -> None:
        shown = "; ".join(violations[:5]) + (" ..." if len(violations) > 5 else "")
        super().__init__(f"{len(violations)} row(s) break a foreign key: {shown}")


def _rollback(connection: Connection, url: str, error: BaseException) -> None:
    try:
        connection.rollback()
    except Exception as rollback_error:
        logger.critical(
            "FATAL: rollback failed on %s after %s: %s; the database may be half-migrated",
            url,
            type(error).__name__,
            rollback_error,
        )
        msg = (
            f"A migration on {url} failed ({type(error).__name__}: {error}) and rolling it "
            f"back failed too ({rollback_error}). Stop all workers, check the database "
            "with `PRAGMA integrity_check` and restore a backup if it is damaged."
        )
        raise RollbackFailed(msg, url=url) from rollback_error


def _migration_error(url: str, progress: _Progress, error: Exception) -> MigrationError:
    before = _revisions(progress.before)
    if progress.running is not None:
        what = f"Migration {_describe(progress.running)} failed on {url}"
        revision: str | None = _revision_of(progress.running)
    else:
        what = f"The migration run on {url} failed before it could commit"
        revision = None
    msg = (
        f"{what}: {type(error).__name__}: {error}. The whole run was rolled back; the "
        f"database is still at {before}. Fix the cause and run the upgrade again."
    )
    return MigrationError(msg, url=url, revision=revision)


def _database_error(url: str, error: exc.DBAPIError) -> MigrationLockError:
    msg = (
        f"Could not read the migration state of {url}: {error.orig}. Check that the path "
        "points at a SQLite database this user can read and write."
    )
    return MigrationLockError(msg)


def _revisions(heads: Iterable[str]) -> str:
    return ", ".join(heads) or "base (no revision)"


def _revision_of(step: Any) -> str:
    if isinstance(step, RevisionStep):
        return str(step.revision.revision)
    return ", ".join(step.to_revisions_no_deps) or "base"


def _describe(step: Any) -> str:
    doc = step.doc
    return f"{_revision_of(step)} ({doc})" if doc else _revision_of(step)


def _verb(step: Any, *, done: bool) -> str:
    if not isinstance(step, RevisionStep):
        return "Stamped" if done else "Stamping"
    if step.is_upgrade:
        return "Applied migration" if done else "Applying migration"
    return "Reverted migration" if done else "Reverting migration"

