"""``alembic-sqlite-lock init DIR``: a new Alembic environment that uses the lock.

Alembic's own ``alembic init --template`` only looks inside Alembic's package folder,
so this writes the files itself: the same layout as ``alembic init`` (an alembic.ini,
DIR/env.py, DIR/script.py.mako, an empty DIR/versions/), with our one-call env.py, a
commented ``[alembic_sqlite_lock]`` section and logging that shows our INFO lines. The
files are in ``templates/``; alembic.ini.template's ``${...}`` placeholders are filled in
here (the settings section from ``_settings.SETTINGS``).

``--async`` writes the env.py of Alembic's async template (``alembic init -t async``) in
the one-call form (``templates/async/env.py``), with an async URL
(``sqlite+aiosqlite://``) by default.

``--flask-migrate`` writes Flask-Migrate's layout instead (alembic.ini inside DIR, its
env.py in the one-call form), from ``templates/flask-migrate/``: an Alembic template
folder, which ``flask db init -t <that folder>`` can use as well.
"""

from __future__ import annotations

import os
import re
import string
import textwrap
from importlib import resources
from pathlib import Path

from .._errors import ConfigurationError
from .._settings import SECTION, SETTINGS, X_PREFIX

DEFAULT_URL = "sqlite:///%(here)s/app.db"
ASYNC_DEFAULT_URL = "sqlite+aiosqlite:///%(here)s/app.db"
"""``--async``'s sqlalchemy.url when none is given: what an async app's engine uses."""


def template(name: str) -> str:
    """A file of ``templates/`` (shipped with the package), as text."""
    folder = resources.files("alembic_sqlite_lock._cli") / "templates"
    return (folder / name).read_text(encoding="utf-8")


def settings_section() -> str:
    """The ``[alembic_sqlite_lock]`` section: every setting, its help and its default,
    commented out (from ``_settings.SETTINGS``)."""
    lines = [
        f"[{SECTION}]",
        "# Every setting, with its default. Overridden by the same-named flag of",
        f"# alembic-sqlite-lock (--deadline_s 300), by `-x {X_PREFIX}<name>=...` on the",
        "# command line and by keyword arguments of alembic_sqlite_lock.upgrade().",
    ]
    for setting in SETTINGS:
        lines.extend(textwrap.wrap(f"{setting.name}: {setting.help}", width=86,
                                   initial_indent="# ", subsequent_indent="#   "))
        lines.append(f"# {setting.name} = {setting.ini_default}".rstrip())
    return "\n".join(lines) + "\n"


def ini_text(script_location: str, url: str = DEFAULT_URL) -> str:
    """templates/alembic.ini.template with its placeholders filled in."""
    return string.Template(template("alembic.ini.template")).substitute(
        script_location=script_location, url=url, settings_section=settings_section()
    )


FLASK_MIGRATE = "flask-migrate"
"""The template folder for Flask-Migrate (``templates/flask-migrate``)."""


def init(directory: str | os.PathLike[str], config_file: str | os.PathLike[str],
         url: str = DEFAULT_URL, *, async_template: bool = False) -> list[Path]:
    """Create the environment in ``directory`` and its ini at ``config_file``
    (``async_template``: the env.py of Alembic's async template, in the one-call form).

    Refuses (ConfigurationError, nothing written) when ``directory`` exists and is not
    empty or ``config_file`` exists. Returns the files and folders it created.
    """
    target = Path(directory).absolute()
    ini = Path(config_file).absolute()
    _refuse_existing(target, ini)
    return _write(target, {
        target / "env.py": template("async/env.py" if async_template else "env.py"),
        target / "script.py.mako": template("script.py.mako"),
        target / "README": template("README"),
        ini: ini_text(_script_location(target, ini.parent), _ini_value(url)),
    })


def init_flask_migrate(directory: str | os.PathLike[str]) -> list[Path]:
    """Flask-Migrate's layout in ``directory`` (what ``flask db init`` writes, with the
    one-call env.py): Flask-Migrate finds alembic.ini there and sets the URL from the
    app's engine. Refuses like :func:`init`."""
    target = Path(directory).absolute()
    ini = target / "alembic.ini"
    _refuse_existing(target, ini)
    folder = f"{FLASK_MIGRATE}/"
    return _write(target, {
        target / "env.py": template(folder + "env.py"),
        target / "script.py.mako": template(folder + "script.py.mako"),
        target / "README": template(folder + "README"),
        # No ${...} in it: Alembic's init renders it to itself, less one escape.
        ini: template(folder + "alembic.ini.mako"),
    })


def _refuse_existing(target: Path, ini: Path) -> None:
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


def _write(target: Path, files: dict[Path, str]) -> list[Path]:
    created = []
    for folder in (target, target / "versions"):
        if not folder.exists():
            folder.mkdir(parents=True)
            created.append(folder)
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
