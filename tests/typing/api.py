"""The public API's types, checked by mypy (``make lint``), never run.

Correct calls must pass. Each wrong call carries the ``# type: ignore[...]`` that mypy
needs for it: with ``warn_unused_ignores`` (strict mode), an ignore that mypy no longer
needs fails the lint, so a misspelled setting or a wrong type can never pass silently.
"""

from __future__ import annotations

from pathlib import Path

from alembic.config import Config
from sqlalchemy import make_url

import alembic_sqlite_lock
from alembic_sqlite_lock import (
    downgrade,
    migration_lock,
    migration_lock_async,
    stamp,
    upgrade,
    upgrade_async,
)


def correct_calls(cfg: Config) -> None:
    applied: list[str] = upgrade(cfg)
    applied = upgrade("alembic.ini", "head", deadline_s=300, max_attempts=5)
    applied = upgrade(Path("alembic.ini"), sql=True, tag="t", busy_timeout_s=2.5)
    applied = upgrade(cfg, lock_key="app", lock_scope="transaction")
    applied = upgrade(cfg, lock_key=42)  # an integer key is fine too
    applied = upgrade(cfg, allow_unknown_revision=True, wait_while_holder_alive=False)
    applied = upgrade(cfg, backup_dir="backups", backup_keep=3)
    applied = upgrade(cfg, base_delay_s=0, jitter_s=0.05)  # an int is a float
    applied = downgrade(cfg, "-1", deadline_s=60)
    applied = stamp(cfg, ["a", "b"], purge=True, max_attempts=1)
    print(applied)


async def correct_async_calls(cfg: Config) -> list[str]:
    return await upgrade_async(cfg, "head", sql=False, tag=None, deadline_s=300)


def misspelled_settings(cfg: Config) -> None:
    upgrade(cfg, deadlin_s=300)  # type: ignore[call-arg]
    downgrade(cfg, "base", max_attempt=3)  # type: ignore[call-arg]
    stamp(cfg, "head", lock_timeout=5)  # type: ignore[call-arg]
    alembic_sqlite_lock.upgrade(cfg, backupdir="b")  # type: ignore[call-arg]


async def misspelled_async_setting(cfg: Config) -> None:
    await upgrade_async(cfg, deadline=300)  # type: ignore[call-arg]


def wrong_types(cfg: Config) -> None:
    upgrade(cfg, deadline_s="300")  # type: ignore[arg-type]
    upgrade(cfg, max_attempts=2.5)  # type: ignore[arg-type]
    upgrade(cfg, allow_unknown_revision="yes")  # type: ignore[arg-type]
    upgrade(cfg, backup_keep=None)  # type: ignore[arg-type]
    downgrade(cfg, "-1", lock_scope=1)  # type: ignore[arg-type]
    stamp(cfg, "head", backup_dir=Path("b"))  # type: ignore[arg-type]


async def wrong_async_type(cfg: Config) -> None:
    await upgrade_async(cfg, busy_timeout_s="2")  # type: ignore[arg-type]


def lock_blocks(cfg: Config) -> None:
    with migration_lock("sqlite:///app.db", deadline_s=300, wait_while_holder_alive=True):
        upgrade(cfg)
    with migration_lock(make_url("postgresql://db/app"), lock_key=42), migration_lock(cfg):
        pass
    with migration_lock(Path("alembic.ini")), migration_lock("alembic.ini"):
        pass
    with migration_lock(cfg, deadline=5):  # type: ignore[call-arg]
        pass
    with migration_lock(cfg, deadline_s="5"):  # type: ignore[arg-type]
        pass
    with migration_lock(42):  # type: ignore[arg-type]
        pass


async def async_lock_blocks(cfg: Config) -> None:
    async with migration_lock_async(cfg, deadline_s=300):
        await upgrade_async(cfg)
    async with migration_lock_async(cfg, max_attempt=3):  # type: ignore[call-arg]
        pass
