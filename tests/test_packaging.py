"""The distribution as a user gets it, not the checkout that `make test` installs editable.

An editable install imports straight from the source tree, so a subpackage or a template
file that pyproject.toml forgets to ship still passes every other test. This one builds
the sdist and the wheel (from that sdist, as `make dist` does), checks the wheel's file
list, installs the wheel into a new, clean virtualenv and runs `alembic-sqlite-lock init`
and both upgrade commands from a folder outside the repository.

Needs the `build` package (the test extra) and the package index (build isolation
fetches setuptools; the clean venv's pip fetches SQLAlchemy and Alembic, pinned to this
venv's versions so that pip's cache serves them). Skipped without them, but with
CI=true it fails instead.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import sqlite3
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "alembic_sqlite_lock"
DIST_NAME = "alembic-sqlite-lock"
SUBPACKAGES = ["_backends", "_backends/_sqlite", "_cli"]
"""Checked by name too, so that a walk of an unexpectedly empty tree cannot pass."""

NOT_SHIPPED = ["alembic", "tests", "bench", "scripts", "examples", "containers",
               "constraints", "docs"]
"""Root folders that must never be in the wheel; `alembic/` would shadow the real one."""

NOT_COPIED = shutil.ignore_patterns(".git", ".venv*", "build", "dist", "*.egg-info",
                                    ".*_cache", ".cache", ".hypothesis", "__pycache__", "*.pyc")
"""Left behind when the tree is copied for the build: a stale egg-info's SOURCES.txt or
build/lib/ would put files into the distribution that pyproject.toml does not."""

pytestmark = pytest.mark.slow


def _unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: the packaging test must run)")
    pytest.skip(reason)


def _run(argv: list[str | Path], cwd: Path, env: dict[str, str] | None = None,
         timeout: float = 300) -> str:
    result = subprocess.run([str(arg) for arg in argv], cwd=cwd, env=env, timeout=timeout,
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        pytest.fail(f"{' '.join(map(str, argv))} exited {result.returncode} in {cwd}\n"
                    f"--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}")
    return result.stdout


def _require_build_tools(cwd: Path) -> None:
    if importlib.util.find_spec("build") is None:
        _unavailable("the `build` package is not installed (pip install -e '.[test]')")
    probe = subprocess.run(
        [sys.executable, "-m", "pip", "index", "versions", "setuptools", "--retries", "0",
         "--timeout", "15", "--disable-pip-version-check"],
        cwd=cwd, capture_output=True, text=True, timeout=120, check=False)
    if probe.returncode != 0:
        _unavailable(f"the package index does not answer: {probe.stderr.strip()[-500:]}")


def _package_files(source: Path) -> set[str]:
    """Every file of the package in the source tree, as the wheel should name it."""
    found = set()
    for path in (source / PACKAGE).rglob("*"):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
            found.add(path.relative_to(source).as_posix())
    return found


def _check_wheel(wheel: Path, source: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    dist_info = {name.split("/")[0] for name in names if ".dist-info/" in name}
    assert len(dist_info) == 1, dist_info

    required = {f"{PACKAGE}/__init__.py", f"{PACKAGE}/py.typed"}
    required |= {f"{PACKAGE}/{sub}/__init__.py" for sub in SUBPACKAGES}
    required |= _package_files(source)
    templates = source / PACKAGE / "_cli" / "templates"
    if templates.is_dir():
        # Data files, env.py among them: in a folder without __init__.py, not modules.
        shipped = {name for name in names if name.startswith(f"{PACKAGE}/_cli/templates/")}
        assert shipped, f"no file of {templates} is in the wheel"
    missing = sorted(required - names)
    assert not missing, f"in the source tree but not in {wheel.name}: {missing}"

    strays = sorted(name for name in names
                    if name.split("/")[0] not in {PACKAGE, *dist_info}
                    or "__pycache__" in name or name.endswith(".pyc"))
    assert not strays, f"{wheel.name} ships files outside the package: {strays}"
    for folder in NOT_SHIPPED:  # implied by the check above; kept for the clearer message
        assert not any(name.startswith(f"{folder}/") for name in names), folder


def _check_sdist(sdist: Path, source: Path) -> None:
    with tarfile.open(sdist) as archive:
        names = {"/".join(name.split("/")[1:]) for name in archive.getnames()}
    missing = sorted(_package_files(source) - names)
    assert not missing, f"in the source tree but not in {sdist.name}: {missing}"


def _pins() -> str:
    """This venv's versions as pip constraints: the clean venv gets the same SQLAlchemy
    and Alembic (the lowest ones under `make test-lowest`), from pip's cache."""
    pins = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name and name.lower().replace("_", "-") != DIST_NAME:
            pins.setdefault(name.lower(), f"{name}=={dist.version}")
    return "\n".join(sorted(pins.values())) + "\n"


