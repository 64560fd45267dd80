"""Settings, resolved in one place and in one order.

Keyword arguments (``upgrade(cfg, deadline_s=300)``), then ``-x lock_<name>=<value>`` on
the alembic command line, then the ``[alembic_sqlite_lock]`` section of alembic.ini,
then the defaults. A bad value fails at start, naming the setting and where it came
from. Every setting has one name everywhere (and a ``--<name>`` flag on our CLI).
"""

from __future__ import annotations

import configparser
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
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
class Settings:
    """Every setting of a run; the retry policy's fields are settings too."""

    policy: RetryPolicy = field(default_factory=RetryPolicy)
    lock_key: str | None = None
    """PostgreSQL / MySQL: what the lock is keyed on, instead of database, schema and
    version table (PostgreSQL: a 64-bit integer or any text, hashed; MySQL: the
    GET_LOCK name)."""
    lock_scope: str = "session"
    """PostgreSQL: ``session`` (pg_advisory_lock) or ``transaction``
    (pg_advisory_xact_lock, for PgBouncer in transaction-pooling mode)."""
    allow_unknown_revision: bool = False
    """Start anyway, with a WARNING and migrating nothing, when the database is at a
    revision this code does not have (an older release booting after a newer one)."""
    wait_while_holder_alive: bool = False
    """Past deadline_s, keep waiting while the recorded holder is provably alive on this
    host (a long migration), and still time out when it is not (or cannot be checked)."""
    backup_dir: str = ""
    """Empty: no backups. A directory (relative to the database's): the worker about to
    migrate copies the database there first (VACUUM INTO)."""
    backup_keep: int = 0
    """After a backup, delete this database's oldest backups so that at most this many
    remain; 0 keeps every backup (deleting is never done unless asked for)."""

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
_TYPES: dict[str, type] = {
    **{name: (int if name == "max_attempts" else float) for name in _POLICY_NAMES},
    "lock_key": str,
    "lock_scope": str,
    "allow_unknown_revision": bool,
    "wait_while_holder_alive": bool,
    "backup_dir": str,
    "backup_keep": int,
}
NAMES = tuple(_TYPES)
"""Every setting's name, in the order the docs and the generated alembic.ini list them."""
_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


def defaults() -> dict[str, str]:
    """Every setting's default as it is written in alembic.ini ("" for none)."""
    policy, rest = RetryPolicy(), Settings()
    values: dict[str, str] = {}
    for name in NAMES:
        value = getattr(policy if name in _POLICY_NAMES else rest, name)
        if isinstance(value, bool):
            values[name] = "true" if value else "false"
        elif isinstance(value, float) and value.is_integer():
            values[name] = str(int(value))
        else:
            values[name] = "" if value is None else str(value)
    return values


def resolve_policy(config: Config, overrides: Mapping[str, Any] | None = None) -> RetryPolicy:
    """The RetryPolicy for a run (see :func:`resolve_settings`)."""
    return resolve_settings(config, overrides).policy


def resolve_setting(config: Config, name: str, overrides: Mapping[str, Any] | None = None) -> str:
    """A text setting, resolved like every other."""
    return str(getattr(resolve_settings(config, overrides), name) or "")


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
            chosen[name] = convert(name, raw, f"{name} ({source})" if not prefix
                                   else f"{prefix}{name} ({source})")
    policy = {name: chosen.pop(name) for name in _POLICY_NAMES if name in chosen}
    return Settings(RetryPolicy(**policy), **chosen)


def convert(name: str, raw: Any, where: str) -> Any:
    """One setting's value from text (or a Python value), checked; ``where`` names the
    setting and its source in the error, e.g. ``deadline_s (-x option)``."""
    kind = _TYPES[name]
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
