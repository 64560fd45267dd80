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

import logging

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
from ._version import __version__

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
