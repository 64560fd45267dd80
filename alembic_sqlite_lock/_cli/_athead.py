"""``alembic-sqlite-lock upgrade`` at head, answered without importing Alembic.

A new process that runs ``alembic upgrade head`` spends most of its time importing
Alembic and SQLAlchemy, only to read one row and learn there is nothing to do. Here the
command line first tries to answer with the standard library alone: alembic.ini read as
Alembic reads it, the version row read with ``sqlite3`` (read-only), the code's heads
from the revision cache (``_revcache``, keyed by a hash of the revision files). When the
database is at the target, it logs the usual "already at" line and exits 0.

It answers only when nothing else could change the answer, and otherwise returns None
and the full command runs (which decides everything again, under its own rules):

* the command line is ``[-c INI] [-n NAME] upgrade [head|heads|<revision id>] [-v]``
  (no ``-x``, no setting flags, no ``--sql``);
* alembic.ini's section sets nothing that moves the revision files or the version
  table (``version_locations``, ``recursive_version_locations``, ``sourceless``, a
  package ``script_location``), its ``[alembic_sqlite_lock]`` section sets no setting
  but ``revision_cache`` (the others are checked by the full command), and no
  pyproject.toml in the working directory has ``[tool.alembic...]`` tables;
* ``sqlalchemy.url`` is a plain SQLite file URL and the file exists;
* env.py is the one-call form and does nothing else: imports, ``config =
  context.config``, the ``fileConfig`` block, ``target_metadata = <names>`` and
  ``run_migrations(context, target_metadata)`` with no argument that could move the
  version table or the database (checked on its syntax tree, never run). Its
  ``fileConfig`` block is the one thing done, so the log line looks the same;
* the revision cache is there, trusted, and for the revision files as they are now.

The look takes no lock, like the full command's own look before the lock.
"""

from __future__ import annotations

import ast
import configparser
import logging
import os
import re
import sqlite3
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from urllib.parse import quote

from .. import _revcache, _sidefile

logger = logging.getLogger("alembic_sqlite_lock._env")
"""The logger of the full command's "already at" line, so that alembic.ini's logging
configuration shows it the same way."""

_MOVING_OPTIONS = ("version_locations", "recursive_version_locations", "sourceless")
"""[alembic] options that change where revision files come from: the full command."""

_HARMLESS_KWARGS = frozenset({
    "target_metadata", "render_as_batch", "compare_type", "compare_server_default",
    "include_schemas", "include_object", "include_name", "process_revision_directives",
    "user_module_prefix", "render_item", "transaction_per_migration", "sqlalchemy_module_prefix",
})
"""run_migrations() keyword arguments that change nothing about a database at head."""

_SQLITE_URL = re.compile(r"sqlite(?:\+(?:pysqlite|aiosqlite))?:///(?P<path>[^?#]+)")


def answer(argv: Sequence[str]) -> int | None:
    """0 when the database is at the command's target (the line is logged); None when
    this cannot tell: the full command runs."""
    try:
        return _answer(list(argv))
    except Exception:  # anything unexpected: the full command decides, and reports
        return None


@dataclass(frozen=True)
class _Project:
    """What the answer needs, read from alembic.ini and env.py."""

    ini: str
    script_location: str
    database: str
    cache_setting: str
    configures_logging: bool


def _answer(argv: list[str]) -> int | None:
    parsed = _parse(argv)
    project = None if parsed is None else _project(parsed[0], parsed[1])
    if parsed is None or project is None:
        return None
    heads = _versions(project.database)
    known = _known(project.script_location, project.cache_setting)
    if heads is None or known is None:
        return None
    if _revcache.answer(known, parsed[2], heads, upgrade=True) is not True:
        return None
    if project.configures_logging:  # env.py's fileConfig block, as a command line runs it
        import logging.config

        logging.config.fileConfig(project.ini, disable_existing_loggers=False)
    logger.info("Database already at %s, nothing to do", ", ".join(heads))
    return 0


def _project(ini: str, section: str) -> _Project | None:
    """The project as the full command would see it, when nothing in alembic.ini,
    pyproject.toml or env.py could change what it reads (see the module docstring)."""
    if not os.path.isfile(ini) or _pyproject_configures_alembic():
        return None
    config = configparser.ConfigParser({"here": Path(ini).absolute().parent.as_posix()})
    config.read([ini])
    if not config.has_section(section):
        return None
    options = dict(config.items(section))
    script_location = options.get("script_location", "")
    url = _SQLITE_URL.fullmatch(options.get("sqlalchemy.url", "").strip())
    if (not script_location or any(options.get(name) for name in _MOVING_OPTIONS)
            or (":" in script_location and not os.path.isabs(script_location))
            or url is None or "%" in url["path"] or url["path"] == ":memory:"):
        return None
    cache_setting = _cache_setting(config)
    logs = _one_call_env(os.path.join(script_location, "env.py"))
    if cache_setting is None or logs is None:
        return None
    return _Project(ini, script_location, url["path"], cache_setting, logs)


