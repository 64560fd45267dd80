"""Settings, resolved in one place and in one order.

Keyword arguments (``upgrade(cfg, deadline_s=300)``), then ``-x lock_<name>=<value>`` on
the alembic command line, then the ``[alembic_sqlite_lock]`` section of alembic.ini,
then the defaults of :class:`RetryPolicy`. A bad value fails at start, naming the setting
and where it came from.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from alembic.config import Config

from ._errors import ConfigurationError
from ._retry import RetryPolicy

SECTION = "alembic_sqlite_lock"
X_PREFIX = "lock_"
SETTINGS_KEY = "alembic_sqlite_lock.settings"
"""Where ``upgrade()`` leaves its keyword settings for env.py, in ``Config.attributes``."""

_TYPES: dict[str, type] = {f.name: (int if f.name == "max_attempts" else float)
                           for f in fields(RetryPolicy)}
NAMES = tuple(_TYPES)

EXTRA_SETTINGS: dict[str, str] = {"backup_dir": ""}
"""Settings that are not RetryPolicy fields, with their defaults; see resolve_setting()."""


def resolve_policy(config: Config, overrides: Mapping[str, Any] | None = None) -> RetryPolicy:
    """Build the RetryPolicy for a run from every source, highest precedence first."""
    if overrides is None:
        overrides = config.attributes.get(SETTINGS_KEY, {})
    layers = [
        ("keyword argument", dict(overrides), ""),
        ("-x option", _x_options(config), X_PREFIX),
        (f"[{SECTION}] in {config.config_file_name}", _ini_section(config), ""),
    ]
    chosen: dict[str, Any] = {}
    for source, values, prefix in reversed(layers):
        unknown = sorted(set(values) - set(NAMES) - set(EXTRA_SETTINGS))
        if unknown:
            valid = ", ".join(prefix + name for name in (*NAMES, *EXTRA_SETTINGS))
            msg = (
                f"Unknown alembic-sqlite-lock setting {', '.join(prefix + u for u in unknown)}"
                f" ({source}). Valid settings: {valid}."
            )
            raise ConfigurationError(msg)
        for name, raw in values.items():
            if name in EXTRA_SETTINGS:
                continue  # not a RetryPolicy field: read by resolve_setting()
            chosen[name] = _convert(name, raw, f"{prefix}{name} ({source})")
    try:
        return RetryPolicy(**chosen)
    except ValueError as exc:
        raise ConfigurationError(f"{exc} Check where it is set: keyword arguments, "
                                 f"-x {X_PREFIX}<name>, or [{SECTION}] in alembic.ini.") from exc


def resolve_setting(config: Config, name: str,
                    overrides: Mapping[str, Any] | None = None) -> str:
    """A setting of EXTRA_SETTINGS, by the same precedence as resolve_policy()."""
    if overrides is None:
        overrides = config.attributes.get(SETTINGS_KEY, {})
    for values in (dict(overrides), _x_options(config), _ini_section(config)):
        if name in values:
            return str(values[name]).strip()
    return EXTRA_SETTINGS[name]


def _convert(name: str, raw: Any, where: str) -> Any:
    kind = _TYPES[name]
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
            values[key[len(X_PREFIX):]] = value
    return values


def _ini_section(config: Config) -> dict[str, str]:
    if config.config_file_name is None or not config.file_config.has_section(SECTION):
        return {}
    # configparser mixes its DEFAULT values (alembic puts ``here`` there) into every
    # section; only the keys written in our section are settings.
    defaults = config.file_config.defaults()
    return {
        key: value
        for key, value in config.file_config.items(SECTION)
        if key not in defaults
    }
