"""The databases a run can migrate: one backend each, chosen here by the dialect name.

The orchestrator (``_env``) runs the same two passes everywhere: a look at the version
without the lock, then a locked run. What differs per database is how a connection is
made, how the lock is taken and released, and what a failure leaves behind:

* SQLite (``_sqlite/``): SQLite's own write lock, BEGIN IMMEDIATE, plus the files it
  keeps beside the database (the run lock, the holder record, backups).
* PostgreSQL (``_postgresql``): an advisory lock keyed by database, schema and version
  table; the whole run is one transaction.
* MySQL / MariaDB (``_mysql``): ``GET_LOCK`` on a dedicated connection; each revision
  commits on its own because DDL commits implicitly there.

:data:`BACKENDS` is the only place that looks at a URL's dialect. Each backend module
has ``open_backend(section, handed_in, options)``; it is imported only when a run needs
it, so a SQLite run never imports the server code. A new database: a module here with
that function, and a line in :data:`BACKENDS`.

A server URL may name any driver a SQLAlchemy 2 user is likely to have (psycopg,
psycopg2, asyncpg, psycopg's async mode; PyMySQL, mysqlclient, aiomysql, asyncmy): which
one a run goes through, and how an async one is driven, is ``_drivers``';
:func:`drive_run` wraps a run in what its driver needs.

The command line asks a few things of a database that are not a run (does its file
exist, where is it, what lies beside it): :func:`missing_database`,
:func:`database_path`, :func:`database_file` and :func:`files_beside` ask the backend
module, and fall back on ``_base``'s answers for a database without files.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from types import ModuleType
from typing import Any

from sqlalchemy import exc
from sqlalchemy.engine import Connection, make_url

from .._errors import ConfigurationError
from .._urls import describe_url

# SQLite is imported here, up front, and the servers only when a run needs one: an app
# server that preloads the app (gunicorn --preload) then forks workers that find the
# SQLite code loaded already; importing it in each worker after the fork cost them
# about 10 ms each (warm N = 32 went from 0.85x to 1.14x of stock Alembic).
from . import _base, _sqlite  # noqa: F401 (_sqlite: loaded for the forked workers)
from ._base import (
    Backend,
    BackupShown,
    FilesBeside,
    HolderShown,
    RunOptions,
    ServerBackend,
    SideFiles,
)
from ._drivers import drive_run

__all__ = [
    "BACKENDS",
    "SUPPORTED",
    "Backend",
    "BackupShown",
    "FilesBeside",
    "HolderShown",
    "RunOptions",
    "ServerBackend",
    "SideFiles",
    "database_file",
    "database_path",
    "drive_run",
    "files_beside",
    "missing_database",
    "open_backend",
]

BACKENDS: dict[str, str] = {
    "sqlite": "._sqlite",
    "postgresql": "._postgresql",
    "mysql": "._mysql",
    "mariadb": "._mysql",
}
"""Dialect name -> the module (relative to this package) that migrates it."""

SUPPORTED = "sqlite, postgresql, mysql and mariadb"


def open_backend(
    *,
    section: Mapping[str, str] | None,
    handed_in: Connection | None,
    options: RunOptions,
    where: str,
    ini: str | None = None,
) -> Backend:
    """The backend for the run's database.

    ``section`` is the alembic.ini section with ``sqlalchemy.url`` (when no connection
    was handed in); ``where`` names it for the error when the URL is missing, ``ini``
    (the file) for the error when the URL is not valid.
    """
    if handed_in is not None:
        if type(handed_in).__name__ == "AsyncConnection":  # not imported for a sync app
            msg = (
                "config.attributes['connection'] is an AsyncConnection; hand in its "
                "synchronous face instead, as Alembic's async template does: `await "
                "connection.run_sync(do_run_migrations)`, with do_run_migrations(connection) "
                "setting config.attributes['connection'] = connection and running the "
                "command. Or hand in none and let the run connect from sqlalchemy.url."
            )
            raise ConfigurationError(msg)
        if not isinstance(handed_in, Connection):
            msg = (
                "config.attributes['connection'] must be a SQLAlchemy Connection "
                f"(with engine.connect() as connection: ...), not {type(handed_in).__name__}. "
                "Hand in engine.connect()'s connection, or none and let the run open its "
                "own from sqlalchemy.url."
            )
            raise ConfigurationError(msg)
        raw_url: Any = handed_in.engine.url
    else:
        raw_url = (section or {}).get("sqlalchemy.url")
        if not raw_url:
            msg = (
                f"No sqlalchemy.url in {where}. Set it to the database to migrate, for "
                "example sqlalchemy.url = sqlite:///%(here)s/app.db"
            )
            raise ConfigurationError(msg)
    shown = describe_url(raw_url)
    try:
        name = _dialect_name(raw_url)
    except (exc.ArgumentError, ValueError) as error:  # ValueError: a bad port number
        # Not chained: the message says all, and int()'s would quote the "port", a
        # password when "user:password" lost its "@host" (shown by --verbose).
        raise bad_url(shown, error, ini, given=not where.startswith("the [")) from None
    module = _module(name)
    if module is None:
        raise _unsupported(name, shown)
    try:
        backend: Backend = module.open_backend(section, handed_in, options)
    except (exc.ArgumentError, ValueError) as error:  # create_engine's, on the same URL
        raise bad_url(shown, error, ini, given=not where.startswith("the [")) from None
    return backend


def missing_database(url: str) -> str | None:
    """The database file ``url`` names when it does not exist yet (opening it would
    create it), else None."""
    answer: str | None = _ask(url, "missing_database")(url)
    return answer


def database_path(url: str) -> str | None:
    """The database file ``url`` names, whether it exists or not; None: no such file
    (a server, an in-memory database)."""
    answer: str | None = _ask(url, "database_path")(url)
    return answer


def database_file(connection: Connection) -> str:
    """The file the connection's database lives in, as the database resolved it ("":
    none)."""
    module = _module(connection.dialect.name)
    answer: str = getattr(module, "database_file", _base.database_file)(connection)
    return answer


def files_beside(url: str, database_path: str, backup_dir_setting: str) -> FilesBeside:
    """What ``status`` shows about the files beside the database at ``database_path``
    (the run lock, the holder record, the backups in ``backup_dir_setting``)."""
    answer: FilesBeside = _ask(url, "files_beside")(database_path, backup_dir_setting)
    return answer


def _ask(url: str, function: str) -> Any:
    """``function`` of the backend module for ``url``, or ``_base``'s default."""
    try:
        module = _module(_dialect_name(url))
    except (exc.ArgumentError, ValueError):
        module = None
    return getattr(module, function, getattr(_base, function))


