"""Flask-Migrate's environment, made by `alembic-sqlite-lock init --flask-migrate`.

Flask-Migrate's own env.py with its online/offline boilerplate replaced by one call:
run_migrations() takes the migration lock before the current revision is read and holds
it until the new revision is committed, so every worker may run `flask db upgrade`.
"""

import logging
from logging.config import fileConfig
from typing import Any

from flask import current_app

from alembic import context
from alembic_sqlite_lock import run_migrations

config = context.config

# Logging from alembic.ini, as Flask-Migrate's template does; the loggers an app set up
# before stay enabled.
if config.config_file_name is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)
logger = logging.getLogger("alembic.env")


def get_engine() -> Any:
    try:
        # this works with Flask-SQLAlchemy<3 and Alchemical
        return current_app.extensions["migrate"].db.get_engine()
    except (TypeError, AttributeError):
        # this works with Flask-SQLAlchemy>=3
        return current_app.extensions["migrate"].db.engine


def get_engine_url() -> str:
    try:
        url: str = get_engine().url.render_as_string(hide_password=False)
        return url.replace("%", "%%")
    except AttributeError:
        return str(get_engine().url).replace("%", "%%")  # SQLAlchemy < 1.4


# The run opens its own connection, from the URL of the app's engine.
config.set_main_option("sqlalchemy.url", get_engine_url())
target_db = current_app.extensions["migrate"].db


def get_metadata() -> Any:
    if hasattr(target_db, "metadatas"):
        return target_db.metadatas[None]
    return target_db.metadata


def process_revision_directives(context: Any, revision: Any, directives: list[Any]) -> None:
    """`flask db migrate` with no schema change writes no empty revision."""
    if getattr(config.cmd_opts, "autogenerate", False):
        script = directives[0]
        if script.upgrade_ops.is_empty():
            directives[:] = []
            logger.info("No changes in schema detected.")


conf_args = dict(current_app.extensions["migrate"].configure_args)
if conf_args.get("process_revision_directives") is None:
    conf_args["process_revision_directives"] = process_revision_directives

run_migrations(context, get_metadata(), **conf_args)
