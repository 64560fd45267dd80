"""The driver a server database is migrated through, and how an async one is driven.

A URL names its driver (``postgresql+asyncpg://``) or not (``postgresql://``: psycopg 3
when it is installed, as our ``[postgresql]`` extra brings it, else SQLAlchemy's
default; ``mysql://`` and ``mariadb://``: PyMySQL likewise). The lock and the migrations
are synchronous code, so:

* a synchronous driver is used as it is;
* an async driver gives way to a synchronous one of the same database when one is
  installed that reads the same URL: ``psycopg_async`` -> psycopg; ``aiomysql`` and
  ``asyncmy`` -> PyMySQL, else mysqlclient; ``asyncpg`` -> psycopg, else psycopg2, but
  only for a URL without query options (asyncpg's own, ``ssl=`` or
  ``prepared_statement_cache_size=``, mean nothing to libpq);
* otherwise the async driver itself is used, its engine's connections driven the way
  ``AsyncConnection.run_sync()`` drives them: inside a greenlet on an event loop. A run
  runs whole that way (:func:`driven`, around the run); the lock of a
  ``migration_lock()`` block outlives the call that takes it, so its connection lives on
  an event loop of its own thread (:class:`Bridge`).

Which of these a run takes is logged at DEBUG. A driver that is not installed is a
ConfigurationError that names the package bringing it, never an ImportError.
"""

from __future__ import annotations

import contextvars
import importlib.util
import logging
import threading
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.pool import NullPool

from .._errors import ConfigurationError
from .._held import Held
from .._urls import describe_url
from ._base import ServerBackend, migration_engine

if TYPE_CHECKING:  # asyncio is imported when an async driver is driven, not before
    import asyncio

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Driver:
    """A database driver SQLAlchemy 2 users are likely to name in a URL."""

    module: str
    """What it imports."""
    package: str
    """``pip install <package>``."""
    extra: str | None
    """Our extra that installs it (and what it needs), if one does."""
    is_async: bool = False
    sync_twins: tuple[str, ...] = ()
    """Synchronous drivers of the same database that read the same URL, best first."""
    own_query: bool = False
    """Its URL's query options are its own: a twin is used only for a URL without any."""


DRIVERS: dict[str, Driver] = {
    "psycopg": Driver("psycopg", "psycopg[binary]", "postgresql"),
    "psycopg2": Driver("psycopg2", "psycopg2-binary", None),
    "asyncpg": Driver("asyncpg", "asyncpg", "asyncpg", is_async=True,
                      sync_twins=("psycopg", "psycopg2"), own_query=True),
    "psycopg_async": Driver("psycopg", "psycopg[binary]", "postgresql", is_async=True,
                            sync_twins=("psycopg",)),
    "pymysql": Driver("pymysql", "PyMySQL", "mysql"),
    "mysqldb": Driver("MySQLdb", "mysqlclient", None),
    "aiomysql": Driver("aiomysql", "aiomysql", "aiomysql", is_async=True,
                       sync_twins=("pymysql", "mysqldb")),
    "asyncmy": Driver("asyncmy", "asyncmy", None, is_async=True,
                      sync_twins=("pymysql", "mysqldb")),
}
"""By SQLAlchemy's driver name (the part after ``+`` in a URL)."""

DEFAULTS = {"postgresql": "psycopg", "mysql": "pymysql", "mariadb": "pymysql"}
"""The driver a URL without one is migrated through, when it is installed."""


@dataclass(frozen=True)
class Route:
    """How a run connects to the database of a URL."""

    url: URL
    """The URL the engine is made with (its driver possibly replaced)."""
    is_async: bool
    """Through an async driver: its connections work only when driven (:func:`driven`)."""
    how: str
    """Which driver, and why, for the DEBUG line."""


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, a broken __spec__
        return False


def route(raw_url: str | URL) -> Route:
    """The driver a server URL is migrated through; a ConfigurationError when none of
    the ways is installed."""
    parsed = make_url(raw_url)
    backend = parsed.get_backend_name()
    name = parsed.get_driver_name()
    if "+" not in parsed.drivername:
        default = DEFAULTS.get(backend)
        if default is not None and installed(DRIVERS[default].module):
            return Route(parsed.set(drivername=f"{backend}+{default}"), False,
                         f"{default} (no driver named; {default} is installed)")
        # SQLAlchemy's default: a missing one fails when the engine is made (see there).
        return Route(parsed, False, f"{name} (no driver named: SQLAlchemy's default)")
    driver = DRIVERS.get(name)
    if driver is None:  # pg8000, mariadbconnector...: used as SQLAlchemy would
        return Route(parsed, False, name)
    if not driver.is_async:
        if not installed(driver.module):
            raise missing_driver(parsed, name)
        return Route(parsed, False, name)
    for twin in driver.sync_twins:
        if installed(DRIVERS[twin].module) and not (driver.own_query and parsed.query):
            return Route(parsed.set(drivername=f"{backend}+{twin}"), False,
                         f"{twin}, the synchronous driver installed, in place of {name}")
    if installed(driver.module) and installed("greenlet"):
        why = "no synchronous driver of this database is installed"
        if driver.own_query and parsed.query and any(
                installed(DRIVERS[twin].module) for twin in driver.sync_twins):
            why = f"the URL's query options are {name}'s own"
        return Route(parsed, True,
                     f"{name} itself, driven as AsyncConnection.run_sync() drives it ({why})")
    raise missing_driver(parsed, name)


