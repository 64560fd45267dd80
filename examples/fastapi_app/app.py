"""A FastAPI app that migrates its SQLite database at start-up, in every uvicorn worker.

    APP_DATABASE=/tmp/app.db uvicorn app:app --workers 4 --log-config logging.json

The lifespan handler awaits ``alembic_sqlite_lock.upgrade_async()``: the migration (or
the wait for another worker's lock) runs in a thread, so the event loop is never
blocked. The app itself talks to the database through aiosqlite; the library migrates
the same file through pysqlite, under the same SQLite lock. ``/health`` answers 200
only when the database is at the script head.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import create_async_engine

import alembic_sqlite_lock

# Created at import, before the upgrade runs env.py: an env.py whose fileConfig()
# disabled existing loggers would silence it (this repository's env.py does not).
log = logging.getLogger("fastapi_app")

# The demo chain of this repository; point APP_ALEMBIC_INI at your own alembic.ini.
DEFAULT_INI = Path(__file__).resolve().parents[2] / "alembic.ini"


def alembic_config(database_url: str) -> Config:
    config = Config(os.environ.get("APP_ALEMBIC_INI", str(DEFAULT_INI)))
    # set_main_option interpolates %(name)s, so a literal % must be doubled.
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    database_url = f"sqlite+aiosqlite:///{os.environ['APP_DATABASE']}"
    config = alembic_config(database_url)
    applied = await alembic_sqlite_lock.upgrade_async(config)  # safe in every worker
    app.state.heads = set(ScriptDirectory.from_config(config).get_heads())
    app.state.engine = create_async_engine(database_url)
    log.info("Worker %d ready at %s (applied here: %s)", os.getpid(),
             ", ".join(sorted(app.state.heads)), ", ".join(applied) or "none")
    yield
    await app.state.engine.dispose()


app = FastAPI(lifespan=lifespan)


def _current_heads(connection: Connection) -> set[str]:
    return set(MigrationContext.configure(connection).get_current_heads())


@app.get("/health")
async def health(hold: float = 0.0) -> JSONResponse:
    # ?hold=0.2 keeps the request open briefly, so concurrent requests reach other workers.
    await asyncio.sleep(min(hold, 5.0))
    async with app.state.engine.connect() as connection:
        current = await connection.run_sync(_current_heads)
    heads = app.state.heads
    body = {"pid": os.getpid(), "revision": sorted(current), "head": sorted(heads)}
    return JSONResponse(body, status_code=200 if current == heads else 503)
