"""``alembic-sqlite-lock init DIR``: a new Alembic environment that uses the lock.

Alembic's own ``alembic init --template`` only looks inside Alembic's package folder,
so this writes the files itself: the same layout as ``alembic init`` (an alembic.ini,
DIR/env.py, DIR/script.py.mako, an empty DIR/versions/), with our one-call env.py, a
commented ``[alembic_sqlite_lock]`` section and logging that shows our INFO lines.
"""

from __future__ import annotations

import os
import re
import textwrap
from pathlib import Path

from .._errors import ConfigurationError
from .._settings import SECTION, X_PREFIX, defaults

DEFAULT_URL = "sqlite:///%(here)s/app.db"

SETTING_HELP = {
    "max_attempts": "attempts to take the lock, each on a new connection",
    "base_delay_s": "back-off after failed attempt n: base_delay_s * 2**n seconds...",
    "jitter_s": "...plus uniform(0, jitter_s), so waiting workers do not retry in lockstep",
    "busy_timeout_s": "how long one attempt waits inside SQLite's busy handler",
    "deadline_s": "overall seconds a worker waits for the lock before LockTimeout",
    "allow_unknown_revision": (
        "true: start anyway (a WARNING, nothing migrated) when the database is at a "
        "revision this code does not have"
    ),
    "wait_while_holder_alive": (
        "true: past deadline_s, keep waiting while the recorded holder is provably alive "
        "on this host"
    ),
    "lock_key": "PostgreSQL/MySQL: what the lock is keyed on (default: derived)",
    "lock_scope": "PostgreSQL: session, or transaction behind PgBouncer transaction pooling",
    "backup_dir": (
        "empty: no backups. A directory (relative to the database's): before migrating, "
        "the worker holding the lock writes a copy there (VACUUM INTO)"
    ),
    "backup_keep": (
        "0: keep every backup. N: after each backup, delete this database's oldest "
        "backups in backup_dir so that at most N remain"
    ),
}
"""One line per setting, for the generated alembic.ini and the CLI's --help."""


def setting_defaults() -> dict[str, str]:
    """Every setting's default, as it would be written in alembic.ini."""
    return defaults()


def settings_section() -> str:
    lines = [
        f"[{SECTION}]",
        "# Every setting, with its default. Overridden by the same-named flag of",
        f"# alembic-sqlite-lock (--deadline_s 300), by `-x {X_PREFIX}<name>=...` on the",
        "# command line and by keyword arguments of alembic_sqlite_lock.upgrade().",
    ]
    for name, default in setting_defaults().items():
        if name in SETTING_HELP:
            lines.extend(textwrap.wrap(f"{name}: {SETTING_HELP[name]}", width=86,
                                       initial_indent="# ", subsequent_indent="#   "))
        lines.append(f"# {name} = {default}".rstrip())
    return "\n".join(lines) + "\n"


def ini_text(script_location: str, url: str = DEFAULT_URL) -> str:
    return f"""\
# Alembic configuration made by `alembic-sqlite-lock init`.
# `alembic upgrade head` (or `alembic-sqlite-lock upgrade`) from any number of workers
# at once is safe: env.py calls alembic_sqlite_lock.run_migrations().

[alembic]
script_location = {script_location}
prepend_sys_path = .
path_separator = os
sqlalchemy.url = {url}

{settings_section()}
[loggers]
keys = root,sqlalchemy,alembic,alembic_sqlite_lock

[handlers]
keys = console

[formatters]
keys = generic

[logger_root]
level = WARNING
handlers = console
qualname =

[logger_sqlalchemy]
level = WARNING
handlers =
qualname = sqlalchemy.engine

[logger_alembic]
level = WARNING
handlers =
qualname = alembic

# INFO shows which worker applied which migration, and who waited for whom.
[logger_alembic_sqlite_lock]
level = INFO
handlers =
qualname = alembic_sqlite_lock

[handler_console]
class = StreamHandler
args = (sys.stderr,)
level = NOTSET
formatter = generic

[formatter_generic]
format = %(asctime)s %(levelname)-5.5s [pid %(process)d] %(message)s
datefmt = %H:%M:%S
"""


