"""The distribution as a user gets it, not the checkout that `make test` installs editable.

An editable install imports straight from the source tree, so a subpackage or a template
file that pyproject.toml forgets to ship still passes every other test. The slow test
builds the sdist and the wheel (from that sdist, as `make dist` does), checks the wheel's
file list and version, runs `twine check --strict` on both, installs the wheel into a
new, clean virtualenv and runs scripts/wheel_smoke.py's checks from folders outside the
repository (what `make test-wheel` runs on dist/): the package imported from that
virtualenv, one version everywhere, `--help`, `init`, `alembic upgrade head`,
`alembic-sqlite-lock upgrade head`, `status` and the demo with that virtualenv's python.

The slow test needs the `build` and `twine` packages (the test extra) and the package
index (build isolation fetches setuptools; the clean venv's pip fetches SQLAlchemy and
Alembic, pinned to this venv's versions so that pip's cache serves them). Skipped
without them, but with CI=true it fails instead. The fast tests check that the version
is written in one place and that CHANGELOG.md's top entry is that version.
"""

from __future__ import annotations

import datetime
import email.parser
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from wheel_smoke import SmokeError, changelog_top, make_venv, smoke, source_version

import alembic_sqlite_lock
from alembic_sqlite_lock._cli import main

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

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

VERSION_ATTR = "alembic_sqlite_lock._version.__version__"
"""Where setuptools reads the version (pyproject.toml's [tool.setuptools.dynamic])."""


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
    for tool in ("build", "twine"):
        if importlib.util.find_spec(tool) is None:
            _unavailable(f"the `{tool}` package is not installed (pip install -e '.[test]')")
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


def _wheel_version(wheel: Path) -> str:
    """The Version of the wheel's METADATA, which pip and PyPI read."""
    with zipfile.ZipFile(wheel) as archive:
        [metadata] = [name for name in archive.namelist()
                      if name.endswith(".dist-info/METADATA")]
        text = archive.read(metadata).decode("utf-8")
    version = email.parser.Parser().parsestr(text, headersonly=True)["Version"]
    assert version, f"{wheel.name}'s METADATA has no Version"
    return str(version)


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


def test_the_version_is_written_in_one_place() -> None:
    """alembic_sqlite_lock/_version.py: setuptools reads it for the metadata, the package
    and `--version` import it; no other file writes the version out."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    assert "version" not in pyproject["project"]
    assert "version" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": VERSION_ATTR}
    version = alembic_sqlite_lock.__version__
    assert source_version() == version

    quoted = (f'"{version}"', f"'{version}'")
    writers = []
    for folder, dirs, files in os.walk(REPO):
        # Not the virtualenvs, caches, build output (dot folders, build/, dist/).
        dirs[:] = [name for name in dirs if not name.startswith(".")
                   and name not in {"build", "dist", "__pycache__"}
                   and not name.endswith(".egg-info")]
        for name in files:
            path = Path(folder, name)
            if (path.suffix in {".py", ".toml", ".cfg", ".ini", ".mako", ".txt", ".md"}
                    and path != REPO / PACKAGE / "_version.py"
                    and any(literal in path.read_text(encoding="utf-8", errors="replace")
                            for literal in quoted)):
                writers.append(path.relative_to(REPO).as_posix())
    assert not writers, f"these files write out the version {version} (read _version.py)"


def test_version_option_shows_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["--version"])
    assert stopped.value.code == 0
    assert capsys.readouterr().out == f"{DIST_NAME} {alembic_sqlite_lock.__version__}\n"


def test_changelog_top_entry_is_this_version() -> None:
    """The release a user installs is the one the changelog's top entry describes."""
    version, date = changelog_top()
    assert version == alembic_sqlite_lock.__version__, (
        f"CHANGELOG.md's top entry is {version}, _version.py says "
        f"{alembic_sqlite_lock.__version__}")
    if date != "unreleased":
        datetime.date.fromisoformat(date)  # a real date, not 2026-13-40


@pytest.mark.slow
def test_the_built_wheel_ships_everything_and_runs_from_a_clean_venv(tmp_path: Path) -> None:
    assert not tmp_path.resolve().is_relative_to(REPO), "the test must run outside the repo"
    _require_build_tools(tmp_path)

    # 1. sdist and wheel, the wheel built from the unpacked sdist as `make dist` does, from
    # a copy of the tree as a fresh clone has it (and the build writes nothing here); then
    # `twine check --strict` as `make dist` runs it.
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=NOT_COPIED)
    out = tmp_path / "dist"
    _run([sys.executable, "-m", "build", "--outdir", out, source], cwd=tmp_path)
    [wheel] = out.glob("*.whl")
    [sdist] = out.glob("*.tar.gz")
    _check_sdist(sdist, source)
    _check_wheel(wheel, source)
    version = alembic_sqlite_lock.__version__
    assert _wheel_version(wheel) == version
    assert wheel.name.startswith(f"{PACKAGE}-{version}-"), wheel.name
    assert sdist.name == f"{PACKAGE}-{version}.tar.gz", sdist.name
    _run([sys.executable, "-m", "twine", "check", "--strict", wheel, sdist], cwd=tmp_path)

    # 2. A clean venv (no --system-site-packages), the wheel and its declared dependencies
    # (not editable, not the checkout), this venv's versions as constraints.
    fresh = tmp_path / "fresh"
    constraints = tmp_path / "constraints.txt"
    constraints.write_text(_pins(), encoding="utf-8")
    # 3. From folders outside the repository, PYTHONPATH unset: where the package is
    # imported from, one version everywhere, the console scripts, the demo.
    try:
        make_venv(fresh, wheel, constraints=constraints, python=sys.executable)
        smoke(fresh, tmp_path / "work", log=lambda line: None)
    except SmokeError as error:
        pytest.fail(str(error))