def _parse(argv: list[str]) -> tuple[str, str, str] | None:
    """(alembic.ini, its section, the target) of ``[-c INI] [-n NAME] upgrade [REV]``."""
    ini = os.environ.get("ALEMBIC_CONFIG", "alembic.ini")
    section = "alembic"
    command: list[str] = []
    items = iter(argv)
    for item in items:
        if item in ("-c", "--config"):
            ini = next(items)
        elif item.startswith("--config="):
            ini = item.partition("=")[2]
        elif item in ("-n", "--name"):
            section = next(items)
        elif item in ("-v", "--verbose"):
            continue
        elif item.startswith("-"):
            return None  # -x, a setting, --sql, --help...: the full command
        else:
            command.append(item)
    if not command or command[0] != "upgrade" or len(command) > 2:
        return None
    return ini, section, command[1] if len(command) == 2 else "head"


def _pyproject_configures_alembic() -> bool:
    """Alembic (1.16+) and our settings may live in ./pyproject.toml: not read here."""
    try:
        with open("pyproject.toml", "rb") as file:
            return b"tool.alembic" in file.read()
    except FileNotFoundError:
        return False


def _cache_setting(config: configparser.ConfigParser) -> str | None:
    """``revision_cache`` of the [alembic_sqlite_lock] section; None when the section
    sets anything else (the full command checks settings)."""
    if not config.has_section("alembic_sqlite_lock"):
        return ""
    defaults = config.defaults()
    keys = [key for key in config.options("alembic_sqlite_lock") if key not in defaults]
    if any(key != "revision_cache" for key in keys):
        return None
    return config.get("alembic_sqlite_lock", "revision_cache", fallback="")


def _one_call_env(env_py: str) -> bool | None:
    """env.py is the one-call form and does nothing else (see the module docstring):
    whether it configures logging from alembic.ini; None when it is not that form."""
    try:
        with open(env_py, "rb") as file:
            tree = ast.parse(file.read(), env_py)
    except (OSError, SyntaxError, ValueError):
        return None
    calls, logs = 0, False
    for index, node in enumerate(tree.body):
        if (index == 0 and _is_docstring(node)) or isinstance(node, (ast.Import,
                                                                     ast.ImportFrom)):
            continue
        if isinstance(node, ast.Assign) and _plain_assignment(node):
            continue
        if isinstance(node, ast.If) and _logging_block(node):
            logs = True
        elif isinstance(node, ast.Expr) and _run_migrations_call(node.value):
            calls += 1
        else:
            return None
    return logs if calls == 1 else None


def _is_docstring(node: ast.stmt) -> bool:
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)


def _plain_assignment(node: ast.Assign) -> bool:
    """``config = context.config``, ``target_metadata = Base.metadata`` or a list of
    such: names, attributes and constants, no call."""
    if not all(isinstance(target, ast.Name) for target in node.targets):
        return False
    return all(isinstance(part, (ast.Name, ast.Attribute, ast.Constant, ast.List, ast.Tuple,
                                 ast.Load, ast.expr_context))
               for part in ast.walk(node.value))


def _logging_block(node: ast.If) -> bool:
    """``if config.config_file_name is not None ...: fileConfig(...)``."""
    return bool(node.body) and not node.orelse and all(
        isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Call)
        and _name(statement.value.func) == "fileConfig" for statement in node.body)


def _run_migrations_call(node: ast.expr) -> bool:
    if not isinstance(node, ast.Call) or _name(node.func) != "run_migrations":
        return False
    return len(node.args) <= 2 and all(
        keyword.arg in _HARMLESS_KWARGS for keyword in node.keywords)


def _name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def _versions(database: str) -> tuple[str, ...] | None:
    """The version rows, read-only and without waiting; None when they cannot be read
    (no table yet, a write in its commit, not a regular file...)."""
    try:
        if not stat.S_ISREG(os.stat(database).st_mode):
            return None  # a FIFO or a device: never opened here
    except OSError:
        return None
    uri = f"file:{quote(os.path.abspath(database))}?mode=ro"
    try:
        connection = sqlite3.connect(uri, uri=True, timeout=0, isolation_level=None)
    except sqlite3.Error:
        return None
    try:
        rows = connection.execute("SELECT version_num FROM alembic_version").fetchall()
    except sqlite3.Error:
        return None
    finally:
        connection.close()
    return tuple(str(row[0]) for row in rows)


def _known(script_location: str, setting: str) -> _revcache.Known | None:
    path = _revcache.cache_path(script_location, setting)
    version = _alembic_version()
    if path is None or version is None:
        return None
    # Where Alembic looks without version_locations: <script_location>/versions.
    key = _revcache.fingerprint([str(Path(script_location, "versions").absolute())],
                                recursive=False, alembic_version=version)
    if key is None:
        return None
    return _revcache.read(path, key, _sidefile.Owner.of(script_location))


def _alembic_version() -> str | None:
    """The installed Alembic's ``__version__``, read from its source, not imported."""
    spec = find_spec("alembic")
    if spec is None or spec.origin is None:
        return None
    with open(spec.origin, encoding="utf-8") as file:
        found = re.search(r'^__version__\s*=\s*["\']([^"\']+)["\']', file.read(), re.M)
    return found.group(1) if found else None


