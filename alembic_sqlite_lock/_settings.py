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

_POLICY_NAMES = tuple(f.name for f in fields(RetryPolicy))
RUN_SETTINGS: dict[str, bool] = {"allow_unknown_revision": False}
"""Settings that are not about waiting for the lock: on/off switches and their defaults."""
_TYPES: dict[str, type] = {
    **{name: (int if name == "max_attempts" else float) for name in _POLICY_NAMES},
    **{name: bool for name in RUN_SETTINGS},
}
NAMES = tuple(_TYPES)
_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


def resolve_policy(config: Config, overrides: Mapping[str, Any] | None = None) -> RetryPolicy:
    """Build the RetryPolicy for a run from every source, highest precedence first."""
    chosen = _resolve(config, overrides)
    try:
        return RetryPolicy(**{k: v for k, v in chosen.items() if k in _POLICY_NAMES})
    except ValueError as exc:
        raise ConfigurationError(f"{exc} Check where it is set: keyword arguments, "
                                 f"-x {X_PREFIX}<name>, or [{SECTION}] in alembic.ini.") from exc


def resolve_switch(config: Config, name: str, overrides: Mapping[str, Any] | None = None) -> bool:
    """One of the RUN_SETTINGS, resolved in the same order as the retry policy."""
    return bool(_resolve(config, overrides).get(name, RUN_SETTINGS[name]))


def _resolve(config: Config, overrides: Mapping[str, Any] | None) -> dict[str, Any]:
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
    return chosen


def _convert(name: str, raw: Any, where: str) -> Any:
    kind = _TYPES[name]
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
    text = str(raw).strip().lower() if isinstance(raw, str) else None
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    msg = f"Setting {where} must be true or false, got {raw!r}."
    raise ConfigurationError(msg)


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
