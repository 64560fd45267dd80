"""``migration_lock()``: the migration lock around code that migrates on its own.

Frameworks that create or migrate their own tables when they start (MLflow's tracking
store, Optuna's ``RDBStorage``) race like Alembic's workers do. ``with
migration_lock(url):`` holds, for the block, the same lock that ``run_migrations()``
takes for a run, so blocks and runs exclude each other in both directions. Each backend
takes it its own way (``Backend.hold``): on SQLite the run lock file alone, never
SQLite's write lock, so the block's own code can write the database.

A run or a block inside a block of the same flow of control does not wait for its own
lock (see ``_held``): ``with migration_lock(cfg): upgrade(cfg)`` works.

``ready=`` keeps warm starts from queueing: N workers that find the database set up
already run the block side by side, without the lock. ``run_command`` is
``alembic-sqlite-lock exec``: a command run while the lock is held, told through its
environment what it runs under, so that its own runs and blocks do not wait for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from types import FrameType
from typing import Any

from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import exc
from sqlalchemy.engine import URL

from ._backends import Backend, RunOptions, open_backend
from ._commands import _as_config
from ._errors import ConfigurationError
from ._held import ENV, Held, child_environment, die_with_parent, enter
from ._retry import acquire
from ._revisions import RevisionCache
from ._settings import Settings, SettingsKeywords, resolve_settings
from ._urls import describe_url

if sys.version_info >= (3, 11):
    from typing import Unpack
else:  # SQLAlchemy 2 depends on typing_extensions
    from typing_extensions import Unpack

logger = logging.getLogger(__name__)

LockTarget = str | URL | Config | os.PathLike[str]
"""A database URL (text or ``sqlalchemy.URL``), an Alembic ``Config``, or the path of an
alembic.ini."""

AsyncReady = Callable[[], Awaitable[bool]]
"""``ready=`` of :func:`migration_lock_async` may also be an async function."""

Ready = Callable[[], bool] | Config | str | os.PathLike[str]
"""``ready=``: a function answering "is the database set up already?", or the Alembic
environment whose heads a set-up database has (a ``Config``, the path of its alembic.ini
or of its script folder)."""


@contextmanager
def migration_lock(
    target: LockTarget, *, ready: Ready | None = None, **settings: Unpack[SettingsKeywords]
) -> Iterator[None]:
    """Hold the migration lock of ``target``'s database for the block.

    ``target`` is a database URL, an ``alembic.config.Config`` or the path of an
    alembic.ini; ``settings`` are the lock settings, as for :func:`upgrade`. Waits as a
    run waits (``deadline_s``, then ``LockTimeout``); the lock is released when the
    block ends, by an exception too, and by the process's death.

    ``ready``: asked first, without the lock; when it answers yes the block runs without
    the lock, so that workers finding the database set up do not queue. A function (an
    exception counts as no), or an Alembic environment: ready when the database's
    version table holds exactly that environment's heads.
    """
    lock = BlockLock(target, settings)
    if ready is not None and lock.is_ready(ready):
        lock.close()
        yield
        return
    held = lock.acquire()
    leave = enter(held)
    try:
        yield
    finally:
        leave()
        lock.release(held)


@asynccontextmanager
async def migration_lock_async(
    target: LockTarget,
    *,
    ready: Ready | AsyncReady | None = None,
    **settings: Unpack[SettingsKeywords],
) -> AsyncIterator[None]:
    """:func:`migration_lock` for async code: the wait happens in a worker thread, so the
    event loop keeps running; ``await upgrade_async(...)`` inside the block proceeds.
    ``ready`` (a plain function, or an Alembic environment) is asked in that thread too;
    an async function is awaited."""
    lock = await asyncio.to_thread(BlockLock, target, settings)
    if ready is not None and await _is_ready_async(lock, ready):
        await asyncio.to_thread(lock.close)
        yield
        return
    taking = _Taking(lock)
    try:
        held = await asyncio.to_thread(taking.acquire)
    except asyncio.CancelledError:
        taking.abandon()  # the thread goes on waiting: what it gets is let go at once
        raise
    leave = enter(held)  # in this task's context, which to_thread() copies
    try:
        yield
    finally:
        leave()
        await asyncio.to_thread(lock.release, held)


async def _is_ready_async(lock: BlockLock, ready: Ready | AsyncReady) -> bool:
    """An async function is awaited here, in the loop; anything else is asked in a
    worker thread (a plain function may block on its database)."""
    if inspect.iscoroutinefunction(ready):
        answer = await lock.ask_async(ready)
        return answer
    return await asyncio.to_thread(lock.is_ready, ready)  # type: ignore[arg-type]


class _Taking:
    """A wait for the lock in a worker thread that its task may abandon (cancelled):
    the thread cannot be stopped, so whichever of the two comes second lets the lock
    go, the thread when it gets the lock after the abandon, or the abandon when the
    thread got it before. Not through the task's callbacks: asyncio.run() cancels
    every task left when it ends, and the callbacks of a cancelled task see no lock."""

    def __init__(self, lock: BlockLock) -> None:
        self.lock = lock
        self._guard = threading.Lock()
        self._abandoned = False
        self._held: Held | None = None

    def acquire(self) -> Held:
        held = self.lock.acquire()
        with self._guard:
            if not self._abandoned:
                self._held = held
                return held
        self.lock.release(held)
        raise asyncio.CancelledError

    def abandon(self) -> None:
        with self._guard:
            self._abandoned = True
            held, self._held = self._held, None
        if held is not None:  # got it just as the task was cancelled
            threading.Thread(target=self.lock.release, args=(held,)).start()


class BlockLock:
    """One block's lock: its settings, resolved when the block starts, and its backend,
    opened when first needed (a ``ready=`` function that says yes needs none: warm
    starts then cost the function and the settings, not an engine)."""

    def __init__(self, target: LockTarget, overrides: Mapping[str, Any]) -> None:
        self._config, self._section, self._where = _resolve_target(target)
        self.settings: Settings = resolve_settings(self._config, overrides)
        self.url = describe_url(self._section.get("sqlalchemy.url", ""))

    @functools.cached_property
    def backend(self) -> Backend:
        options = RunOptions(
            policy=self.settings.policy,
            lock_key=self.settings.lock_key,
            lock_scope=self.settings.lock_scope,
            # A run's version table comes from its env.py, which a block cannot see:
            # Alembic's default. Another name: set the same lock_key for both.
            version_table=VERSION_TABLE,
            version_table_schema=None,
        )
        return open_backend(
            section=self._section, handed_in=None, options=options, where=self._where,
            ini=self._config.config_file_name,
        )

    def is_ready(self, ready: Ready) -> bool:
        """``ready``'s answer, asked without the lock; no when it cannot answer."""
        try:
            if callable(ready):
                result = ready()
                if inspect.isawaitable(result):
                    _close(result)
                    msg = (
                        f"ready= for {self.url} returned an awaitable, which a plain "
                        "migration_lock() cannot await (and would take for a yes). Use "
                        "`async with migration_lock_async(..., ready=...)`, or a plain "
                        "function."
                    )
                    raise ConfigurationError(msg)
                answer = bool(result)
            else:
                answer = self._at_heads(_ready_config(ready))
        except ConfigurationError:
            raise  # a wrong ready= is the caller's to fix, not a "no"
        except Exception as error:  # "cannot tell" (no table yet...) means "take the lock"
            logger.debug("ready= could not tell whether %s is set up (%s): taking the "
                         "migration lock", self.url, error)
            return False
        logger.debug("%s is %s", self.url, "ready: the block runs without the migration "
                     "lock" if answer else "not ready: taking the migration lock")
        return answer

    async def ask_async(self, ready: AsyncReady) -> bool:
        """An async ``ready=``'s answer: as :meth:`is_ready`, awaited."""
        try:
            answer = bool(await ready())
        except Exception as error:
            logger.debug("ready= could not tell whether %s is set up (%s): taking the "
                         "migration lock", self.url, error)
            return False
        return answer

    def _at_heads(self, config: Config) -> bool:
        """The version table holds exactly the environment's heads. The version first:
        a new database answers no without loading a single revision file."""
        if self.backend.creates_database():  # a look would create the file
            return False
        versions = self.backend.read_versions(VERSION_TABLE, None)
        if not versions:
            return False
        script = ScriptDirectory.from_config(config)
        # The revision cache's heads, when right: no revision file imported.
        return set(versions) == set(RevisionCache(script, self.settings.revision_cache).heads())

    def close(self) -> None:
        if "backend" in self.__dict__:  # opened
            self.backend.close()

    def acquire(self) -> Held:
        """Wait for the lock as a run does: the same retries, log lines and deadline."""
        backend, policy = self.backend, self.settings.policy
        started = time.monotonic()
        try:
            sidecar = backend.side_files(self.settings)

            def still_waiting() -> None:
                logger.info(
                    "Still waiting for the migration lock on %s after %.1fs%s",
                    backend.url, time.monotonic() - started, sidecar.holder_suffix(),
                )

            return acquire(
                lambda timeout_s: backend.hold(timeout_s, still_waiting=still_waiting),
                policy,
                url=backend.url,
                causes=backend.timeout_causes,
                describe_holder=sidecar.holder_suffix,
                keep_waiting=sidecar.holder_alive if self.settings.wait_while_holder_alive
                else None,
                started_at=started,
            )
        except exc.DBAPIError as error:
            backend.close()
            raise backend.database_error(error) from error
        except BaseException:
            backend.close()
            raise

    def release(self, held: Held) -> None:
        try:
            held.release()
        finally:
            self.backend.close()


