"""Alembic environment, made by `alembic-sqlite-lock init`.

Alembic's online/offline boilerplate is replaced by one call: run_migrations() takes
SQLite's write lock before the current revision is read and holds it until the new
revision is committed, so every worker can run `alembic upgrade head` at start-up.
"""

from logging.config import fileConfig

from alembic import context
from alembic_sqlite_lock import run_migrations

config = context.config

# Configure logging from alembic.ini only when a command line runs us; an app calling
# alembic_sqlite_lock.upgrade() at start-up keeps its own logging.
if config.config_file_name is not None and config.cmd_opts is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)

# Your models' MetaData, for `alembic revision --autogenerate` and `alembic check`:
#     from myapp.models import Base
#     target_metadata = Base.metadata
target_metadata = None

# Keyword arguments go to context.configure(), e.g. render_as_batch=True.
run_migrations(context, target_metadata)
