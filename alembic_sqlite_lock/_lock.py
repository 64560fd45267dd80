"""``migration_lock()``: the migration lock around code that migrates on its own.

Frameworks that create or migrate their own tables when they start (MLflow's tracking
store, Optuna's ``RDBStorage``) race like Alembic's workers do. ``with
migration_lock(url):`` holds, for the block, the same lock that ``run_migrations()``
takes for a run, so blocks and runs exclude each other in both directions. Each backend
takes it its own way (``Backend.hold``): on SQLite the run lock file alone, never
SQLite's write lock, so the block's own code can write the database.

A run or a block inside a block of the same flow of control does not wait for its own
lock (see ``_held``): ``with migration_lock(cfg): upgrade(cfg)`` works.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from typing import Any

from alembic.config import Config
from sqlalchemy import exc
from sqlalchemy.engine import URL

from ._backends import Backend, RunOptions, bad_url, open_backend
from ._commands import _as_config
from ._held import Held, enter
from ._retry import acquire
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


@contextmanager
def migration_lock(target: LockTarget, **settings: Unpack[SettingsKeywords]) -> Iterator[None]:
    """Hold the migration lock of ``target``'s database for the block.

    ``target`` is a database URL, an ``alembic.config.Config`` or the path of an
    alembic.ini; ``settings`` are the lock settings, as for :func:`upgrade`. Waits as a
    run waits (``deadline_s``, then ``LockTimeout``); the lock is released when the
    block ends, by an exception too, and by the process's death.
    """
    lock = BlockLock(target, settings)
    held = lock.acquire()
    leave = enter(held)
    try:
        yield
    finally:
        leave()
        lock.release(held)


@asynccontextmanager
async def migration_lock_async(
    target: LockTarget, **settings: Unpack[SettingsKeywords]
) -> AsyncIterator[None]:
    """:func:`migration_lock` for async code: the wait happens in a worker thread, so the
    event loop keeps running; ``await upgrade_async(...)`` inside the block proceeds."""
    lock = await asyncio.to_thread(BlockLock, target, settings)
    taking = asyncio.ensure_future(asyncio.to_thread(lock.acquire))
    try:
        held = await asyncio.shield(taking)
    except asyncio.CancelledError:
        # The thread goes on waiting: whatever it gets is let go at once.
        taking.add_done_callback(lambda done: _release_later(lock, done))
        raise
    leave = enter(held)  # in this task's context, which to_thread() copies
    try:
        yield
    finally:
        leave()
        await asyncio.to_thread(lock.release, held)


def _release_later(lock: BlockLock, done: asyncio.Future[Held]) -> None:
    if done.cancelled() or done.exception() is not None:
        return
    held = done.result()
    threading.Thread(target=lock.release, args=(held,), daemon=True).start()


class BlockLock:
    """One block's lock: its backend and settings, resolved when the block starts."""

    def __init__(self, target: LockTarget, overrides: Mapping[str, Any]) -> None:
        config, section, where = _resolve_target(target)
        self.settings: Settings = resolve_settings(config, overrides)
        options = RunOptions(
            policy=self.settings.policy,
            lock_key=self.settings.lock_key,
            lock_scope=self.settings.lock_scope,
            # A run's version table comes from its env.py, which a block cannot see:
            # Alembic's default. Another name: set the same lock_key for both.
            version_table="alembic_version",
            version_table_schema=None,
        )
        try:
            self.backend: Backend = open_backend(
                section=section, handed_in=None, options=options, where=where,
                ini=config.config_file_name,
            )
        except (exc.ArgumentError, ValueError) as error:  # ValueError: a bad port number
            shown = describe_url(section.get("sqlalchemy.url", ""))
            raise bad_url(shown, error, config.config_file_name) from None

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


def _resolve_target(target: LockTarget) -> tuple[Config, dict[str, str], str]:
    """The configuration settings are read from, the section with ``sqlalchemy.url``,
    and how errors name it."""
    if isinstance(target, URL):
        target = target.render_as_string(hide_password=False)
    if isinstance(target, str) and "://" in target:
        return Config(), {"sqlalchemy.url": target}, "the URL given to migration_lock()"
    config = _as_config(target)
    section = config.get_section(config.config_ini_section, {})
    where = (f"the [{config.config_ini_section}] section of "
             f"{config.config_file_name or 'the Alembic configuration (no file)'}")
    return config, section, where
