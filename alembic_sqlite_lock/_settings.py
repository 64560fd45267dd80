"""Settings: each described once, resolved in one place, once per run, in one order.

``SETTINGS`` describes every setting (name, type, default, one line of help); the CLI's
flags and help, the ``[alembic_sqlite_lock]`` section ``init`` writes and the checks of
the reference's table are made from it. ``SettingsKeywords`` types the keyword
arguments of ``upgrade()`` and co (a test checks it against ``SETTINGS``).

Keyword arguments (``upgrade(cfg, deadline_s=300)``), then ``-x lock_<name>=<value>`` on
the alembic command line, then the ``[alembic_sqlite_lock]`` section of alembic.ini,
then the defaults. A bad value fails at start, naming the setting and where it came
from. The run resolves them where it starts (``upgrade()``, or ``run_migrations()`` for
a plain ``alembic`` command) and hands the :class:`Settings` down.
"""

from __future__ import annotations

import configparser
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, TypedDict

from alembic.config import Config

from ._errors import ConfigurationError
from ._retry import RetryPolicy

SECTION = "alembic_sqlite_lock"
X_PREFIX = "lock_"
SETTINGS_KEY = "alembic_sqlite_lock.settings"
"""Where ``upgrade()`` leaves the run's resolved :class:`Settings` for env.py, in
``Config.attributes``."""

LOCK_SCOPES = ("session", "transaction")


@dataclass(frozen=True)
class Setting:
    """One setting, described once."""

    name: str
    kind: type
    """int, float (seconds), str or bool: how a text value is read."""
    default: int | float | str | bool | None
    help: str
    """One line, for the CLI's --help and the alembic.ini that ``init`` writes."""
    metavar: str = "VALUE"

    @property
    def ini_default(self) -> str:
        """The default as it is written in alembic.ini ("" for none)."""
        value = self.default
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, float) and value.is_integer():
            return str(int(value))
        return "" if value is None else str(value)

    @property
    def shown_default(self) -> str:
        """The default as the CLI's help and the reference show it."""
        named = re.search(r"\(default: ([^)]*)\)", self.help)
        return named.group(1) if named else self.ini_default or "off"


SETTINGS: tuple[Setting, ...] = (
    Setting("max_attempts", int, 10,
            "attempts to take the lock, each on a new connection", "N"),
    Setting("base_delay_s", float, 0.1,
            "back-off after failed attempt n: base_delay_s * 2**n seconds...", "SECONDS"),
    Setting("jitter_s", float, 0.1,
            "...plus uniform(0, jitter_s), so waiting workers do not retry in lockstep",
            "SECONDS"),
    Setting("busy_timeout_s", float, 30.0,
            "how long one attempt waits inside SQLite's busy handler", "SECONDS"),
    Setting("deadline_s", float, 120.0,
            "overall seconds a worker waits for the lock before LockTimeout", "SECONDS"),
    Setting("lock_key", str, None,
            "PostgreSQL/MySQL: what the lock is keyed on (default: derived)"),
    Setting("lock_scope", str, "session",
            "PostgreSQL: session, or transaction behind PgBouncer transaction pooling"),
    Setting("allow_unknown_revision", bool, False,
            "true: start anyway (a WARNING, nothing migrated) when the database is at a "
            "revision this code does not have"),
    Setting("wait_while_holder_alive", bool, False,
            "true: past deadline_s, keep waiting while the recorded holder is provably "
            "alive on this host"),
    Setting("backup_dir", str, "",
            "empty: no backups. A directory (relative to the database's): before "
            "migrating, the worker holding the lock writes a copy there (VACUUM INTO)"),
    Setting("backup_keep", int, 0,
            "0: keep every backup. N: after each backup, delete this database's oldest "
            "backups in backup_dir so that at most N remain", "N"),
    Setting("revision_cache", str, "",
            "where a worker remembers what the revision files say, checked by hashing "
            "them, so that at its target it imports none (default: __pycache__); off: "
            "never; or a file path, relative to the script folder", "PATH"),
)
"""Every setting, in the order the CLI's help, the generated alembic.ini and the
reference list them. A new setting is a line here, a field of :class:`Settings` (or of
RetryPolicy) and a key of :class:`SettingsKeywords`; tests/test_settings.py checks that
the three agree and that docs/reference.md's table lists it."""

