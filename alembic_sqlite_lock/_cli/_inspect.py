"""Read-only looks at a database: its current revision(s), never taking a write lock.

The look runs the user's env.py (so a custom version table, a handed-in connection or a
URL set in env.py are honoured) with a command that asks for no migration steps:
``run_migrations()`` then finishes in its unlocked read pass.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from .._backends import database_file, missing_database
from .._commands import ConfigLike, _as_config, _run
from .._settings import Settings
from .._urls import describe_url


@dataclass(frozen=True)
class DatabaseState:
    url: str
    """sqlalchemy.url, password hidden."""
    database_path: str
    """The file as SQLite resolved it; "" for in-memory databases."""
    exists: bool
    """False when the file does not exist yet (it was not created by looking)."""
    current: tuple[str, ...]
    """The revisions in the version table; empty for a new database."""


def read_state(
    config: ConfigLike, settings: Settings | Mapping[str, Any] | None = None
) -> DatabaseState:
    """The current revision(s), read without a write lock and without creating the file.
    ``settings``: resolved already (status), or keyword settings to resolve once."""
    cfg = _as_config(config)
    script = ScriptDirectory.from_config(cfg)
    url = cfg.get_main_option("sqlalchemy.url") or ""
    missing = missing_database(url)
    if missing is not None:
        return DatabaseState(describe_url(url), missing, False, ())
    seen: dict[str, Any] = {}

    def look(heads: tuple[str, ...], context: MigrationContext) -> Iterable[Any]:
        connection = context.connection
        seen["heads"] = tuple(heads)
        if connection is not None:
            seen["url"] = describe_url(connection.engine.url)
            seen["path"] = database_file(connection)  # "": a server database has no file
        return []

    _run(cfg, script, look, settings if settings is not None else {}, dont_mutate=True)
    return DatabaseState(seen.get("url", describe_url(url)), seen.get("path", ""), True,
                         seen.get("heads", ()))


def script_heads(config: Config) -> tuple[str, ...]:
    return tuple(ScriptDirectory.from_config(config).get_heads())