def _version_row(database: Path) -> list[tuple[str, ...]]:
    with sqlite3.connect(database) as connection:
        return connection.execute("SELECT version_num FROM alembic_version").fetchall()


def test_the_built_wheel_ships_everything_and_runs_from_a_clean_venv(tmp_path: Path) -> None:
    assert not tmp_path.resolve().is_relative_to(REPO), "the test must run outside the repo"
    _require_build_tools(tmp_path)

    # 1. sdist and wheel, the wheel built from the unpacked sdist as `make dist` does, from
    # a copy of the tree as a fresh clone has it (and the build writes nothing here).
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=NOT_COPIED)
    out = tmp_path / "dist"
    _run([sys.executable, "-m", "build", "--outdir", out, source], cwd=tmp_path)
    [wheel] = out.glob("*.whl")
    [sdist] = out.glob("*.tar.gz")
    _check_sdist(sdist, source)
    _check_wheel(wheel, source)

    # 2. A clean venv (no --system-site-packages), the wheel and its declared dependencies.
    fresh = tmp_path / "fresh"
    _run([sys.executable, "-m", "venv", fresh], cwd=tmp_path)
    bin_dir = fresh / "bin"
    constraints = tmp_path / "constraints.txt"
    constraints.write_text(_pins(), encoding="utf-8")
    _run([bin_dir / "python", "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
          "-c", constraints, wheel], cwd=tmp_path)

    # Nothing from the checkout or the test venv: no PYTHONPATH, cwd outside the repo.
    env = {key: value for key, value in os.environ.items()
           if key not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP"}}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONNOUSERSITE"] = "1"
    project = tmp_path / "project"
    project.mkdir()
    where = _run([bin_dir / "python", "-c",
                  "import alembic, alembic_sqlite_lock, importlib.resources as r; "
                  "print(alembic.__file__); print(alembic_sqlite_lock.__file__); "
                  "print(r.files('alembic_sqlite_lock').joinpath('py.typed').is_file())"],
                 cwd=project, env=env).split()
    assert where[2] == "True", where
    for module_file in where[:2]:
        assert Path(module_file).resolve().is_relative_to(fresh.resolve()), where

    # 3. init, a revision from init's script.py.mako, `alembic upgrade head`; then a
    # hand-written revision and `alembic-sqlite-lock upgrade`.
    _run([bin_dir / "alembic-sqlite-lock", "init", "migrations"], cwd=project, env=env,
         timeout=120)
    env_py = project / "migrations" / "env.py"
    assert "run_migrations" in env_py.read_text(encoding="utf-8")
    assert (project / "alembic.ini").is_file()
    assert (project / "migrations" / "versions").is_dir()

    _run([bin_dir / "alembic", "revision", "-m", "first", "--rev-id", "0001"], cwd=project,
         env=env, timeout=120)
    _run([bin_dir / "alembic", "upgrade", "head"], cwd=project, env=env, timeout=120)
    database = project / "app.db"
    assert _version_row(database) == [("0001",)]

    (project / "migrations" / "versions" / "0002_things.py").write_text(textwrap.dedent("""\
        import sqlalchemy as sa
        from alembic import op

        revision = "0002"
        down_revision = "0001"
        branch_labels = None
        depends_on = None


        def upgrade() -> None:
            op.create_table("things", sa.Column("id", sa.Integer, primary_key=True))


        def downgrade() -> None:
            op.drop_table("things")
        """), encoding="utf-8")
    _run([bin_dir / "alembic-sqlite-lock", "upgrade"], cwd=project, env=env, timeout=120)
    assert _version_row(database) == [("0002",)]
    with sqlite3.connect(database) as connection:
        assert connection.execute("SELECT count(*) FROM things").fetchone() == (0,)
    _run([bin_dir / "alembic-sqlite-lock", "status"], cwd=project, env=env, timeout=120)