def _module(name: str) -> ModuleType | None:
    """The backend module for a dialect name (imported now), None when unsupported."""
    module = BACKENDS.get(name)
    return None if module is None else importlib.import_module(module, __name__)


def _dialect_name(raw_url: Any) -> str:
    parsed = make_url(raw_url)
    if parsed.password is not None and "@" in f"{parsed.host}{parsed.database}":
        # SQLAlchemy ended the password at its first "@" and took the rest for the host
        # (or the database): the connection error would name it, password and all.
        msg = 'the password holds an "@" that is not %-encoded (write it as %40)'
        raise ValueError(msg)
    return parsed.get_backend_name()


def _unsupported(name: str, shown: str) -> ConfigurationError:
    if name == "postgres":  # the spelling Heroku and others hand out
        msg = (
            f"{shown}: SQLAlchemy does not know the postgres:// scheme (it was dropped in "
            "SQLAlchemy 1.4). Write postgresql:// instead in sqlalchemy.url."
        )
        return ConfigurationError(msg)
    msg = (
        f"alembic-sqlite-lock migrates {SUPPORTED} databases, and {shown} is none of "
        "them. Point sqlalchemy.url at a supported database, or use Alembic's stock "
        "env.py for this one."
    )
    return ConfigurationError(msg)


def bad_url(
    shown: str, error: Exception, ini: str | None, *, given: bool = False
) -> ConfigurationError:
    """sqlalchemy.url cannot be parsed, or is not a valid URL of its database.
    ``given``: the URL was given as such (migration_lock(url), exec --url), not read
    from a configuration."""
    reason = str(error).splitlines()[0].rstrip(".")
    if reason.startswith("invalid literal for int()"):
        # Not the literal itself: in "user:password" with the "@host" forgotten,
        # SQLAlchemy takes the password for the port.
        reason = "the port is not a number"
    elif reason.startswith("Could not parse"):
        # "Could not parse SQLAlchemy URL from string '<the URL as written>'" (SQLAlchemy
        # 2.0.0 quotes it whole, password and all): the URL is shown masked already.
        reason = "SQLAlchemy cannot parse it"
    subject = "The database URL given" if given else (
        f"sqlalchemy.url in {ini or 'the Alembic configuration'}")
    if shown.startswith(("postgres", "mysql", "mariadb")):
        msg = (
            f"{subject} is not a valid database URL ({shown}): {reason}. "
            "Use postgresql://user:password@host:5432/dbname or "
            "mysql://user:password@host:3306/dbname (a port is a number; a special "
            "character in the password is %-encoded, and written %% in alembic.ini). "
            "Nothing was run."
        )
        return ConfigurationError(msg)
    msg = (
        f"{subject} is not a valid SQLite URL "
        f"({shown}): {reason}. Use sqlite:///relative/path.db, sqlite:////absolute/path.db, "
        "or sqlite:///%(here)s/app.db for a file beside alembic.ini. Nothing was run."
    )
    return ConfigurationError(msg)

