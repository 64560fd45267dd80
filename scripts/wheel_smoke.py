"""The built wheel as a user installs it: a new virtualenv, away from the checkout.

    make test-wheel                      # `make dist`, then this on dist/*.whl
    python scripts/wheel_smoke.py dist/alembic_sqlite_lock-0.1.0-py3-none-any.whl

Creates a clean virtualenv in a temporary folder outside the repository (no
--system-site-packages), installs the wheel into it with pip (not editable; SQLAlchemy
and Alembic come from the package index or pip's cache), then, from another temporary
folder, with PYTHONPATH unset and that virtualenv first on PATH:

* the package, Alembic and SQLAlchemy are imported from that virtualenv's site-packages
  (with scripts/ first on sys.path, as the demo has it), and the install is not editable;
* the installed metadata's version, ``__version__``, ``alembic-sqlite-lock --version``,
  alembic_sqlite_lock/_version.py and the top entry of CHANGELOG.md agree;
* ``alembic-sqlite-lock --help``, ``init``, ``alembic revision``, ``alembic upgrade head``,
  a hand-written revision applied by ``alembic-sqlite-lock upgrade head``, ``status``;
* the demo (scripts/demo.py, which is not in the wheel) run with the virtualenv's python:
  its workers are that virtualenv's ``alembic`` console script.

tests/test_packaging.py runs the same checks (``smoke()``) on the wheel it builds.
Exits 1 with the failing command and its output.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
PACKAGE = "alembic_sqlite_lock"
DIST_NAME = "alembic-sqlite-lock"
COMMANDS = ["init", "upgrade", "downgrade", "stamp", "current", "status", "exec"]
DEMO_WORKERS = 8
CHANGELOG_ENTRY = re.compile(r"^## (\S+) \((unreleased|\d{4}-\d{2}-\d{2})\)$", re.MULTILINE)
"""The heading of a CHANGELOG.md entry: ``## 0.1.0 (2026-12-02)`` or ``(unreleased)``."""

_WHERE = """\
import importlib.metadata, importlib.resources, json, sys, sysconfig
sys.path.insert(0, sys.argv[1])  # as `python scripts/demo.py` (and gated.py) has it
import alembic, alembic_sqlite_lock, sqlalchemy
files = importlib.resources.files("alembic_sqlite_lock")
dist = importlib.metadata.distribution("alembic-sqlite-lock")
print(json.dumps({
    "modules": [alembic_sqlite_lock.__file__, alembic.__file__, sqlalchemy.__file__],
    "purelib": sysconfig.get_paths()["purelib"],
    "prefix": sys.prefix,
    "sys_path": sys.path,
    "version": alembic_sqlite_lock.__version__,
    "metadata_version": dist.version,
    "direct_url": dist.read_text("direct_url.json"),
    "py_typed": files.joinpath("py.typed").is_file(),
    "templates": files.joinpath("_cli", "templates").is_dir(),
}))
"""

_SECOND_REVISION = textwrap.dedent("""\
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
    """)


class SmokeError(Exception):
    """A check failed; the message says which, with the command's output."""


def source_version(repo: Path = REPO) -> str:
    """``__version__`` as alembic_sqlite_lock/_version.py writes it, without importing it."""
    tree = ast.parse((repo / PACKAGE / "_version.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)
                and node.targets[0].id == "__version__"
                and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)):
            return node.value.value
    raise SmokeError(f"{repo / PACKAGE / '_version.py'} assigns no __version__ string")


def changelog_top(repo: Path = REPO) -> tuple[str, str]:
    """The version and the date (or ``unreleased``) of CHANGELOG.md's top entry."""
    text = (repo / "CHANGELOG.md").read_text(encoding="utf-8")
    first = next((line for line in text.splitlines() if line.startswith("## ")), None)
    match = CHANGELOG_ENTRY.match(first or "")
    if match is None:
        raise SmokeError(f"CHANGELOG.md's top entry {first!r} is not "
                         "'## VERSION (YYYY-MM-DD)' or '## VERSION (unreleased)'")
    return match.group(1), match.group(2)


def clean_env(venv: Path) -> dict[str, str]:
    """This environment without anything that would import from elsewhere than ``venv``."""
    env = {key: value for key, value in os.environ.items()
           if key not in {"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV",
                          "ALEMBIC_CONFIG", "PYTHONSAFEPATH"}
           and not key.startswith("ALEMBIC_SQLITE_LOCK")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv)
    env["PYTHONNOUSERSITE"] = "1"
    return env


