"""The variants compared: what each worker calls after the start signal.

* ``stock``: ``alembic.command.upgrade`` with Alembic's own env.py, no lock at all. Alone
  it is the floor ("solo"); with N workers it races and some of them fail.
* ``filelock``: the same, inside ``filelock.FileLock("app.db.lock")``, which is what
  many users write by hand. Correct, but every worker, even one with nothing to do,
  waits for the lock and then loads Alembic's script directory and env.py in turn.
* ``ours``: ``alembic_sqlite_lock.upgrade("alembic.ini")`` with the repository's env.py.

Everything a worker needs is imported here, in the driver, before it forks.
"""

from __future__ import annotations

import logging.config
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import alembic.command
import alembic.config
import filelock
import sqlalchemy.dialects.sqlite

import alembic_sqlite_lock

from .forked import Work

# Both env.py files import logging.config (about 10 ms on this machine): an import,
# done before the fork like the others, not per-worker migration work.
_PRELOADED = (sqlalchemy.dialects.sqlite, logging.config)


def _stock(ini: Path, revision: str) -> None:
    alembic.command.upgrade(alembic.config.Config(str(ini)), revision)


def _filelock(ini: Path, revision: str) -> None:
    with filelock.FileLock(str(ini.parent / "app.db.lock")):
        alembic.command.upgrade(alembic.config.Config(str(ini)), revision)


def _ours(ini: Path, revision: str) -> None:
    alembic_sqlite_lock.upgrade(str(ini), revision)


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    stock_env: bool
    """True: the project gets Alembic's stock env.py; False: the repository's."""
    call: Callable[[Path, str], None]

    def work(self, ini: Path, revision: str = "head") -> Work:
        return partial(self.call, ini, revision)


STOCK = Variant("stock", "stock Alembic (no lock)", stock_env=True, call=_stock)
FILELOCK = Variant("filelock", "FileLock + command.upgrade", stock_env=True, call=_filelock)
OURS = Variant("ours", "alembic_sqlite_lock.upgrade", stock_env=False, call=_ours)
ALL = (STOCK, FILELOCK, OURS)
BY_NAME = {variant.name: variant for variant in ALL}