ENV_PY = '''\
"""Alembic environment, made by `alembic-sqlite-lock init`.

Alembic's online/offline boilerplate is replaced by one call: run_migrations() takes
SQLite's write lock before the current revision is read and holds it until the new
revision is committed, so every worker can run `alembic upgrade head` at start-up.
"""

from logging.config import fileConfig

from alembic import context
from alembic_sqlite_lock import run_migrations

config = context.config

# Configure logging from alembic.ini only when a command line runs us; an app calling
# alembic_sqlite_lock.upgrade() at start-up keeps its own logging.
if config.config_file_name is not None and config.cmd_opts is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)

# Your models' MetaData, for `alembic revision --autogenerate` and `alembic check`:
#     from myapp.models import Base
#     target_metadata = Base.metadata
target_metadata = None

# Keyword arguments go to context.configure(), e.g. render_as_batch=True.
run_migrations(context, target_metadata)
'''

SCRIPT_PY_MAKO = '''\
"""${message}

Revision ID: ${up_revision}
Revises: ${down_revision | comma,n}
Create Date: ${create_date}

"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
${imports if imports else ""}

# revision identifiers, used by Alembic.
revision: str = ${repr(up_revision)}
down_revision: str | Sequence[str] | None = ${repr(down_revision)}
branch_labels: str | Sequence[str] | None = ${repr(branch_labels)}
depends_on: str | Sequence[str] | None = ${repr(depends_on)}


def upgrade() -> None:
    ${upgrades if upgrades else "pass"}


def downgrade() -> None:
    ${downgrades if downgrades else "pass"}
'''

README = """\
An Alembic environment made by `alembic-sqlite-lock init`.

    alembic revision -m "create users"      # write a migration in versions/
    alembic-sqlite-lock upgrade             # or `alembic upgrade head`, from every worker
    alembic-sqlite-lock status              # where the database is, and who is migrating
"""


def init(directory: str | os.PathLike[str], config_file: str | os.PathLike[str],
         url: str = DEFAULT_URL) -> list[Path]:
    """Create the environment in ``directory`` and its ini at ``config_file``.

    Refuses (ConfigurationError, nothing written) when ``directory`` exists and is not
    empty or ``config_file`` exists. Returns the files and folders it created.
    """
    target = Path(directory).absolute()
    ini = Path(config_file).absolute()
    if target.exists() and not target.is_dir():
        raise ConfigurationError(f"{target} exists and is not a directory; choose another.")
    if target.is_dir() and any(target.iterdir()):
        raise ConfigurationError(
            f"Directory {target} already exists and is not empty; nothing was written. "
            "Choose a new directory, or empty this one first."
        )
    if ini.exists():
        raise ConfigurationError(
            f"{ini} already exists; nothing was written. Pass another path with "
            "-c/--config, or add `run_migrations(context, target_metadata)` to your "
            "existing env.py by hand (see the README)."
        )
    created = []
    for folder in (target, target / "versions"):
        if not folder.exists():
            folder.mkdir(parents=True)
            created.append(folder)
    files = {
        target / "env.py": ENV_PY,
        target / "script.py.mako": SCRIPT_PY_MAKO,
        target / "README": README,
        ini: ini_text(_script_location(target, ini.parent), _ini_value(url)),
    }
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        created.append(path)
    return created


def _ini_value(text: str) -> str:
    """``text`` written so that configparser reads it back: every % is literal (%%) but
    in ``%(here)s``, the one interpolation a path or URL here is meant to use."""
    return re.sub(r"%(?!\(here\)s)", "%%", text)


def _script_location(target: Path, ini_dir: Path) -> str:
    """``%(here)s/<dir>`` when the environment sits under the ini's folder (movable)."""
    try:
        relative = target.relative_to(ini_dir)
    except ValueError:
        return _ini_value(str(target))
    return "%(here)s/" + _ini_value(relative.as_posix())