def run(argv: Sequence[str | Path], cwd: Path, env: dict[str, str] | None = None,
        timeout: float = 300) -> str:
    """Run a command; its stdout, or SmokeError with everything it printed."""
    try:
        result = subprocess.run([str(arg) for arg in argv], cwd=cwd, env=env, timeout=timeout,
                                capture_output=True, text=True, check=False)
    except subprocess.TimeoutExpired as error:
        raise SmokeError(f"{' '.join(map(str, argv))} did not finish in {timeout} s "
                         f"in {cwd}") from error
    if result.returncode != 0:
        raise SmokeError(f"{' '.join(map(str, argv))} exited {result.returncode} in {cwd}\n"
                         f"--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}")
    return result.stdout


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise SmokeError(message)


def _inside(path: str | Path, folder: Path) -> bool:
    return Path(path).resolve().is_relative_to(folder.resolve())


def make_venv(venv: Path, wheel: Path, *, constraints: Path | None = None,
              python: str = sys.executable) -> None:
    """A new virtualenv at ``venv`` with ``wheel`` and its dependencies installed."""
    run([python, "-m", "venv", venv], cwd=venv.parent)
    pip: list[str | Path] = [venv / "bin" / "python", "-m", "pip", "install", "--quiet",
                             "--disable-pip-version-check"]
    if constraints is not None:
        pip += ["-c", constraints]
    run([*pip, wheel.resolve()], cwd=venv.parent, env=clean_env(venv))


def smoke(venv: Path, work: Path, *, demo_workers: int = DEMO_WORKERS,
          log: Callable[[str], object] = print) -> None:
    """Every check of the module docstring, on the wheel installed in ``venv``; the
    commands run in folders under ``work`` (which must be outside the repository)."""
    _check(not _inside(work, REPO), f"{work} is inside the repository {REPO}")
    work.mkdir(parents=True, exist_ok=True)
    env = clean_env(venv)
    where = _check_where(venv, work, env)
    log(f"imported from {where['modules'][0]}")
    log(_check_versions(venv, work, env, where))
    _check_commands(venv, work / "project", env)
    log("--help, init, alembic upgrade head, alembic-sqlite-lock upgrade head, status: ok")
    log(_check_demo(venv, work / "demo", env, demo_workers))


def _check_where(venv: Path, work: Path, env: dict[str, str]) -> dict[str, Any]:
    """Where the package comes from, as the demo's processes import it."""
    where: dict[str, Any] = json.loads(
        run([venv / "bin" / "python", "-c", _WHERE, SCRIPTS], cwd=work, env=env))
    purelib = Path(where["purelib"])
    _check(_inside(purelib, venv), f"site-packages {purelib} is not in {venv}")
    for module in where["modules"]:
        _check(_inside(module, purelib),
               f"{module} is not imported from the new virtualenv's {purelib}")
    _check(not any(entry and _inside(entry, REPO) and Path(entry).resolve() != SCRIPTS
                   for entry in where["sys_path"]),
           f"the repository is on sys.path: {where['sys_path']}")
    direct_url = json.loads(where["direct_url"] or "{}")
    _check(not direct_url.get("dir_info", {}).get("editable", False)
           and "archive_info" in direct_url,
           f"not installed from a wheel file: direct_url.json {direct_url}")
    _check(where["py_typed"], "py.typed is not installed")
    _check(where["templates"], "init's templates are not installed")
    return where


def _check_versions(venv: Path, work: Path, env: dict[str, str],
                    where: dict[str, Any]) -> str:
    """One version everywhere."""
    expected = source_version()
    changelog, date = changelog_top()
    shown = run([venv / "bin" / DIST_NAME, "--version"], cwd=work, env=env).strip()
    versions = {"alembic_sqlite_lock/_version.py": expected,
                "installed metadata": where["metadata_version"],
                "__version__": where["version"],
                f"`{DIST_NAME} --version`": shown.removeprefix(f"{DIST_NAME} "),
                "CHANGELOG.md": changelog}
    _check(len(set(versions.values())) == 1, f"the versions differ: {versions}")
    return f"version {expected} everywhere (CHANGELOG.md: {date}); --version: {shown!r}"


