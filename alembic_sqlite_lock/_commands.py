"""``upgrade()``, ``downgrade()`` and ``stamp()``: Alembic's commands for app start-up.

They mirror ``alembic.command`` line for line, with two additions:

* a process-wide mutex: Alembic's ``context`` and ``op`` are module-level proxies, so
  two threads running commands at once would trample each other's state;
* a guard around the command's work function: if env.py runs migrations without
  ``alembic_sqlite_lock.run_migrations`` (Alembic's stock boilerplate), no lock was
  taken, and the guard stops the run before a single migration executes.
"""

from __future__ import annotations

import inspect
import os
import sys
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from alembic.config import Config
from alembic.runtime.environment import EnvironmentContext
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError

from ._alembic import StepsFn, downgrade_revs, stamp_revs, upgrade_revs
from ._env import STATE_KEY, RunState
from ._errors import ConfigurationError
from ._settings import SETTINGS_KEY, Settings, SettingsKeywords, resolve_settings
from ._steps import requiring_run_migrations

if sys.version_info >= (3, 11):
    from typing import Unpack
else:  # SQLAlchemy 2 depends on typing_extensions
    from typing_extensions import Unpack

_PROCESS_MUTEX = threading.RLock()
"""Serializes commands between the threads of one process (see the module docstring)."""

ConfigLike = Config | str | os.PathLike[str]


def upgrade(
    config: ConfigLike,
    revision: str = "head",
    *,
    sql: bool = False,
    tag: str | None = None,
    **settings: Unpack[SettingsKeywords],
) -> list[str]:
    """Upgrade to ``revision`` under the migration lock; safe from every worker at once.

    ``config`` is an ``alembic.config.Config`` or the path of an alembic.ini.
    ``settings`` are the lock settings (``deadline_s=300``...; see the reference). Returns
    the revisions this call applied (empty when another worker had done the work).
    """
    cfg = _as_config(config)
    script = ScriptDirectory.from_config(cfg)
    starting_rev, revision = _split_range(revision, sql=sql)

    # Named as alembic.command names its own: the revision cache answers an upgrade's
    # "anything to do?" without the revision files (_alembic.is_upgrade).
    def upgrade(heads: tuple[str, ...], _context: MigrationContext) -> Iterable[Any]:
        return upgrade_revs(script, revision, heads)

    return _run(cfg, script, upgrade, settings, as_sql=sql, starting_rev=starting_rev,
                destination_rev=revision, tag=tag)


def downgrade(
    config: ConfigLike,
    revision: str,
    *,
    sql: bool = False,
    tag: str | None = None,
    **settings: Unpack[SettingsKeywords],
) -> list[str]:
    """Downgrade to ``revision`` under the migration lock. Returns the reverted revisions."""
    cfg = _as_config(config)
    script = ScriptDirectory.from_config(cfg)
    if sql and ":" not in revision:
        raise CommandError("downgrade with --sql requires <fromrev>:<torev>")
    starting_rev, revision = _split_range(revision, sql=sql)

    def steps(heads: tuple[str, ...], _context: MigrationContext) -> Iterable[Any]:
        return downgrade_revs(script, revision, heads)

    return _run(cfg, script, steps, settings, as_sql=sql, starting_rev=starting_rev,
                destination_rev=revision, tag=tag)


def stamp(
    config: ConfigLike,
    revision: str | Sequence[str],
    *,
    sql: bool = False,
    tag: str | None = None,
    purge: bool = False,
    **settings: Unpack[SettingsKeywords],
) -> list[str]:
    """Set the version table to ``revision`` without running migrations, under the lock."""
    cfg = _as_config(config)
    script = ScriptDirectory.from_config(cfg)
    revisions = [revision] if isinstance(revision, str) else list(revision)
    starting_rev = None
    destinations = []
    for item in revisions:
        destination = item
        if sql and ":" in item:
            source, destination = item.split(":", 2)
            if starting_rev not in (None, source):
                raise CommandError(
                    "Stamp operation with --sql only supports a single starting revision "
                    "at a time"
                )
            starting_rev = source
        destinations.append(destination)

    def steps(heads: tuple[str, ...], _context: MigrationContext) -> Iterable[Any]:
        return stamp_revs(script, tuple(destinations), heads)

    return _run(cfg, script, steps, settings, as_sql=sql, starting_rev=starting_rev,
                destination_rev=tuple(destinations), tag=tag, purge=purge)


