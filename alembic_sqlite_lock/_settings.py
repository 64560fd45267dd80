"""Settings, resolved in one place and in one order.

Keyword arguments (``upgrade(cfg, deadline_s=300)``), then ``-x lock_<name>=<value>`` on
the alembic command line, then the ``[alembic_sqlite_lock]`` section of alembic.ini,
then the defaults of :class:`RetryPolicy`. A bad value fails at start, naming the setting
and where it came from.
"""

from __future__ import annotations

import configparser
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from alembic.config import Config

from ._errors import ConfigurationError
from ._retry import RetryPolicy

SECTION = "alembic_sqlite_lock"
X_PREFIX = "lock_"
SETTINGS_KEY = "alembic_sqlite_lock.settings"
"""Where ``upgrade()`` leaves its keyword settings for env.py, in ``Config.attributes``."""

LOCK_SCOPES = ("session", "transaction")


@dataclass(frozen=True)
class LockSettings:
    """The settings of the server databases' locks (ignored on SQLite)."""

    lock_key: str | None = None
    """What the lock is keyed on, instead of database, schema and version table.
    PostgreSQL: a 64-bit integer, or any text (hashed to one). MySQL: the GET_LOCK name."""
    lock_scope: str = "session"
    """PostgreSQL: ``session`` (pg_advisory_lock) or ``transaction``
    (pg_advisory_xact_lock, for PgBouncer in transaction-pooling mode)."""

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


@dataclass(frozen=True)
class Settings:
    policy: RetryPolicy
    lock_key: str | None
    lock_scope: str
    allow_unknown_revision: bool = False
    """Start anyway, with a WARNING and migrating nothing, when the database is at a
    revision this code does not have (an older release booting after a newer one)."""


RUN_SETTINGS: dict[str, bool] = {"allow_unknown_revision": False}
"""Settings that are not about waiting for the lock: on/off switches and their defaults."""
_TYPES: dict[str, type] = {f.name: (int if f.name == "max_attempts" else float)
                           for f in fields(RetryPolicy)}
_TYPES.update({f.name: str for f in fields(LockSettings)})
_TYPES.update({name: bool for name in RUN_SETTINGS})
NAMES = tuple(_TYPES)
_LOCK_NAMES = frozenset(f.name for f in fields(LockSettings))
_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


def resolve_policy(config: Config, overrides: Mapping[str, Any] | None = None) -> RetryPolicy:
    """The RetryPolicy for a run (see :func:`resolve_settings`)."""
    return resolve_settings(config, overrides).policy


def resolve_settings(config: Config, overrides: Mapping[str, Any] | None = None) -> Settings:
    """Build the settings for a run from every source, highest precedence first."""
    if overrides is None:
        overrides = config.attributes.get(SETTINGS_KEY, {})
    layers = [
        ("keyword argument", dict(overrides), ""),
        ("-x option", _x_options(config), X_PREFIX),
        (f"[{SECTION}] in {config.config_file_name}", _ini_section(config), ""),
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
            chosen[name] = _convert(name, raw, f"{prefix}{name} ({source})")
    lock: dict[str, Any] = {name: chosen.pop(name) for name in _LOCK_NAMES if name in chosen}
    switches = {name: chosen.pop(name, default) for name, default in RUN_SETTINGS.items()}
    try:
        lock_settings = LockSettings(**lock)
        return Settings(
            RetryPolicy(**chosen), lock_settings.lock_key, lock_settings.lock_scope, **switches
        )
    except ValueError as exc:
        raise ConfigurationError(f"{exc} Check where it is set: keyword arguments, "
                                 f"-x {X_PREFIX}<name>, or [{SECTION}] in alembic.ini.") from exc


def resolve_switch(config: Config, name: str, overrides: Mapping[str, Any] | None = None) -> bool:
    """One of the RUN_SETTINGS, resolved in the same order as every other setting."""
    return bool(getattr(resolve_settings(config, overrides), name))


def _convert(name: str, raw: Any, where: str) -> Any:
    kind = _TYPES[name]
    if kind is str:
        return _convert_text(name, raw, where)
    if kind is bool:
        return _convert_switch(raw, where)
    if isinstance(raw, str):
        text = raw.strip()
        try:
            value: Any = int(text) if kind is int else float(text)
        except ValueError:
            want = "a whole number" if kind is int else "a number of seconds"
            msg = f"Setting {where} must be {want}, got {raw!r}."
            raise ConfigurationError(msg) from None
    else:
        value = raw
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
    try:
        RetryPolicy(**{name: value})
    except ValueError as exc:
        raise ConfigurationError(str(exc).replace(f"Setting {name}", f"Setting {where}")) from exc
    return value


def _convert_switch(raw: Any, where: str) -> bool:
    if isinstance(raw, bool):
        return raw
    text = raw.strip().lower() if isinstance(raw, str) else None
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    msg = f"Setting {where} must be true or false, got {raw!r}."
    raise ConfigurationError(msg)


def _convert_text(name: str, raw: Any, where: str) -> Any:
    # lock_key may be given as an int in Python; it is text everywhere else.
    value: Any = raw.strip() if isinstance(raw, str) else raw
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    try:
        LockSettings(**{name: value})
    except ValueError as exc:
        raise ConfigurationError(str(exc).replace(f"Setting {name}", f"Setting {where}")) from exc
    return value


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
            if name not in _TYPES and key in _TYPES:
                name = key
            values[name] = value
    return values


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
