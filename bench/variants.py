"""The variants compared: what each worker calls after the start signal.

* ``stock``: ``alembic.command.upgrade`` with Alembic's own env.py, no lock at all. Alone
  it is the floor ("solo"); with N workers it races and some of them fail.
* ``filelock``: the same, inside ``filelock.FileLock("app.db.lock")``, which is what
  many users write by hand. Correct, but every worker, even one with nothing to do,
  waits for the lock and then loads Alembic's script directory and env.py in turn.
* ``ours``: ``alembic_sqlite_lock.upgrade("alembic.ini")`` with the repository's env.py.

The ``lock-ready`` case compares, on a database already at head, a framework's own
set-up (``create_all`` of its tables, which finds them there, and a read of the version)
without any lock, ``setup``, with the same set-up inside ``migration_lock(url, ready=...)``,
``ready=`` being the project's alembic.ini (``ready-ini``), its script folder
(``ready-dir``) or a cheap function (``ready-fn``: one ``sqlite3`` SELECT of the version).

The command-line case (``cli-cold``, ``cli-warm``: one new process, timed from its start)
runs each variant's console script (``script``) instead: ``stock``, Alembic's ``alembic``
with Alembic's env.py; ``ours-cli``, this library's ``alembic-sqlite-lock``; ``ours-env``,
Alembic's ``alembic`` with the repository's env.py (the library entered through env.py).
Their ``call`` is what the script amounts to in a forked worker.

Everything a worker needs is imported here, in the driver, before it forks.
"""

from __future__ import annotations

import logging.config
import sqlite3
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import alembic.command
import alembic.config
import filelock
import sqlalchemy as sa
import sqlalchemy.dialects.sqlite

import alembic_sqlite_lock
from alembic_sqlite_lock._lock import Ready

from .forked import Work
from .projects import HEAD

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
    ready_for: Callable[[Path], Ready] | None = None
    """For the ``lock-ready`` case: the ``ready=`` it passes, for a project's alembic.ini."""
    script: str | None = None
    """For the command-line case: the console script (in the venv's bin) it runs."""

    def work(self, ini: Path, revision: str = "head") -> Work:
        return partial(self.call, ini, revision)


# A framework's own tables: the demo chain's, as its models would declare them.
_METADATA = sa.MetaData()
for _name in ("users", "posts", "tags"):
    sa.Table(_name, _METADATA, sa.Column("id", sa.Integer, primary_key=True))


def project_url(ini: Path) -> str:
    return f"sqlite:///{ini.parent / 'app.db'}"


def _framework_setup(url: str) -> None:
    """What a framework does when it starts: an engine, ``create_all`` (which finds its
    tables there and creates nothing), a read of the schema version, ``dispose``."""
    engine = sa.create_engine(url)
    try:
        _METADATA.create_all(engine)
        with engine.connect() as connection:
            version = connection.execute(
                sa.text("SELECT version_num FROM alembic_version")).scalar_one()
        if not version:
            raise RuntimeError(f"no schema version in {url}")
    finally:
        engine.dispose()


def _setup(ini: Path, _revision: str) -> None:
    _framework_setup(project_url(ini))


def at_head(db: Path, head: str) -> bool:
    """The cheap ``ready=`` function: one plain sqlite3 SELECT of the version (an
    exception, no table yet, counts as no)."""
    with closing(sqlite3.connect(db)) as connection:
        return connection.execute("SELECT version_num FROM alembic_version").fetchall() == [
            (head,)]


def _ready_ini(ini: Path) -> Ready:
    return str(ini)


def _ready_dir(ini: Path) -> Ready:
    return str(ini.parent / "alembic")


def _ready_fn(ini: Path) -> Ready:
    return partial(at_head, ini.parent / "app.db", HEAD)


def _in_migration_lock(ready_for: Callable[[Path], Ready]) -> Callable[[Path, str], None]:
    def call(ini: Path, _revision: str) -> None:
        url = project_url(ini)
        with alembic_sqlite_lock.migration_lock(url, ready=ready_for(ini)):
            _framework_setup(url)

    return call


STOCK = Variant("stock", "stock Alembic (no lock)", stock_env=True, call=_stock,
                script="alembic")
FILELOCK = Variant("filelock", "FileLock + command.upgrade", stock_env=True, call=_filelock)
OURS = Variant("ours", "alembic_sqlite_lock.upgrade", stock_env=False, call=_ours)
ALL = (STOCK, FILELOCK, OURS)

SETUP = Variant("setup", "framework set-up, no lock", stock_env=False, call=_setup)
READY_INI = Variant("ready-ini", "migration_lock(ready=alembic.ini)", stock_env=False,
                    call=_in_migration_lock(_ready_ini), ready_for=_ready_ini)
READY_DIR = Variant("ready-dir", "migration_lock(ready=script folder)", stock_env=False,
                    call=_in_migration_lock(_ready_dir), ready_for=_ready_dir)
READY_FN = Variant("ready-fn", "migration_lock(ready=function)", stock_env=False,
                   call=_in_migration_lock(_ready_fn), ready_for=_ready_fn)
READY = (SETUP, READY_INI, READY_DIR, READY_FN)
"""The ``lock-ready`` case's variants; ``setup`` is their floor."""

CLI_ENV = Variant("ours-env", "alembic CLI, our env.py", stock_env=False, call=_stock,
                  script="alembic")
CLI_OURS = Variant("ours-cli", "alembic-sqlite-lock CLI, our env.py", stock_env=False,
                   call=_ours, script="alembic-sqlite-lock")
CLI = (STOCK, CLI_ENV, CLI_OURS)
"""The command-line case's variants: ``upgrade head`` through each console script."""

BY_NAME = {variant.name: variant for variant in (*ALL, *READY, CLI_ENV, CLI_OURS)}