def _split_range(revision: str, *, sql: bool) -> tuple[str | None, str]:
    """``FROM:TO`` (offline only, as in alembic.command) into its two ends."""
    if ":" not in revision:
        return None, revision
    if not sql:
        raise CommandError("Range revision not allowed")
    starting_rev, revision = revision.split(":", 2)
    return starting_rev, revision


def _as_config(config: ConfigLike) -> Config:
    if isinstance(config, Config):
        return config
    path = os.fspath(config)
    if not os.path.isfile(path):
        msg = (
            f"No Alembic configuration file at {os.path.abspath(path)}. Pass the path of "
            "your alembic.ini (or an alembic.config.Config)."
        )
        raise ConfigurationError(msg)
    return load_config(path, toml_file=os.path.join(os.path.dirname(path), "pyproject.toml"))


def load_config(path: str, toml_file: str, **kwargs: Any) -> Config:
    """``Config(path)``, with ``toml_file`` as its pyproject.toml where Alembic reads
    one (1.16 and later: Alembic's ``pyproject`` template keeps the settings there)."""
    if "toml_file" in inspect.signature(Config).parameters and os.path.isfile(toml_file):
        return Config(path, toml_file=toml_file, **kwargs)
    return Config(path, **kwargs)


def _run(
    config: Config,
    script: ScriptDirectory,
    steps: StepsFn,
    settings: Settings | Mapping[str, Any],
    **opts: Any,
) -> list[str]:
    """Run the command's env.py under the guard. ``settings``: resolved already, or the
    keyword arguments to resolve them from, here, once for the whole run (bad settings
    fail here, before env.py runs); env.py's run_migrations() gets them handed down."""
    if not isinstance(settings, Settings):
        settings = resolve_settings(config, settings)
    # Alembic writes before it calls the work function (and so before the guard below):
    # it creates the version table on a fresh file, and empties it for --purge. Until
    # env.py proves it runs through our lock, Alembic gets dont_mutate and no purge.
    state = RunState(held_opts={"dont_mutate": False, "purge": opts.pop("purge", False)})
    opts["dont_mutate"] = True

    # The innermost wrapper of the command's work function (see _steps.py): Alembic
    # holds it from here on, whatever env.py does.
    guarded = requiring_run_migrations(
        steps, inside=lambda: state.inside, refused=lambda: _unprotected(script)
    )
    with _PROCESS_MUTEX:
        saved = {key: config.attributes.get(key) for key in (SETTINGS_KEY, STATE_KEY)}
        config.attributes[SETTINGS_KEY] = settings
        config.attributes[STATE_KEY] = state
        try:
            with EnvironmentContext(config, script, fn=guarded, **opts):
                script.run_env()
        finally:
            for key, value in saved.items():
                if value is None:
                    config.attributes.pop(key, None)
                else:
                    config.attributes[key] = value
    if not state.called:
        raise _unprotected(script)
    return state.applied


def _unprotected(script: ScriptDirectory) -> ConfigurationError:
    env_py = os.path.join(script.dir, "env.py")
    msg = (
        f"{env_py} does not run migrations through alembic_sqlite_lock.run_migrations(), "
        "so no lock would be taken and nothing was migrated. Replace its "
        "run_migrations_offline()/run_migrations_online() boilerplate with: "
        "`from alembic_sqlite_lock import run_migrations` and "
        "`run_migrations(context, target_metadata)`."
    )
    return ConfigurationError(msg)
