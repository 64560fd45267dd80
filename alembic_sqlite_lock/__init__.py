"""Make ``alembic upgrade head`` safe to run from every worker at once, on SQLite.

In env.py::

    from alembic import context
    from alembic_sqlite_lock import run_migrations

    run_migrations(context, target_metadata)

At app start-up::

    import alembic_sqlite_lock

    alembic_sqlite_lock.upgrade("alembic.ini")

In an async app's lifespan::

    await alembic_sqlite_lock.upgrade_async("alembic.ini")

Around code that creates or migrates its own tables (a framework's start-up)::

    with alembic_sqlite_lock.migration_lock("sqlite:///app.db"):
        storage = make_storage("sqlite:///app.db")
"""

import importlib
import logging
import os
import sys
import typing

from ._version import __version__

if typing.TYPE_CHECKING:  # the names below, for type checkers (see __getattr__)
    from ._aio import upgrade_async
    from ._commands import downgrade, stamp, upgrade
    from ._env import run_migrations
    from ._errors import (
        BackupFailed,
        ConfigurationError,
        DatabaseUnreadable,
        DatabaseUnusable,
        LockFileUnusable,
        LockLost,
        LockNotTaken,
        LockTimeout,
        MigrationError,
        MigrationLockError,
        MultipleHeadsError,
        RollbackFailed,
        UnknownDatabaseRevision,
        UnknownRevision,
    )
    from ._lock import migration_lock, migration_lock_async
    from ._retry import RetryPolicy

__all__ = [
    "BackupFailed",
    "ConfigurationError",
    "DatabaseUnreadable",
    "DatabaseUnusable",
    "LockFileUnusable",
    "LockLost",
    "LockNotTaken",
    "LockTimeout",
    "MigrationError",
    "MigrationLockError",
    "MultipleHeadsError",
    "RetryPolicy",
    "RollbackFailed",
    "UnknownDatabaseRevision",
    "UnknownRevision",
    "__version__",
    "downgrade",
    "migration_lock",
    "migration_lock_async",
    "run_migrations",
    "stamp",
    "upgrade",
    "upgrade_async",
]

# A library never configures logging; the NullHandler keeps Python from printing
# "No handlers could be found" style fallbacks when the app configured none.
logging.getLogger(__name__).addHandler(logging.NullHandler())

# The API is imported with the package, so that an app server that imports it before it
# forks its workers (gunicorn --preload) has it loaded once, in the parent (the SQLite
# backend alone cost every worker about 10 ms when it was imported after the fork).
# One exception: the `alembic-sqlite-lock` console script imports this package before
# its main() runs, and `upgrade` at head answers without Alembic or SQLAlchemy
# (_cli/_athead.py); there the API is imported on first use, by __getattr__ below.
_ERRORS = ("BackupFailed", "ConfigurationError", "DatabaseUnreadable", "DatabaseUnusable",
           "LockFileUnusable", "LockLost", "LockNotTaken", "LockTimeout", "MigrationError",
           "MigrationLockError", "MultipleHeadsError", "RollbackFailed",
           "UnknownDatabaseRevision", "UnknownRevision")
_WHERE = {
    "upgrade_async": "._aio", "downgrade": "._commands", "stamp": "._commands",
    "upgrade": "._commands", "run_migrations": "._env", "migration_lock": "._lock",
    "migration_lock_async": "._lock", "RetryPolicy": "._retry",
    **dict.fromkeys(_ERRORS, "._errors"),
}
"""Each name of the API, and the module it is defined in."""


def __getattr__(name: str) -> object:
    if name not in _WHERE:
        msg = f"module {__name__!r} has no attribute {name!r}"
        raise AttributeError(msg)
    for exported, module in _WHERE.items():
        globals()[exported] = getattr(importlib.import_module(module, __name__), exported)
    return globals()[name]


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def _console_script() -> bool:
    """Started as the ``alembic-sqlite-lock`` console script (its path is argv[0])."""
    return bool(sys.argv) and os.path.basename(sys.argv[0]) == "alembic-sqlite-lock"


if not _console_script():
    __getattr__("upgrade")  # every name of the API, now