def _check_commands(venv: Path, project: Path, env: dict[str, str]) -> None:
    """The console scripts: --help, init, a revision from init's script.py.mako,
    `alembic upgrade head`, a hand-written revision by `alembic-sqlite-lock upgrade head`."""
    cli = venv / "bin" / DIST_NAME
    project.mkdir()
    helptext = run([cli, "--help"], cwd=project, env=env)
    missing = [command for command in COMMANDS if command not in helptext]
    _check(not missing, f"--help does not list {missing}:\n{helptext}")
    run([cli, "init", "migrations"], cwd=project, env=env, timeout=120)
    env_py = (project / "migrations" / "env.py").read_text(encoding="utf-8")
    _check("run_migrations" in env_py, f"init's env.py does not call run_migrations:\n{env_py}")
    _check((project / "alembic.ini").is_file(), "init wrote no alembic.ini")
    _check((project / "migrations" / "versions").is_dir(), "init wrote no versions/")
    run([venv / "bin" / "alembic", "revision", "-m", "first", "--rev-id", "0001"],
        cwd=project, env=env, timeout=120)
    run([venv / "bin" / "alembic", "upgrade", "head"], cwd=project, env=env, timeout=120)
    database = project / "app.db"
    _check(_version_rows(database) == [("0001",)],
           f"after `alembic upgrade head`: {_version_rows(database)}")
    (project / "migrations" / "versions" / "0002_things.py").write_text(
        _SECOND_REVISION, encoding="utf-8")
    run([cli, "upgrade", "head"], cwd=project, env=env, timeout=120)
    _check(_version_rows(database) == [("0002",)],
           f"after `{DIST_NAME} upgrade head`: {_version_rows(database)}")
    with sqlite3.connect(database) as connection:
        _check(connection.execute("SELECT count(*) FROM things").fetchone() == (0,),
               "0002's table is missing")
    connection.close()
    status = run([cli, "status"], cwd=project, env=env, timeout=120)
    _check("0002" in status and "up to date" in status, f"status:\n{status}")


def _check_demo(venv: Path, cwd: Path, env: dict[str, str], workers: int) -> str:
    """The demo, from the checkout's scripts/ but with the new virtualenv's python and
    console scripts (its workers run `alembic` from the interpreter's bin/)."""
    cwd.mkdir()
    report = run([venv / "bin" / "python", SCRIPTS / "demo.py", "--workers", str(workers)],
                 cwd=cwd, env=env, timeout=180)
    final = [line for line in report.splitlines() if line.startswith("Final revision:")]
    _check(len(final) == 1 and " 0 worker(s) failed" in final[0]
           and "ran 1 time(s)" in final[0], f"the demo's report:\n{report}")
    return f"demo, {workers} workers: {final[0]}"


def _version_rows(database: Path) -> list[tuple[str, ...]]:
    with sqlite3.connect(database) as connection:
        rows = connection.execute("SELECT version_num FROM alembic_version").fetchall()
    connection.close()
    return [tuple(row) for row in rows]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheel", type=Path, help="the .whl file to install")
    parser.add_argument("--constraints", type=Path, default=None,
                        help="pip constraints for its dependencies (default: newest)")
    parser.add_argument("--demo-workers", type=int, default=DEMO_WORKERS)
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary folder (printed) for a look")
    args = parser.parse_args(argv)
    if args.wheel.suffix != ".whl" or not args.wheel.is_file():
        parser.error(f"{args.wheel} is not a wheel file (run `make dist` first)")

    start = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="alembic-sqlite-lock-wheel-")).resolve()
    try:
        if _inside(tmp, REPO):
            raise SmokeError(f"the temporary folder {tmp} is inside the repository")
        venv = tmp / "venv"
        print(f"installing {args.wheel.name} into a new virtualenv {venv}", flush=True)
        make_venv(venv, args.wheel, constraints=args.constraints)
        print(f"installed in {time.monotonic() - start:.0f} s", flush=True)
        smoke(venv, tmp / "work", demo_workers=args.demo_workers,
              log=lambda line: print(line, flush=True))
    except SmokeError as error:
        print(f"wheel_smoke.py: FAILED: {error}", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"wheel_smoke.py: ok, {args.wheel.name} works from a clean virtualenv "
          f"({time.monotonic() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
