"""The shape of the repository and of the package, as a user's tools see it.

The demo's Alembic environment lives in a folder named ``alembic/`` at the root. It must
stay a plain folder: with an ``__init__.py`` it would become a package that shadows the
real ``alembic`` for anything run from the repository root.
"""

from __future__ import annotations

import os
import subprocess
import sys
import types
from importlib import resources
from pathlib import Path

from conftest import REPO

import alembic_sqlite_lock


def run_python(code: str) -> str:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_the_root_alembic_folder_is_not_a_package() -> None:
    assert (REPO / "alembic" / "env.py").is_file()
    assert not (REPO / "alembic" / "__init__.py").exists()


def test_import_alembic_from_the_repository_root_finds_the_real_alembic() -> None:
    # `python -c` puts the current directory first on sys.path: the worst case.
    printed = run_python("import alembic, sys; print(alembic.__file__)")

    found = Path(printed).resolve()
    assert found.name == "__init__.py"
    assert not found.is_relative_to((REPO / "alembic").resolve())
    assert "site-packages" in found.parts
    assert run_python("from alembic import command, op, context; print('ok')") == "ok"


def test_all_lists_exactly_the_public_names() -> None:
    module = alembic_sqlite_lock
    public = {
        name
        for name in dir(module)
        if not name.startswith("_") and not isinstance(getattr(module, name), types.ModuleType)
    }

    assert len(module.__all__) == len(set(module.__all__))
    assert set(module.__all__) - {"__version__"} == public
    assert "__version__" in module.__all__


def test_every_name_in_all_is_importable() -> None:
    namespace: dict[str, object] = {}
    exec("from alembic_sqlite_lock import *", namespace)

    assert set(namespace) - {"__builtins__"} == set(alembic_sqlite_lock.__all__)
    for name in alembic_sqlite_lock.__all__:
        assert namespace[name] is getattr(alembic_sqlite_lock, name)


def test_version_is_a_string() -> None:
    assert isinstance(alembic_sqlite_lock.__version__, str)
    assert alembic_sqlite_lock.__version__[0].isdigit()


def test_py_typed_ships_in_the_package_directory() -> None:
    marker = resources.files("alembic_sqlite_lock") / "py.typed"

    assert marker.is_file()
    assert Path(alembic_sqlite_lock.__file__).with_name("py.typed").is_file()


def test_the_package_logger_has_only_a_null_handler() -> None:
    # A fresh interpreter: in this one, another test may have configured logging.
    printed = run_python(
        "import logging, alembic_sqlite_lock\n"
        "print([type(h).__name__ for h in logging.getLogger('alembic_sqlite_lock').handlers])\n"
        "print(logging.getLogger('alembic_sqlite_lock').propagate)\n"
        "print(logging.getLogger('alembic_sqlite_lock').level)\n"
        "print(logging.getLogger().handlers)"
    )

    handlers, propagate, level, root_handlers = printed.splitlines()
    assert handlers == "['NullHandler']"
    assert propagate == "True"  # the app's handlers on the root logger see our lines
    assert level == "0"  # NOTSET: the app decides what is shown
    assert root_handlers == "[]"  # importing the library configured no logging


def test_the_demo_ini_lists_every_setting() -> None:
    """Its [alembic_sqlite_lock] section says it has every setting, commented out."""
    from alembic_sqlite_lock._settings import NAMES

    ini = (REPO / "alembic.ini").read_text()
    section = ini.split("[alembic_sqlite_lock]", 1)[1].split("\n[", 1)[0]
    assert [name for name in NAMES if f"# {name} =" not in section] == []


def test_importing_the_package_loads_the_sqlite_backend_and_no_server_one() -> None:
    """A preloading app server (gunicorn --preload) imports the package once and forks:
    code first imported after the fork is paid again by every worker (the SQLite backend
    was about 10 ms each). The server backends stay unloaded for SQLite apps."""
    printed = run_python(
        "import sys, alembic_sqlite_lock; "
        "print(sorted(m for m in sys.modules if m.startswith('alembic_sqlite_lock._backends.')))"
    )
    assert "'alembic_sqlite_lock._backends._sqlite._backend'" in printed
    assert "_postgresql" not in printed
    assert "_mysql" not in printed
