"""pytest plugin: Alembic's own test suite with every env.py it writes in the one-call form.

Loaded by ``scripts/alembic_suite.py`` into the library run (``-p one_call_plugin``, this
folder on ``PYTHONPATH``), inside an unpacked Alembic sdist. It changes no test of
Alembic's and no assertion: it wraps the helpers of ``alembic/testing/env.py`` that
write an env.py, so that each env.py they write is rewritten by ``one_call_env.py``
right after it is written:

* ``staging_env()``: ``alembic init``'s template env.py (``generic``, ``multidb``), before
  ``sourceless`` variants compile it and delete the source;
* ``env_file_fixture(txt)``: the env.py text literals of Alembic's tests.

Two helpers of Alembic's harness assume the stock env.py's way of calling
``context.configure()``, which the library's ``run_migrations()`` does not share; they
are fixed here, each with its reason (``_capture_engine_context_buffer``,
``_patch_environment``). Their assertions stay as they are.

Each rewrite is logged as one JSON line to the file named by ``ALEMBIC_SUITE_REWRITE_LOG``
(the runner's summary, and its check that the rewrite happened at all). An env.py of a
shape the rewrite does not know raises ``NoOneCallForm`` in the test that wrote it: it
fails in this run only and is listed as a difference, never silently left stock.
"""

from __future__ import annotations

import io
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from one_call_env import NoOneCallForm, to_one_call

LOG_VARIABLE = "ALEMBIC_SUITE_REWRITE_LOG"


def _log(helper: str, outcome: str, notes: list[str]) -> None:
    path = os.environ.get(LOG_VARIABLE)
    if not path:
        return
    record = {
        "test": os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" (", 1)[0],
        "helper": helper,
        "outcome": outcome,
        "notes": notes,
    }
    # One short line per write with O_APPEND: the xdist workers' lines do not mix.
    with open(path, "a", encoding="utf-8") as log:
        log.write(json.dumps(record) + "\n")


def rewrite_env_file(path: Path, helper: str) -> None:
    """Rewrite the env.py at ``path`` in place into the one-call form."""
    from alembic import util

    try:
        text, notes = to_one_call(path.read_text(encoding="utf-8"))
    except NoOneCallForm as error:
        _log(helper, "no one-call form", [str(error)])
        raise
    if text is None:
        _log(helper, "left as written (runs no migrations)", [])
        return
    path.write_text(text, encoding="utf-8")
    # As env_file_fixture() does: a stale .pyc of the stock text must not be loaded.
    pyc = util.pyc_file_from_path(str(path))
    if pyc and Path(pyc) != path:
        os.unlink(pyc)
    _log(helper, "one-call form", notes)


class _CommandWithOneCallInit:
    """``alembic.command`` as ``staging_env()`` sees it: ``init`` rewrites the env.py it
    copied from the template."""

    def __init__(self, command: Any) -> None:
        self._command = command

    def __getattr__(self, name: str) -> Any:
        return getattr(self._command, name)

    def init(self, config: Any, directory: str, *args: Any, **kwargs: Any) -> None:
        self._command.init(config, directory, *args, **kwargs)
        rewrite_env_file(Path(directory, "env.py"), "staging_env")


def _patch_helpers() -> None:
    from alembic.testing import env as testing_env

    written_by_fixture = testing_env.env_file_fixture

    def env_file_fixture(txt: str) -> None:
        written_by_fixture(txt)
        path = Path(testing_env._get_staging_directory(), "scripts", "env.py")
        rewrite_env_file(path, "env_file_fixture")

    testing_env.env_file_fixture = env_file_fixture
    testing_env.command = _CommandWithOneCallInit(testing_env.command)

    from alembic.testing import fixtures

    fixtures.capture_engine_context_buffer = _capture_engine_context_buffer


@contextmanager
def _capture_engine_context_buffer(**kw: Any) -> Iterator[io.StringIO]:
    """``alembic.testing.fixtures.capture_engine_context_buffer``, fixed: it records the SQL
    sent on the connection that env.py configures the context with.

    Alembic's helper opens a connection of its own to the test's SQLite file and swaps it
    in for the env.py's in every ``configure()``. Under the library the migration then
    writes through that second connection while the run's own connection holds SQLite's
    write lock (BEGIN IMMEDIATE): "database is locked", a deadlock of the helper's making.
    Listening on the connection the env.py passes records the same statements (plus the
    library's look at the version table, a SELECT, which the tests' checks skip), and the
    tests check them as they are.
    """
    from alembic.runtime.environment import EnvironmentContext
    from sqlalchemy import event

    buf = io.StringIO()
    listened: list[Any] = []

    def before_cursor_execute(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        buf.write(statement + "\n")

    unpatched = EnvironmentContext.configure

    def configure(*arg: Any, **opt: Any) -> Any:
        opt.update(**kw)
        connection = opt.get("connection")
        if connection is not None and not any(connection is seen for seen in listened):
            event.listen(connection, "before_cursor_execute", before_cursor_execute)
            listened.append(connection)
        return unpatched(*arg, **opt)

    with mock.patch.object(EnvironmentContext, "configure", configure):
        yield buf


def _patch_environment(original: Callable[..., Any]) -> Callable[..., Any]:
    """``PatchEnvironment._patch_environment`` of ``tests/test_script_consumption.py``,
    fixed: a ``configure()`` without ``connection`` goes past its patch.

    The helper's ``configure()`` reads ``opt["connection"]`` (KeyError without one) to
    check after the test that the connection's transaction ended. The library's
    ``run_migrations()`` configures the context once with only the URL before it creates
    a database file that does not exist yet (to resolve the command's target first, so
    that a mistyped revision leaves no file behind); every run on the database itself
    gets a connection. Here such a call gets the helper's transaction options and skips
    its connection bookkeeping; the helper's own check runs as it is.
    """
    from alembic.runtime.environment import EnvironmentContext

    @contextmanager
    def patch_environment(
        self: Any, transactional_ddl: bool, transaction_per_migration: bool
    ) -> Iterator[None]:
        unpatched = EnvironmentContext.configure
        with original(self, transactional_ddl, transaction_per_migration):
            theirs = EnvironmentContext.configure

            def configure(*arg: Any, **opt: Any) -> Any:
                if "connection" in opt:
                    return theirs(*arg, **opt)
                opt.update(
                    transactional_ddl=transactional_ddl,
                    transaction_per_migration=transaction_per_migration,
                )
                return unpatched(*arg, **opt)

            with mock.patch.object(EnvironmentContext, "configure", configure):
                yield

    return patch_environment


@pytest.hookimpl(tryfirst=True)
def pytest_collection(session: pytest.Session) -> None:
    """Before collection imports the test modules (they import the helpers by name), and
    after SQLAlchemy's testing plugin has set itself up (at session start): importing
    ``alembic.testing`` earlier breaks its fixtures and setUp calls."""
    import alembic

    config = session.config
    # tests/conftest.py (an initial conftest, loaded before this hook) put the sdist's
    # root first on sys.path: the helpers patched must be the copy's, which the tests use.
    here = Path(alembic.__file__).resolve()
    if not here.is_relative_to(config.rootpath.resolve()):
        msg = f"alembic is imported from {here}, not from the sdist at {config.rootpath}"
        raise pytest.UsageError(msg)
    _patch_helpers()


def pytest_collection_finish(session: pytest.Session) -> None:
    """After collection imported the test modules: the helpers that live in them."""
    module = sys.modules.get("tests.test_script_consumption")
    helper = getattr(module, "PatchEnvironment", None)
    if helper is not None:
        helper._patch_environment = _patch_environment(helper._patch_environment)