VERSION_TABLE = "alembic_version"


def _ready_config(ready: Config | str | os.PathLike[str]) -> Config:
    """``ready=``'s Alembic environment: a Config, an alembic.ini, or a script folder."""
    if isinstance(ready, Config):
        return ready
    path = os.fspath(ready)
    if os.path.isfile(os.path.join(path, "env.py")):
        config = Config()
        config.set_main_option("script_location", path)
        return config
    if os.path.isfile(path):
        config = Config(path)
        get_option = getattr(config, "get_alembic_option", config.get_main_option)
        try:
            has_scripts = bool(get_option("script_location"))
        except Exception:  # not an ini at all: configparser's errors
            has_scripts = False
        if has_scripts:
            return config
    msg = (
        f"ready= names {os.path.abspath(path)}, which is neither an alembic.ini nor a "
        "folder of migration scripts (one with an env.py). Pass a function that tells "
        "whether the database is set up, an alembic.config.Config, or one of those paths."
    )
    raise ConfigurationError(msg)


def run_command(
    target: LockTarget, command: Sequence[str], settings: Mapping[str, Any]
) -> int:
    """``alembic-sqlite-lock exec``: run ``command`` while holding ``target``'s migration
    lock, and return its exit status (128 + N for a command killed by signal N).

    The command learns through its environment (``_held.ENV``) what it runs under, so
    that a run or block of its own on the same database checks the lock and goes on
    instead of waiting for its wrapper. If the wrapper is killed, the command does not
    go on unlocked: on SQLite it inherits the run lock file's descriptor, so its flock
    lasts while the command lives; a server lock lives in the wrapper's session, so the
    command is killed with the wrapper (``PR_SET_PDEATHSIG``, Linux).
    """
    lock = BlockLock(target, settings)
    held = lock.acquire()
    try:
        environment = child_environment([held])
        descriptors = _handed_down_descriptors(environment)
        logger.info("Holding the migration lock on %s; running %s", lock.url,
                    shlex.join(command))
        return _run_forwarding_signals(
            command, environment, descriptors,
            # A descriptor lets the command hold the lock itself. Without one (server
            # locks) it must die with us. preexec_fn would also run the at-fork hooks,
            # which close the block's descriptors: only one of the two is ever needed.
            die_with_parent=not descriptors,
        )
    finally:
        lock.release(held)


