"""One small interface per database, chosen by the URL's dialect name.

The orchestrator (``_env``) runs the same two passes everywhere: a look at the version
without the lock, then a locked run. What differs per database is how a connection is
made, how the lock is taken and released, and what a failure leaves behind:

* SQLite (``_sqlite``): SQLite's own write lock, BEGIN IMMEDIATE, plus a run lock file.
* PostgreSQL (``_postgresql``): an advisory lock keyed by database, schema and version
  table; the whole run is one transaction.
* MySQL / MariaDB (``_mysql``): ``GET_LOCK`` on a dedicated connection; each revision
  commits on its own because DDL commits implicitly there.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import unquote_plus

from sqlalchemy.engine import URL, Connection, Engine, make_url

from ._errors import ConfigurationError
from ._retry import RetryPolicy


class Backend(Protocol):
    """What the orchestrator needs from a database."""

    url: str
    """The URL with its password hidden: the only form logs and errors may show."""
    transactional: bool
    """True when the locked run is one transaction: a failure leaves the previous revision."""
    unreadable_hint: str
    """Appended to the error when the version cannot be read at all."""
    timeout_causes: str | None
    """What a LockTimeout on this database most likely means (None: the SQLite text)."""
    still_waiting: Callable[[], None] | None
    """Called now and then while a wait for the lock lasts (SQLite's run lock), so that
    a long wait shows in the log; set by the orchestrator."""

    @property
    def database_file(self) -> str | None:
        """The database's file, for the holder record and backups (None: a server)."""
        ...

    @property
    def run_long_lock(self) -> bool:
        """The lock outlives a transaction: a run may commit midway (autocommit blocks,
        transaction_per_migration) and still keep every other worker out."""
        ...

    def reading(self) -> AbstractContextManager[Connection]:
        """A connection for the unlocked look at the version."""
        ...

    def is_busy(self, error: BaseException) -> bool:
        """The unlocked look hit a lock: the locked pass will wait its turn instead."""
        ...

    def wait_for_running(
        self, timeout_s: float, while_waiting: Callable[[], None] | None = None
    ) -> bool:
        """If another worker is migrating now, wait (at most ``timeout_s``) until it has
        finished, without queueing for the lock; True when a run was waited for.
        ``while_waiting`` is called once a run is known to be going on, before blocking."""
        ...

    def read_versions(self, table: str, schema: str | None) -> tuple[str, ...] | None:
        """The version table's rows by one plain SELECT, never waiting on a lock: the
        cheap look of a worker that waited for a run. None when it cannot tell (busy,
        unreadable); the locked run then decides, as it always does."""
        ...

    def look_versions(
        self, connection: Connection, table: str, schema: str | None
    ) -> tuple[str, ...] | None:
        """The version table's rows for the look before the lock, on its reading
        connection, where the backend has a cheaper way than Alembic's read; None: let
        Alembic read them. A busy database raises a DBAPIError, as Alembic's read would."""
        ...

    def try_lock(self, timeout_s: float, *, begin: bool = True) -> Connection:
        """One attempt: return the migration connection with the lock held, waiting at
        most ``timeout_s``; raise ``LockBusy`` when another worker kept the lock.
        ``begin=False`` (transaction_per_migration) asks for no transaction around the
        run where the backend would otherwise begin one.

        A connection returned inside a transaction runs the whole run in it (Alembic
        sees an external transaction); one returned outside a transaction gets
        Alembic's own transaction handling for the dialect.
        """
        ...

    def before_commit(self, connection: Connection) -> None:
        """Checks that must pass before the run commits (raise to roll back)."""
        ...

    def check_midway(self) -> None:
        """Around a commit in the middle of a run (an autocommit block, between the
        revisions of transaction_per_migration): raise if the lock that outlives the
        transaction is no longer this run's, so that the run stops there."""
        ...

    def release(self, connection: Connection) -> None:
        """Release the lock and the connection; called after COMMIT or ROLLBACK."""
        ...

    def close(self) -> None:
        """End of the run: dispose of engines, restore a handed-in connection."""
        ...


class ServerBackend:
    """What the server databases share: a pooled look at the version, no file beside."""

    engine: Engine

    database_file = None
    """No file beside the database for a holder record or a backup."""
    still_waiting: Callable[[], None] | None = None
    """Unused: the server's lock wait is one statement with its own timeout."""

    @contextmanager
    def reading(self) -> Iterator[Connection]:
        with self.engine.connect() as connection:
            yield connection

    def is_busy(self, error: BaseException) -> bool:
        return False  # reading the version table never waits on a migration there

    def check_midway(self) -> None:
        pass  # the server's session lock cannot be taken away by a file operation

    def wait_for_running(
        self, timeout_s: float, while_waiting: Callable[[], None] | None = None
    ) -> bool:
        return False  # waiters queue for the server's lock and re-check one at a time

    def read_versions(self, table: str, schema: str | None) -> tuple[str, ...] | None:
        return None  # never asked: wait_for_running() never waits here

    def look_versions(
        self, connection: Connection, table: str, schema: str | None
    ) -> tuple[str, ...] | None:
        return None  # Alembic's read is one query there


@dataclass(frozen=True)
class RunOptions:
    """Everything a backend is built from."""

    policy: RetryPolicy
    lock_key: str | None
    lock_scope: str
    version_table: str
    version_table_schema: str | None


MASK = "***"
"""What a password or a secret query value is shown as."""

_SECRET_NAME = re.compile(
    r"pass(?:word|wd|phrase)|^pass$|pwd|secret|token|credential", re.IGNORECASE
)
"""Query parameter names whose values are secrets: libpq's password and sslpassword,
asyncpg's password, PyMySQL's and mysqlclient's passwd and password, and any name that
says secret, token or credential. A path to a secret (passfile, sslkey) is not one."""

# name=value in a URL's query. A value runs to the next "&name=": a password holding
# a bare "&" (which SQLAlchemy would split) is masked whole rather than half shown.
_QUERY_PARAM = re.compile(r"(?P<lead>[?&])(?P<name>[^=&?]+)=(?P<value>.*?)(?=&[^&=]*=|$)", re.S)
# name=value in a libpq keyword/value string ("host=db password='a b'"), pasted as a URL.
_KEYWORD_PARAM = re.compile(
    r"(?P<lead>^|\s)(?P<name>[\w.-]+)(?P<eq>\s*=\s*)(?P<value>'(?:[^'\\]|\\.)*'?|\S*)"
)


def describe_url(url: Any) -> str:
    """A URL fit for logs and errors: no password, no secret query value is shown.

    Masked on the text as written, parsed or not: SQLAlchemy's own parse ends the
    password at its first "@", and then shows the rest of a password holding a bare
    "@" as the host. Here the userinfo ends at the last "@" (a password may hold "@",
    "/", ":", "?" and "#"), so a URL with an "@" further on is masked too widely, never
    too narrowly. A URL object is rendered by SQLAlchemy first, which %-encodes them.
    """
    if isinstance(url, URL):
        text = url.render_as_string(hide_password=True)
    else:
        text = "" if url is None else str(url)
    return _mask_secret_params(_mask_userinfo(text)) or "<empty URL>"


def _mask_userinfo(text: str) -> str:
    scheme, sep, rest = text.partition("://")
    if not sep:  # no scheme: "user:password@host/db" is still a password
        scheme, rest = "", text
    at = rest.rfind("@")
    if at < 0:
        # No "@": "user:password" with "@host" forgotten reads as host:port. A port is a
        # number; anything else after the colon may be a password.
        forgot = sep and re.match(r"([^/?:\[\]]*):([^/?]+)", rest)
        if not forgot or forgot[2].isdigit():
            return text
        return f"{scheme}{sep}{forgot[1]}:{MASK}{rest[forgot.end():]}"
    user, colon, _password = rest[:at].partition(":")
    if not colon:
        return text
    return f"{scheme}{sep}{user}:{MASK}{rest[at:]}"


def _mask_secret_params(text: str) -> str:
    def masked(match: re.Match[str]) -> str:
        if not _SECRET_NAME.search(unquote_plus(match["name"])):
            return match[0]
        return match[0][: match.start("value") - match.start()] + MASK

    return _KEYWORD_PARAM.sub(masked, _QUERY_PARAM.sub(masked, text))


SUPPORTED = "sqlite, postgresql, mysql and mariadb"


def missing_driver(url: str, error: ImportError, extra: str) -> ConfigurationError:
    """The error for a server URL whose driver is not installed."""
    msg = (
        f"The database driver for {describe_url(url)} is not installed ({error}). "
        f"Install it with: pip install 'alembic-sqlite-lock[{extra}]'"
    )
    return ConfigurationError(msg)


def open_backend(
    *,
    section: Mapping[str, str] | None,
    handed_in: Connection | None,
    options: RunOptions,
    where: str,
) -> Backend:
    """The backend for the run's database.

    ``section`` is the alembic.ini section with ``sqlalchemy.url`` (when no connection
    was handed in); ``where`` names it for the error when the URL is missing.
    """
    if handed_in is not None:
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
    parsed = make_url(raw_url)  # ArgumentError, ValueError: the caller explains them
    if parsed.password is not None and "@" in f"{parsed.host}{parsed.database}":
        # SQLAlchemy ended the password at its first "@" and took the rest for the host
        # (or the database): the connection error would name it, password and all.
        msg = 'the password holds an "@" that is not %-encoded (write it as %40)'
        raise ValueError(msg)
    name = parsed.get_backend_name()
    if name == "sqlite":
        from . import _sqlite

        if handed_in is not None:
            return _sqlite.HandedIn(handed_in, options.policy)
        assert section is not None
        return _sqlite.OwnEngine(section, options.policy)
    if name in ("postgresql", "mysql", "mariadb"):
        if handed_in is not None:
            msg = (
                f"A connection handed to env.py in config.attributes['connection'] "
                f"({shown}) is supported on SQLite only for now. Let the run make its own "
                "connections from sqlalchemy.url in alembic.ini."
            )
            raise ConfigurationError(msg)
        assert section is not None
        if name == "postgresql":
            from . import _postgresql

            return _postgresql.PostgresBackend(section, options)
        from . import _mysql

        return _mysql.MySQLBackend(section, options)
    if name == "postgres":  # the spelling Heroku and others hand out
        msg = (
            f"{shown}: SQLAlchemy does not know the postgres:// scheme (it was dropped in "
            "SQLAlchemy 1.4). Write postgresql:// instead in sqlalchemy.url."
        )
        raise ConfigurationError(msg)
    msg = (
        f"alembic-sqlite-lock migrates {SUPPORTED} databases, and {shown} is none of "
        "them. Point sqlalchemy.url at a supported database, or use Alembic's stock "
        "env.py for this one."
    )
    raise ConfigurationError(msg)