NAMES = tuple(setting.name for setting in SETTINGS)
_BY_NAME = {setting.name: setting for setting in SETTINGS}


class SettingsKeywords(TypedDict, total=False):
    """The settings as keyword arguments of ``upgrade()``, ``downgrade()``, ``stamp()``
    and ``upgrade_async()``, with their Python types (text works too, as in alembic.ini,
    but only these types pass a type checker)."""

    max_attempts: int
    base_delay_s: float
    jitter_s: float
    busy_timeout_s: float
    deadline_s: float
    lock_key: str | int
    lock_scope: str
    allow_unknown_revision: bool
    wait_while_holder_alive: bool
    backup_dir: str
    backup_keep: int
    revision_cache: str


@dataclass(frozen=True)
class Settings:
    """Every setting of a run, resolved (see ``SETTINGS`` for what each means); the
    retry policy's fields are settings too."""

    policy: RetryPolicy = field(default_factory=RetryPolicy)
    lock_key: str | None = None
    lock_scope: str = "session"
    allow_unknown_revision: bool = False
    wait_while_holder_alive: bool = False
    backup_dir: str = ""
    backup_keep: int = 0
    revision_cache: str = ""

    def __post_init__(self) -> None:
        key = self.lock_key
        if key is not None and (not isinstance(key, str) or not key.strip()):
            msg = f"Setting lock_key must be a non-empty text or integer, got {key!r}."
            raise ValueError(msg)
        if self.lock_scope not in LOCK_SCOPES:
            msg = (
                f"Setting lock_scope must be one of {', '.join(LOCK_SCOPES)}, "
                f"got {self.lock_scope!r}."
            )
            raise ValueError(msg)
        keep = self.backup_keep
        if not isinstance(keep, int) or isinstance(keep, bool) or keep < 0:
            msg = (
                "Setting backup_keep must be a whole number >= 0 (0 keeps every backup), "
                f"got {keep!r}."
            )
            raise ValueError(msg)


_POLICY_NAMES = tuple(f.name for f in fields(RetryPolicy))
_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


def run_settings(config: Config) -> Settings:
    """The settings of the run in progress: those ``upgrade()`` (or ``status``)
    resolved and handed down in ``config.attributes``, or, for a plain ``alembic``
    command, resolved now from ``-x``, alembic.ini and the defaults."""
    handed_down = config.attributes.get(SETTINGS_KEY)
    if isinstance(handed_down, Settings):
        return handed_down
    return resolve_settings(config)


def resolve_settings(config: Config, overrides: Mapping[str, Any] | None = None) -> Settings:
    """Build the settings for a run from every source, highest precedence first;
    ``overrides`` are the keyword arguments. Called once per run, where it starts."""
    layers = [
        ("keyword argument", dict(overrides or {}), ""),
        ("-x option", _x_options(config), X_PREFIX),
        (f"[{SECTION}] in {config.config_file_name}", _ini_section(config), ""),
        (f"[tool.{SECTION}] in {_toml_path(config)}", _toml_table(config), ""),
    ]
    chosen: dict[str, Any] = {}
    for source, values, prefix in reversed(layers):
        unknown = sorted(set(values) - set(NAMES))
        if unknown:
            valid = ", ".join(prefix + name for name in NAMES)
            msg = (
                f"Unknown alembic-sqlite-lock setting {', '.join(prefix + u for u in unknown)}"
                f" ({source}). Valid settings: {valid}."
            )
            raise ConfigurationError(msg)
        for name, raw in values.items():
            chosen[name] = convert(name, raw, f"{name} ({source})" if not prefix
                                   else f"{prefix}{name} ({source})")
    policy = {name: chosen.pop(name) for name in _POLICY_NAMES if name in chosen}
    return Settings(RetryPolicy(**policy), **chosen)