def _handed_down_descriptors(environment: Mapping[str, str]) -> tuple[int, ...]:
    """The descriptors that ``environment``'s lock claims name (ours, or our wrapper's
    passed on): the command must inherit them for the claims to hold."""
    try:
        claim = json.loads(environment.get(ENV, "") or "{}")
        fds = {lock["fd"] for lock in claim.get("locks", ()) if isinstance(lock.get("fd"), int)}
    except (ValueError, AttributeError, TypeError):
        return ()
    return tuple(sorted(fd for fd in fds if _is_open(fd)))


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


_FORWARDED = tuple(
    getattr(signal, name) for name in
    ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGWINCH")
    if hasattr(signal, name)
)


def _run_forwarding_signals(
    command: Sequence[str],
    environment: Mapping[str, str],
    descriptors: tuple[int, ...],
    *,
    die_with_parent: bool,
) -> int:
    """Run ``command``, passing the signals a supervisor sends (SIGTERM from Kubernetes
    or docker stop, SIGHUP, SIGINT) on to it; its exit status."""
    child: subprocess.Popen[bytes] | None = None
    pending: list[int] = []

    def forward(signum: int, _frame: FrameType | None) -> None:
        if signum == signal.SIGINT and _terminal_sent_it():
            return  # Ctrl-C reached the command already: the terminal signals the group
        if child is None:
            pending.append(signum)
        else:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signum)

    main_thread = threading.current_thread() is threading.main_thread()
    previous = {signum: signal.signal(signum, forward) for signum in _FORWARDED} if (
        main_thread) else {}
    try:
        try:
            child = subprocess.Popen(
                list(command), env=dict(environment), pass_fds=descriptors,
                preexec_fn=_dying_with(os.getpid()) if die_with_parent else None,  # noqa: PLW1509
            )
        except OSError as error:
            return _not_started(command, error)
        for signum in pending:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signum)
        status = child.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return status if status >= 0 else 128 - status


