"""``run_migrations()``: the one call a user's env.py makes, online or offline.

Online, a run goes in up to three steps:

1. A look without the write lock: read the version table and ask the command what it
   would do. Read-only commands (``current``, ``check``, ``revision --autogenerate``)
   finish here, and so does an upgrade that finds the database at its target: a
   restart never blocks the app's writers.
2. If another worker is migrating right now, wait for it to finish (a shared run lock,
   so that all such waiters wake together) and look again: usually it did the work.
3. Otherwise, the locked run: BEGIN IMMEDIATE, then Alembic reads the version again,
   runs every pending migration and writes the version row, all in that one
   transaction, then COMMIT. A worker that saw work to do before decides again here,
   so it never repeats what another worker did in between.

Alembic treats SQLite's DDL as non-transactional and would COMMIT after each revision
(releasing the lock mid-chain). Handing it a connection that is already in a
transaction makes it an "external" transaction that Alembic leaves alone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from alembic.runtime.environment import EnvironmentContext
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Column, MetaData, String, Table, exc, select
from sqlalchemy.engine import Connection

from . import _alembic, _steps
from ._alembic import StepsFn
from ._backends import Backend, RunOptions, SideFiles, drive_run, open_backend
from ._errors import ConfigurationError, MigrationLockError, RollbackFailed, busy_reading
from ._progress import Progress, describe, log_applied, migration_error, revisions
from ._retry import RetryPolicy, acquire
from ._revcache import Known, answer
from ._revisions import RevisionCache
from ._settings import Settings, run_settings
from ._signals import Termination, terminate_as_exit
from ._urls import describe_url

__all__ = ["STATE_KEY", "RunState", "describe_url", "run_migrations"]

logger = logging.getLogger(__name__)

STATE_KEY = "alembic_sqlite_lock.state"
"""``Config.attributes`` key of the :class:`RunState` shared with ``upgrade()``."""


@dataclass
class RunState:
    """What ``upgrade()`` needs to know about the env.py it ran."""

    called: bool = False
    """env.py called run_migrations()."""
    inside: bool = False
    """run_migrations() is running now: only then may migration steps be computed."""
    applied: list[str] = field(default_factory=list)
    held_opts: dict[str, Any] = field(default_factory=dict)
    """Options upgrade() kept from Alembic until run_migrations() takes over (see there)."""


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
    # upgrade() hides the options that make Alembic write before it calls the command's
    # work function (the version table on a fresh file, --purge); only an env.py that
    # comes through here gets them back.
    _alembic.update_options(env, state.held_opts)
    try:
        kwargs = dict(configure_kwargs, target_metadata=target_metadata)
        settings = run_settings(env.config)  # resolved once per run; bad ones fail offline too
        if env.is_offline_mode():
            _run_offline(env, kwargs)
        else:
            # An async driver's connections work only inside a greenlet on an event loop.
            drive_run(env.config, _OnlineRun(env, kwargs, state, settings).run)
    finally:
        state.inside = False


def _environment(context: Any) -> EnvironmentContext:
    """Accept ``alembic.context`` (the module proxy env.py has) or the instance itself."""
    env = _alembic.environment_of(context)
    if env is None:
        msg = (
            "run_migrations(context, ...) must be called from env.py while an Alembic "
            "command runs, with `from alembic import context` as its first argument."
        )
        raise ConfigurationError(msg)
    return env


def _run_offline(env: EnvironmentContext, kwargs: dict[str, Any]) -> None:
    """``--sql``: render the SQL; no database is touched, so there is nothing to lock."""
    # Alembic's offline template's defaults; the env.py's own keyword arguments win
    # (a dialect_name names the dialect without a URL).
    defaults: dict[str, Any] = {"literal_binds": True, "dialect_opts": {"paramstyle": "named"}}
    if "url" not in kwargs and "dialect_name" not in kwargs:
        defaults["url"] = env.config.get_main_option("sqlalchemy.url")
    env.configure(**{**defaults, **kwargs})
    with env.begin_transaction():
        env.run_migrations()


class _OnlineRun:
    def __init__(
        self,
        env: EnvironmentContext,
        kwargs: dict[str, Any],
        state: RunState,
        settings: Settings,
    ) -> None:
        self.env = env
        self.kwargs = kwargs
        self.state = state
        self.settings = settings
        self.policy: RetryPolicy = settings.policy
        self.options = RunOptions(
            policy=settings.policy,
            lock_key=settings.lock_key,
            lock_scope=settings.lock_scope,
            version_table=kwargs.get("version_table") or "alembic_version",
            version_table_schema=kwargs.get("version_table_schema"),
        )
        self.wait_while_alive = settings.wait_while_holder_alive
        self.command: StepsFn = _alembic.work_function(env)
        """The command's work function as Alembic was given it (see _steps.py)."""
        self.seen: _steps.Seen | None = None
        """What the first look found, once it found work to do."""
        self.command_fn: StepsFn = self._work_function()
        """What the looks ask for the steps: pinned to a relative target once seen."""
        self.looked: MigrationContext | None = None
        """The first look's context, once it found work to do."""
        self.work_certain = False
        """The run this worker waited for will leave work for it (the holder record)."""
        # upgrade, downgrade and stamp name a destination; current, check and
        # autogenerate do not, and get no "nothing to do" line.
        self.migrates = _alembic.names_destination(env)
        self.upgrades = _alembic.is_upgrade(env)
        self.cache = RevisionCache(env.script, settings.revision_cache)
        self.known: Known | None = None
        """What the revision cache says, when it is right: an upgrade to ``head``,
        ``heads`` or a revision id then needs no revision file to tell "nothing to do"
        (or "work to do"), before the lock or after the wait."""
        self.stop = Termination()
        """What a SIGTERM during the locked run finds (replaced by the one that listens)."""

    def run(self) -> None:
        config = self.env.config
        section = config.get_section(config.config_ini_section, {})
        source = open_backend(
            section=section,
            handed_in=config.attributes.get("connection"),
            options=self.options,
            where=f"the [{config.config_ini_section}] section of "
            f"{config.config_file_name or 'the Alembic configuration (no file)'}",
            ini=config.config_file_name,
        )
        try:
            self._run(source, section)
        finally:
            source.close()
            # This process loaded the revision files (the cache was missing, stale or
            # off): remember what they said for the next start.
            self.cache.remember()

    def _run(self, source: Backend, section: dict[str, str]) -> None:
        started = time.monotonic()
        if self.migrates:
            self.known = self.cache.known()
        if (self.migrates and source.creates_database()
                and self._cached_answer(()) is None):
            self._resolve_target_before_creating(section.get("sqlalchemy.url", ""))
        # purge empties the version table before the command looks at it, which is
        # a write: such a run goes straight to the lock.
        purge = _alembic.purges(self.env)
        if not purge and self._finished_unlocked(source):
            return
        # The holder record (who migrates, for waiters and `status`) and the opt-in
        # backup live beside a database file; server databases have neither.
        sidecar = source.side_files(self.settings)

        def still_waiting() -> None:
            logger.info(
                "Still waiting for the migration lock on %s after %.1fs%s",
                source.url, time.monotonic() - started, sidecar.holder_suffix(),
            )

        if not purge:
            # Work to do. If another worker is migrating, wait for it to finish and
            # look again: usually it did the same work.
            # The deadline counts from the start of the run, look included.
            remaining_s = self.policy.deadline_s - (time.monotonic() - started)
            waited = source.wait_for_running(
                self.policy.busy_timeout_for(remaining_s),
                while_waiting=lambda: self._expect_work_after(sidecar, source),
                still_waiting=still_waiting,
            )
            if waited and not self.work_certain and self._finished_after_wait(source):
                return
        # SIGTERM (a CLI run stopped by its supervisor) rolls the run back.
        with terminate_as_exit() as self.stop:
            self._run_locked(
                source, sidecar, saw_work=not purge, started=started,
                still_waiting=still_waiting,
            )

    def _cached_answer(self, heads: tuple[str, ...]) -> bool | None:
        """From the revision cache: True, the command has nothing to do from ``heads``;
        False, it has work; None, ask Alembic (see ``_revcache.answer``)."""
        if self.known is None:
            return None
        return answer(self.known, _alembic.destination(self.env), heads,
                      upgrade=self.upgrades)

    def _work_function(self, logged: _steps.Logged | None = None) -> StepsFn:
        return _steps.work_function(
            self.command,
            self.env.script,
            allow_unknown=self.settings.allow_unknown_revision,
            seen=self.seen,
            logged=logged,
            nothing_to_do=lambda heads: self._cached_answer(heads) is True,
        )

    def _resolve_target_before_creating(self, url: str) -> None:
        """A database file that does not exist yet is at no revision: resolve the
        command's target from there before the first connection creates the file, so a
        mistyped revision fails with nothing left on disk."""
        self.env.configure(url=url, **self.kwargs)
        list(self.command_fn((), self.env.get_context()))

    def _finished_unlocked(self, source: Backend) -> bool:
        """A look without the lock: True when the command has nothing to migrate."""
        looked_at = time.monotonic()
        try:
            with source.reading() as connection:
                self.env.configure(connection=connection, **self.kwargs)
                migration_context = self.env.get_context()
                heads = source.look_versions(
                    connection, self.options.version_table, self.options.version_table_schema
                )
                if heads is None:
                    heads = migration_context.get_current_heads()
                # The revision cache tells without loading a revision file; then no
                # steps are seen, which only a relative target (never cached) would use.
                cached = self._cached_answer(heads)
                steps = [] if cached is False else list(self.command_fn(heads, migration_context))
                if steps or cached is False:
                    source.rollback(connection)
                    self.looked = migration_context
                    self.seen = _steps.Seen(_alembic.destination(self.env), heads, steps)
                    self.command_fn = self._work_function()
                    return False
                source.commit(connection)
        except exc.DBAPIError as error:
            if not source.is_busy(error):
                raise source.database_error(error) from error
            if not self.migrates:
                # A read-only command never goes on to the locked run.
                raise busy_reading(source.url, time.monotonic() - looked_at) from error
            return False  # the locked pass waits its turn, with retries
        if self.migrates:
            logger.info("Database already at %s, nothing to do", revisions(heads))
        return True

    def _expect_work_after(self, sidecar: SideFiles, source: Backend) -> None:
        """While waiting: if the running holder's recorded target leaves work for this
        worker, it will migrate next, so skip the look after the wait (the locked run
        reads the version anyway): nothing then stands between the holder's COMMIT and
        this worker taking the lock. And get ready while idle: the locked run's first
        statement would otherwise pay SQLAlchemy's first-use costs after the COMMIT."""
        target = sidecar.running_target()
        if target is None or self.looked is None:
            return
        cached = self._cached_answer(tuple(target))
        try:
            self.work_certain = (not cached if cached is not None else
                                 bool(list(self.command_fn(tuple(target), self.looked))))
        except Exception as error:  # e.g. a revision this code does not know
            logger.debug("Cannot tell what %s leaves to do (%s)", target, error)
        if self.work_certain:
            self._warm_up(source)

    def _warm_up(self, source: Backend) -> None:
        """Run a statement like the one Alembic will read the version with, on a
        connection of its own, never waiting on a lock. It is not the same statement
        object, so nothing compiled is reused: what it pays ahead is the process's
        first-use costs of executing a SQLAlchemy SELECT (measured: the waiter's first
        revision then runs 1 to 2 ms sooner after the holder's COMMIT). It fails
        harmlessly while the version table does not exist yet."""
        version = Table(
            self.options.version_table,
            MetaData(),
            Column("version_num", String(32), nullable=False),
            schema=self.options.version_table_schema,
        )
        try:
            with source.reading() as connection:
                try:
                    source.no_lock_wait(connection)
                    connection.execute(select(version.c.version_num)).fetchall()
                finally:
                    # A handed-in connection is the run's own: leave no transaction.
                    source.rollback(connection)
        except exc.DBAPIError as error:
            logger.debug("Warming up: %s", error)

    def _finished_after_wait(self, source: Backend) -> bool:
        """The look again, after waiting for another worker's run: True when it did our work.

        Cheap on purpose, as it sits between the holder's COMMIT and the next worker
        taking the lock: one plain SELECT of the version rows, then the command asked
        what it would do from there (the revision cache answers, or the revision map,
        loaded already by the first look). No Alembic context, no compiled statement.
        Any doubt sends the worker to the locked run, which reads the version again
        under the lock and decides for real.
        """
        if self.looked is None and self.known is None:
            return False  # the first look was busy: nothing to ask without loading
        heads = source.read_versions(self.options.version_table, self.options.version_table_schema)
        if heads is None:
            return False
        done = self._cached_answer(heads)
        if done is None and self.looked is not None:
            try:
                done = not list(self.command_fn(heads, self.looked))
            except Exception as error:  # e.g. a revision this code does not know
                logger.debug("Looking again after the wait failed (%s); taking the lock",
                             error)
        if done:
            logger.info("All migrations already applied by another worker")
        return bool(done)

    def _run_locked(
        self,
        source: Backend,
        sidecar: SideFiles,
        *,
        saw_work: bool,
        started: float,
        still_waiting: Callable[[], None],
    ) -> None:
        # transaction_per_migration lets Alembic commit after each revision; only a
        # lock that outlives a transaction keeps other workers out between revisions.
        per_migration = bool(self.kwargs.get("transaction_per_migration"))
        if per_migration and not source.run_long_lock:
            logger.warning(
                "transaction_per_migration needs a lock that outlives a transaction, which "
                "%s cannot have here; running all revisions in one transaction instead",
                source.url,
            )
            per_migration = False
        progress = Progress()
        logged = _steps.Logged(
            progress,
            migrates=self.migrates,
            saw_work=saw_work,
            on_steps=sidecar.starting,
            # Between revisions that commit on their own, the run lock keeps others out.
            between_steps=source.check_midway if per_migration else None,
        )
        with _steps.installed(self.env, self._work_function(logged)):
            try:
                connection = acquire(
                    lambda timeout_s: source.try_lock(
                        timeout_s, begin=not per_migration, still_waiting=still_waiting
                    ),
                    self.policy,
                    url=source.url,
                    causes=source.timeout_causes,
                    describe_holder=sidecar.holder_suffix,
                    keep_waiting=sidecar.holder_alive if self.wait_while_alive else None,
                    started_at=started,  # the deadline counts from the first wait
                )
            except exc.DBAPIError as error:
                raise source.database_error(error) from error
            stop_watching = source.watch(
                connection, lambda: describe(progress.running) if progress.running else "?"
            )
            try:
                self._migrate(source, connection, before_commit=sidecar.finished)
                # Logged before the lock is released, so that in a shared log every
                # "Applied" line comes before the next worker's "already applied".
                self.state.applied.extend(log_applied(progress))
            except BaseException as error:
                _rollback(source, connection, source.url, error)
                if not source.transactional:
                    # Each finished revision committed on its own there: it is applied.
                    self.state.applied.extend(log_applied(progress))
                if self.stop.received:  # the exit line says where the stop left the database
                    heads_after = _heads_after_rollback(self.env, source, connection)
                    self.stop.heads = None if heads_after is None else revisions(heads_after)
                if isinstance(error, Exception) and not isinstance(error, MigrationLockError):
                    heads_now = _heads_after_rollback(self.env, source, connection)
                    raise migration_error(
                        source.url, progress, error, heads_now,
                        transactional=source.transactional, hint=source.failure_hint(error),
                    ) from error
                raise
            finally:
                sidecar.finished()  # if the run failed (the record is true only while held)
                source.release(connection)  # after COMMIT or ROLLBACK
                stop_watching()  # after the release: a waiter may be taking the lock

    def _migrate(
        self, source: Backend, connection: Connection, *, before_commit: Callable[[], None]
    ) -> None:
        """Run the command on a connection that holds the lock, then check and commit.

        ``before_commit`` runs last before the COMMIT: work that must happen under the
        lock but need not keep the next worker waiting after it.
        """
        self.env.configure(connection=connection, **self.kwargs)
        migration_context = self.env.get_context()
        if connection.in_transaction() and source.run_long_lock:
            # Alembic treats a transaction it did not begin as the caller's and leaves it
            # alone (no COMMIT per revision). autocommit_block() wants to commit "its"
            # transaction first and begin a new one after: let it see ours. The lock
            # that outlives the transaction keeps other workers out during the block.
            _alembic.adopt_transaction(migration_context, connection)
            _alembic.replace_autocommit_block(
                migration_context, lambda block: _checked_autocommit(block, source)
            )
        elif not source.run_long_lock:
            # Alembic would fail on a bare assertion; say why and what to do instead.
            _alembic.replace_autocommit_block(
                migration_context, lambda _block: _autocommit_refused(source)
            )
        self.env.run_migrations()
        source.before_commit(connection)
        before_commit()
        # A SIGTERM during the COMMIT waits for it: then the run knows which side of it
        # the stop landed on ("rolled back" or "already committed").
        with self.stop.held():
            source.commit(connection)
            self.stop.committed = True