def missing_driver(url: URL, name: str) -> ConfigurationError:
    """The error for a URL whose driver (or what it needs) is not installed."""
    driver = DRIVERS[name]
    shown = describe_url(url)
    if installed(driver.module):  # an async driver without greenlet
        msg = (
            f"The database driver for {shown} ({name}) is async and SQLAlchemy needs "
            "greenlet to use it, which is not installed. Install it with: pip install "
            f"'alembic-sqlite-lock[{driver.extra or 'asyncpg'}]' (or pip install "
            "'sqlalchemy[asyncio]')"
        )
        return ConfigurationError(msg)
    how = f"pip install '{driver.package}'"
    if driver.extra is not None:
        how = f"pip install 'alembic-sqlite-lock[{driver.extra}]' (or {how})"
    if name == "mysqldb":
        how += "; it builds from source against the MySQL/MariaDB client library " \
               "(Debian: apt-get install default-libmysqlclient-dev pkg-config)"
    msg = f"The database driver for {shown} ({name}) is not installed. Install it with: {how}"
    return ConfigurationError(msg)


def server_engine(section: Mapping[str, str], chosen: Route, extra: str,
                  **options: Any) -> Engine:
    """The run's engine for ``chosen`` (see ``_base.migration_engine``); for an async
    driver the synchronous face of its AsyncEngine, to be used inside :func:`driven`."""
    logger.debug("%s is migrated through %s", describe_url(section["sqlalchemy.url"]),
                 chosen.how)
    if not chosen.is_async:
        return migration_engine(section, chosen.url, extra=extra, **options)
    from sqlalchemy.ext.asyncio import async_engine_from_config

    config = dict(section)
    config["sqlalchemy.url"] = chosen.url.render_as_string(hide_password=False)
    return async_engine_from_config(
        config, prefix="sqlalchemy.", poolclass=NullPool, **options
    ).sync_engine


# Driving an async driver's connections ---------------------------------------------------
_DRIVEN: ContextVar[bool] = ContextVar("alembic_sqlite_lock_driven", default=False)
"""This flow of control runs where an async driver's connections work (inside
:func:`driven` or a :class:`Bridge`'s call)."""


def driven(fn: Callable[[], T]) -> T:
    """``fn()`` inside a greenlet on an event loop, where an async driver's connections
    work as synchronous ones (what ``AsyncConnection.run_sync()`` does). On this thread
    when it runs no event loop (the command line, ``upgrade()``, ``upgrade_async()``'s
    worker thread); else on a thread of its own, this call waiting for it as any
    synchronous call would."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from sqlalchemy.util import greenlet_spawn

    def inside() -> T:
        _DRIVEN.set(True)  # in the copy of the context the loop's task runs in
        return fn()

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(greenlet_spawn(inside))
    context = contextvars.copy_context()  # held_here() must see this flow's blocks
    with ThreadPoolExecutor(1, thread_name_prefix="alembic-sqlite-lock") as pool:
        return pool.submit(context.run, asyncio.run, greenlet_spawn(inside)).result()


def drive_run(config: Any, run: Callable[[], None]) -> None:
    """Run ``run`` (a run of ``config``, an Alembic Config) as its database's driver
    needs: inside :func:`driven` when the run will connect through an async driver of
    its own; as it is otherwise (a synchronous driver, SQLite, a handed-in connection,
    which its owner drives, and anything that will fail when the run opens it)."""
    if config.attributes.get("connection") is not None or _DRIVEN.get():
        run()
        return
    url = config.get_section(config.config_ini_section, {}).get("sqlalchemy.url")
    try:
        async_driver = bool(url) and make_url(url).get_backend_name() in DEFAULTS and route(
            url).is_async
    except Exception:  # a bad URL, a missing driver: the run says so when it opens it
        async_driver = False
    if async_driver:
        driven(run)
    else:
        run()


class Bridge:
    """An event loop on a thread of its own, for an async driver's connections that
    outlive a call (a ``migration_lock()`` block's lock session): each :meth:`call` runs
    in a greenlet there, in a copy of the caller's context, and the caller waits."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def call(self, fn: Callable[[], T]) -> T:
        if _DRIVEN.get():  # driven already (a run): the connections work here
            return fn()
        import asyncio

        from sqlalchemy.util import greenlet_spawn

        if self._loop is None:
            self._loop = asyncio.new_event_loop()
            self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                            name="alembic-sqlite-lock-bridge")
            self._thread.start()
        context = contextvars.copy_context()

        def inside() -> T:
            _DRIVEN.set(True)
            return fn()

        def in_context() -> T:
            return context.run(inside)

        future = asyncio.run_coroutine_threadsafe(greenlet_spawn(in_context), self._loop)
        return future.result()

    def stop(self) -> None:
        loop, thread, self._loop, self._thread = self._loop, self._thread, None, None
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()


class DrivenServer(ServerBackend):
    """A server backend whose own engine may have an async driver. A run calls it inside
    :func:`driven`; what a ``migration_lock()`` block calls (its look at the version, its
    lock, the lock's release) goes through a :class:`Bridge` then."""

    _bridge: Bridge | None = None

    def _drive(self, fn: Callable[[], T]) -> T:
        if not getattr(self.engine.dialect, "is_async", False):
            return fn()
        if self._bridge is None:
            self._bridge = Bridge()
        return self._bridge.call(fn)

    def read_versions(self, table: str, schema: str | None) -> tuple[str, ...] | None:
        return self._drive(lambda: ServerBackend.read_versions(self, table, schema))

    def hold(
        self, timeout_s: float, *, still_waiting: Callable[[], None] | None = None
    ) -> Held:
        # still_waiting: the wait is one statement on a server
        held = self._drive(lambda: self._hold(timeout_s))
        release = held.release_lock
        held.release_lock = lambda: self._drive(release)
        return held

    def _hold(self, timeout_s: float) -> Held:
        raise NotImplementedError

    def close(self) -> None:
        try:
            self._drive(self.engine.dispose)
        finally:
            if self._bridge is not None:
                self._bridge.stop()
