"""Alembic environment for the demo chain.

Alembic's stock env.py with its online/offline boilerplate replaced by one call:
alembic_sqlite_lock.run_migrations() takes SQLite's write lock before the current
revision is read and holds it until the new revision is committed.
"""

from logging.config import fileConfig

from alembic import context
from alembic_sqlite_lock import run_migrations

config = context.config

# Configure logging from alembic.ini only when Alembic's own command line runs us; an
# app calling alembic_sqlite_lock.upgrade() at start-up keeps its logging as it is.
# disable_existing_loggers=False: fileConfig would otherwise silence every logger
# that already exists.
if config.config_file_name is not None and config.cmd_opts is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)

# Your models' MetaData, for `alembic revision --autogenerate` and `alembic check`.
target_metadata = None

run_migrations(context, target_metadata)
