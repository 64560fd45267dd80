"""A Flask app that migrates its SQLite database at start-up, in every gunicorn worker.

    APP_DATABASE=/tmp/app.db gunicorn -c gunicorn.conf.py --workers 4 'app:create_app()'

Each worker runs the app factory, so each one calls ``alembic_sqlite_lock.upgrade()``:
one applies the pending migrations, the others wait for its lock, find the work done
and boot. ``/health`` answers 200 only when the database is at the script head.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from flask import Flask, request

import alembic_sqlite_lock

# Created at import, before the upgrade runs env.py: an env.py whose fileConfig()
# disabled existing loggers would silence it (this repository's env.py does not).
log = logging.getLogger("flask_app")

# The demo chain of this repository; point APP_ALEMBIC_INI at your own alembic.ini.
DEFAULT_INI = Path(__file__).resolve().parents[2] / "alembic.ini"


def alembic_config(database_url: str) -> Config:
    config = Config(os.environ.get("APP_ALEMBIC_INI", str(DEFAULT_INI)))
    # set_main_option interpolates %(name)s, so a literal % must be doubled.
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def create_app() -> Flask:
    database_url = f"sqlite:///{os.environ['APP_DATABASE']}"
    config = alembic_config(database_url)
    applied = alembic_sqlite_lock.upgrade(config)  # safe in every worker at once
    heads = set(ScriptDirectory.from_config(config).get_heads())
    engine = sa.create_engine(database_url)  # per worker: the factory runs after fork
    log.info("Worker %d ready at %s (applied here: %s)", os.getpid(), ", ".join(sorted(heads)),
             ", ".join(applied) or "none")

    app = Flask(__name__)

    @app.get("/health")
    def health() -> tuple[dict[str, Any], int]:
        # ?hold=0.2 keeps this worker busy briefly, so concurrent requests reach others.
        time.sleep(min(float(request.args.get("hold", 0)), 5.0))
        with engine.connect() as connection:
            current = set(MigrationContext.configure(connection).get_current_heads())
        body = {"pid": os.getpid(), "revision": sorted(current), "head": sorted(heads)}
        return body, 200 if current == heads else 503

    return app
