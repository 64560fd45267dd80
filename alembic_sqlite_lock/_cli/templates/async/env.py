"""Alembic environment for an async app, made by `alembic-sqlite-lock init --async`.

Alembic's async template (`alembic init -t async`) in the one-call form: its
asyncio.run() / connection.run_sync() boilerplate is replaced by run_migrations(), which
holds the migration lock from before the current revision is read until the new one is
committed, so every worker can run `alembic upgrade head` at start-up.

sqlalchemy.url may be the app's async URL (sqlite+aiosqlite://, postgresql+asyncpg://,
postgresql+psycopg_async://, mysql+aiomysql://, mysql+asyncmy://). The run goes through
the synchronous driver of the same database when one is installed (pysqlite, psycopg or
psycopg2, PyMySQL or mysqlclient), else through the async driver itself, on an event
loop of its own: this file needs no async code, and `await
alembic_sqlite_lock.upgrade_async("alembic.ini")` in the app's lifespan runs it without
blocking the app's event loop.
"""

from logging.config import fileConfig

from alembic import context
from alembic_sqlite_lock import run_migrations

config = context.config

# Configure logging from alembic.ini only when a command line runs us; an app calling
# alembic_sqlite_lock.upgrade_async() at start-up keeps its own logging.
if config.config_file_name is not None and config.cmd_opts is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)

# Your models' MetaData, for `alembic revision --autogenerate` and `alembic check`:
#     from myapp.models import Base
#     target_metadata = Base.metadata
target_metadata = None

# To migrate through the app's own async engine instead, hand in its connection's sync
# face from inside run_sync() (PostgreSQL, MySQL; SQLite wants a pysqlite connection):
#     async with engine.connect() as connection:
#         await connection.run_sync(migrate)  # migrate(sync_connection) sets
#     # config.attributes["connection"] = sync_connection, then alembic_sqlite_lock.upgrade(config)
# run_migrations() locks that connection the same way.

# Keyword arguments go to context.configure(), e.g. compare_type=True.
run_migrations(context, target_metadata)
