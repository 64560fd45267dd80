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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from alembic.runtime.environment import EnvironmentContext
from alembic.runtime.migration import MigrationContext, MigrationStep, RevisionStep
from sqlalchemy import exc
from sqlalchemy.engine import Connection

from ._backend import Backend, RunOptions, describe_url, open_backend
from ._errors import ConfigurationError, MigrationError, MigrationLockError, RollbackFailed
from ._retry import RetryPolicy, acquire
from ._settings import resolve_settings

__all__ = ["STATE_KEY", "RunState", "StepsFn", "describe_url", "run_migrations"]

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


class _OnlineRun:
    def __init__(self, env: EnvironmentContext, kwargs: dict[str, Any], state: RunState):
        self.env = env
        self.kwargs = kwargs
        self.state = state
        settings = resolve_settings(env.config)
        self.policy: RetryPolicy = settings.policy
        self.options = RunOptions(
            policy=settings.policy,
            lock_key=settings.lock_key,
            lock_scope=settings.lock_scope,
            version_table=kwargs.get("version_table") or "alembic_version",
            version_table_schema=kwargs.get("version_table_schema"),
        )
        self.command_fn: StepsFn = env.context_opts["fn"]
        # upgrade, downgrade and stamp name a destination; current, check and
        # autogenerate do not, and get no "nothing to do" line.
        self.migrates = "destination_rev" in env.context_opts

    def run(self) -> None:
        config = self.env.config
        source = open_backend(
            section=config.get_section(config.config_ini_section, {}),
            handed_in=config.attributes.get("connection"),
            options=self.options,
            where=f"the [{config.config_ini_section}] section of {config.config_file_name}",
        )
        try:
            # purge empties the version table before the command looks at it, which is
            # a write: such a run goes straight to the lock.
            if self.env.context_opts.get("purge") or not self._finished_unlocked(source):
                self._run_locked(source, saw_work=not self.env.context_opts.get("purge"))
        finally:
            source.close()

    def _finished_unlocked(self, source: Backend) -> bool:
        """Pass 1: True when the command had nothing to migrate and is done."""
        try:
            with source.reading() as connection:
                self.env.configure(connection=connection, **self.kwargs)
                migration_context = self.env.get_context()
                heads = migration_context.get_current_heads()
                steps = list(self.command_fn(heads, migration_context))
                if steps:
                    connection.rollback()
                    return False
                connection.commit()
        except exc.DBAPIError as error:
            if source.is_busy(error):
                return False  # the locked pass waits its turn, with retries
            raise _database_error(source, error) from error
        if self.migrates:
            logger.info("Database already at %s, nothing to do", _revisions(heads))
        return True

    def _run_locked(self, source: Backend, *, saw_work: bool) -> None:
        progress = _Progress()
        command_fn = self.command_fn

        def locked_fn(heads: tuple[str, ...], context: MigrationContext) -> Iterator[Any]:
            progress.before = heads
            steps = list(command_fn(heads, context))
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
                connection = acquire(
                    source.try_lock, self.policy, url=source.url, causes=source.timeout_causes
                )
            except exc.DBAPIError as error:
                raise _database_error(source, error) from error
            try:
                self.env.configure(connection=connection, **self.kwargs)
                self.env.run_migrations()
                source.before_commit(connection)
                connection.commit()
            except BaseException as error:
                _rollback(connection, source.url, error)
                if not source.transactional:
                    # Each finished revision committed on its own: they are applied.
                    self._record(progress.done)
                    progress.now = self._version_after_failure()
                if isinstance(error, Exception) and not isinstance(error, MigrationLockError):
                    raise _migration_error(source, progress, error) from error
                raise
            finally:
                source.release(connection)
        finally:
            self.env.context_opts["fn"] = command_fn
        self._record(progress.done)

    def _version_after_failure(self) -> str:
        """What the version table says now, for the error message; never raises."""
        try:
            return _revisions(self.env.get_context().get_current_heads())
        except Exception as error:
            logger.debug("Could not read the version after the failure: %s", error)
            return "unknown (it could not be read)"

    def _record(self, done: list[Any]) -> None:
        for step in done:
            logger.info("%s: %s", _verb(step, done=True), _revision_of(step))
            self.state.applied.append(_revision_of(step))


@dataclass
class _Progress:
    before: tuple[str, ...] = ()
    running: Any = None
    done: list[Any] = field(default_factory=list)
    now: str = ""
    """Non-transactional databases: the version after a failure."""


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


def _migration_error(source: Backend, progress: _Progress, error: Exception) -> MigrationError:
    url = source.url
    before = _revisions(progress.before)
    if progress.running is not None:
        what = f"Migration {_describe(progress.running)} failed on {url}"
        revision: str | None = _revision_of(progress.running)
    else:
        what = f"The migration run on {url} failed before it could commit"
        revision = None
    if source.transactional:
        outcome = f"The whole run was rolled back; the database is still at {before}."
    else:
        outcome = (
            f"This database commits each DDL statement on its own, so the run could not "
            f"be rolled back as a whole: the revisions before the failing one are applied "
            f"and the version table says {progress.now}; statements of the failing revision that "
            "ran before the error are applied too. Check them and undo them by hand if "
            "needed."
        )
    msg = (
        f"{what}: {type(error).__name__}: {error}. {outcome} Fix the cause and run the "
        "upgrade again."
    )
    return MigrationError(msg, url=url, revision=revision)


def _database_error(source: Backend, error: exc.DBAPIError) -> MigrationLockError:
    msg = (
        f"Could not read the migration state of {source.url}: {error.orig}. "
        f"{source.unreadable_hint}"
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