def _terminal_sent_it() -> bool:
    """We are in the terminal's foreground process group, with the command: a Ctrl-C
    there has signalled it already, and forwarding would deliver a second one."""
    for fd in (0, 1, 2):
        with contextlib.suppress(OSError):
            if os.isatty(fd):
                return os.tcgetpgrp(fd) == os.getpgrp()
    return False


def _dying_with(parent: int) -> Callable[[], None]:
    """For the child, between fork and exec: ask the kernel for SIGKILL when the parent
    dies; and if it died already, before the request, die now."""
    set_death_signal = die_with_parent()

    def dying_with() -> None:
        set_death_signal()
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)

    return dying_with


def _not_started(command: Sequence[str], error: OSError) -> int:
    """The shell's answer to a command that cannot be run: 127 not found, 126 not
    executable."""
    code = 127 if isinstance(error, FileNotFoundError) else 126
    print(f"alembic-sqlite-lock: error: cannot run {command[0]!r}: {error.strerror}. "
          "Check the command after `--` (the migration lock was released).",
          file=sys.stderr)
    return code


def _close(awaitable: Any) -> None:
    """Close a coroutine that will never be awaited (no "never awaited" warning)."""
    close = getattr(awaitable, "close", None)
    if close is not None:
        close()


def _resolve_target(target: LockTarget) -> tuple[Config, dict[str, str], str]:
    """The configuration settings are read from, the section with ``sqlalchemy.url``,
    and how errors name it."""
    if isinstance(target, URL):
        target = target.render_as_string(hide_password=False)
    if isinstance(target, str) and "://" in target:
        return Config(), {"sqlalchemy.url": target}, "the URL given"
    config = _as_config(target)
    section = config.get_section(config.config_ini_section, {})
    where = (f"the [{config.config_ini_section}] section of "
             f"{config.config_file_name or 'the Alembic configuration (no file)'}")
    return config, section, where