def _checked_autocommit(
    autocommit_block: Callable[[], Any], source: Backend
) -> Callable[[], Any]:
    """Alembic's autocommit_block(), with the run's lock checked before the block commits
    the run so far and again after it: only that lock keeps other workers out there."""

    @contextmanager
    def checked() -> Iterator[None]:
        source.check_midway()
        with autocommit_block():
            yield
        source.check_midway()

    return checked


def _autocommit_refused(source: Backend) -> Callable[[], Any]:
    """In place of Alembic's autocommit_block() when the lock ends with a transaction."""

    def autocommit_block() -> Any:
        raise source.autocommit_refused()

    return autocommit_block


def _heads_after_rollback(
    env: EnvironmentContext, source: Backend, connection: Connection
) -> tuple[str, ...] | None:
    """Where the database really is after a failed run (part may have been committed)."""
    try:
        source.read_only(connection)
        heads = env.get_context().get_current_heads()
        source.rollback(connection)
        return heads
    except Exception as error:
        logger.debug("Could not read the version after the failure: %s", error)
        return None


def _rollback(source: Backend, connection: Connection, url: str, error: BaseException) -> None:
    try:
        source.rollback(connection)
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
            "(on SQLite: `PRAGMA integrity_check`) and restore a backup if it is damaged."
        )
        raise RollbackFailed(msg, url=url) from rollback_error