def convert(name: str, raw: Any, where: str) -> Any:
    """One setting's value from text (or a Python value), checked; ``where`` names the
    setting and its source in the error, e.g. ``deadline_s (-x option)``."""
    kind = _BY_NAME[name].kind
    try:
        if kind is bool:
            value: Any = _switch(raw)
        elif kind is str:
            # lock_key may be given as an int in Python; it is text everywhere else.
            value = raw.strip() if isinstance(raw, str) else raw
            if isinstance(value, int) and not isinstance(value, bool):
                value = str(value)
            Settings(**{name: value})
        else:
            value = _number(kind, raw)
            if name in _POLICY_NAMES:
                RetryPolicy(**{name: value})
            else:
                Settings(**{name: value})
    except ValueError as exc:
        text = str(exc)
        msg = text.replace(f"Setting {name}", f"Setting {where}") if text.startswith(
            "Setting") else f"Setting {where} {text}"
        raise ConfigurationError(msg) from None
    return value


def _number(kind: type, raw: Any) -> Any:
    if isinstance(raw, str):
        try:
            return int(raw.strip()) if kind is int else float(raw.strip())
        except ValueError:
            want = "a whole number" if kind is int else "a number of seconds"
            raise ValueError(f"must be {want}, got {raw!r}.") from None
    if kind is float and isinstance(raw, int) and not isinstance(raw, bool):
        return float(raw)
    return raw


def _switch(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = raw.strip().lower() if isinstance(raw, str) else None
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise ValueError(f"must be true or false, got {raw!r}.")


def _x_options(config: Config) -> dict[str, str]:
    """Our ``-x lock_*`` arguments; other ``-x`` arguments belong to the user's env.py."""
    raw = getattr(config.cmd_opts, "x", None) or []
    values: dict[str, str] = {}
    for item in raw:
        key, sep, value = item.partition("=")
        if key.startswith(X_PREFIX):
            if not sep:
                msg = f"-x {item} needs a value: -x {key}=<value>."
                raise ConfigurationError(msg)
            name = key[len(X_PREFIX):]
            # Settings named lock_* read naturally as -x lock_key=... as well.
            if name not in _BY_NAME and key in _BY_NAME:
                name = key
            values[name] = value
    return values


def _toml_path(config: Config) -> str | None:
    """The pyproject.toml of an Alembic >= 1.16 configuration, when there is one."""
    path = getattr(config, "toml_file_name", None)
    return os.path.abspath(path) if path and os.path.isfile(path) else None


def _toml_table(config: Config) -> dict[str, Any]:
    """``[tool.alembic_sqlite_lock]`` of pyproject.toml (Alembic's ``pyproject``
    template keeps its settings there, under ``[tool.alembic]``)."""
    path = _toml_path(config)
    if path is None:
        return {}
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # a dependency on those Pythons (pyproject.toml)
        import tomli as tomllib
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except (OSError, tomllib.TOMLDecodeError) as error:
        msg = f"{path} cannot be read for the [tool.{SECTION}] settings: {error}."
        raise ConfigurationError(msg) from error
    table = data.get("tool", {}).get(SECTION, {})
    if not isinstance(table, dict):
        msg = f"[tool.{SECTION}] in {path} must be a table of settings, not {table!r}."
        raise ConfigurationError(msg)
    return table


def _ini_section(config: Config) -> dict[str, str]:
    if config.config_file_name is None or not config.file_config.has_section(SECTION):
        return {}
    # configparser mixes its DEFAULT values (alembic puts ``here`` there) into every
    # section; only the keys written in our section are settings.
    defaults = config.file_config.defaults()
    values = {}
    for key in config.file_config.options(SECTION):
        if key in defaults:
            continue
        try:
            values[key] = config.file_config.get(SECTION, key)
        except configparser.Error as error:
            msg = (
                f"Setting {key} in [{SECTION}] of {config.config_file_name} cannot be read: "
                f"{error}. Settings are plain numbers (a literal % is written %%)."
            )
            raise ConfigurationError(msg) from error
    return values
