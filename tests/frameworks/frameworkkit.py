"""What the framework tests share: real processes racing on one fresh SQLite file, and
facts read back from it, by SQLite itself and by the framework.

The frameworks are never imported into the pytest process: ``scenario.py`` runs them
in processes of their own (this virtualenv's Python), so that nothing here depends on
their import side effects or their warnings.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SCENARIO = HERE / "scenario.py"
BIN = Path(sys.executable).parent

WORKERS = 8
REPETITIONS = 3
"""Each race runs on this many fresh files."""
CONTROL_REPETITIONS = 3
"""A control stops at its first repetition that goes wrong; it fails if none of this
many does. (Where a race goes wrong in fewer repetitions, its test allows more.)"""

PATIENT = ("--deadline_s", "600")
"""`exec`'s flags in the tests: each of 8 waiters waits for every command before it,
interpreter start-up included, and a loaded 2-core machine can take minutes for that.
(The default deadline is not what these tests are about.)"""

FRAMEWORKS = {
    "mlflow": "mlflow-skinny",
    "optuna": "optuna",
    "flask_migrate": "Flask-Migrate",
    "flask_sqlalchemy": "Flask-SQLAlchemy",
}


def require(*modules: str) -> None:
    """Skip the module when a framework is missing; under CI=true, fail instead."""
    missing = [FRAMEWORKS[name] for name in modules if importlib.util.find_spec(name) is None]
    if not missing:
        return
    reason = (f"not installed here: {', '.join(missing)} (`make test-frameworks` runs these "
              "tests in .venv-frameworks, with constraints/frameworks.txt)")
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI=true: the framework tests must run", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def environment(**extra: str) -> dict[str, str]:
    """This virtualenv's commands first on PATH; MLflow's usage reports off."""
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}",
               MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true",
               PYTHONDONTWRITEBYTECODE="1")
    env.pop("ALEMBIC_CONFIG", None)
    # MLflow turns on checks of its own test suite when it sees this (pytest sets it):
    # the frameworks run here as they do in production.
    env.pop("PYTEST_CURRENT_TEST", None)
    env.update(extra)
    return env


def scenario(*args: str | Path, timeout: float = 300) -> str:
    """Run scenario.py; its stdout. A failure shows its output."""
    result = subprocess.run(
        [sys.executable, str(SCENARIO), *map(str, args)], env=environment(),
        capture_output=True, text=True, timeout=timeout, check=False,
    )
    if result.returncode != 0:
        pytest.fail(f"scenario.py {' '.join(map(str, args))} exited {result.returncode}:\n"
                    f"{result.stdout}\n{result.stderr}")
    return result.stdout


# Workers ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Worker:
    """One racing process: its exit code, everything it printed, and what it saw."""

    exit_code: int | None
    log: str
    seen: dict[str, Any]

    @property
    def fresh(self) -> bool:
        """Inside its block, the database had no version row yet: it set it up."""
        return bool(self.seen.get("fresh"))


def race(framework: str, mode: str, db: Path, workers: int = WORKERS,
         *extra: str) -> list[Worker]:
    """``workers`` processes forked after the framework's import, released together,
    each running the framework's start-up on ``db`` (scenario.py's ``race``)."""
    out = db.parent / f"{db.stem}-{mode}-workers"
    return _forked(out, scenario("race", framework, mode, db, str(workers), out, *extra))


def fork_script(script: Path, preload: str, workers: int = WORKERS) -> list[Worker]:
    """``workers`` processes forked after ``preload``'s imports, released together, each
    running the Python file ``script`` in its folder (scenario.py's ``fork-script``)."""
    out = script.parent / f"{script.stem}-workers"
    return _forked(out, scenario("fork-script", script, str(workers), out, "--preload", preload))


def _forked(out: Path, printed: str) -> list[Worker]:
    codes = json.loads(printed.strip().splitlines()[-1])
    result = []
    for index, code in enumerate(codes):
        seen_file = out / f"{index}.json"
        seen = json.loads(seen_file.read_text()) if seen_file.exists() else {}
        result.append(Worker(code, (out / f"{index}.log").read_text(), seen))
    return result


@dataclass(frozen=True)
class Finished:
    exit_code: int
    log: str


def run_together(commands: list[list[str]], *, cwd: Path, env: dict[str, str],
                 preload: str = "", timeout_s: float = 300) -> list[Finished]:
    """Start every command behind scenario.py's gate, wait until each has started (and
    imported ``preload``), release them at one instant, and collect what each did.
    A command whose first word is a console script of this virtualenv, or a ``.py`` file
    in ``cwd``, runs in the gate's process (its imports happen before the start, as in
    scripts/gated.py); any other is executed after the start."""
    with tempfile.TemporaryDirectory(prefix="frameworks-gate-") as gate:
        ready_dir = Path(gate, "ready")
        ready_dir.mkdir()
        start = Path(gate, "start")
        logs = [Path(gate, f"{index}.log") for index in range(len(commands))]
        procs = []
        for command, log in zip(commands, logs, strict=True):
            script = cwd / command[0] if command[0].endswith(".py") else BIN / command[0]
            how = ["--script", str(script)] if _is_python_script(script) else []
            argv = [sys.executable, str(SCENARIO), "gate", str(ready_dir), str(start),
                    "--preload", preload, *how, "--", *(command[1:] if how else command)]
            with log.open("w") as output:
                procs.append(subprocess.Popen(argv, cwd=cwd, env=env, stdout=output,
                                              stderr=subprocess.STDOUT,
                                              stdin=subprocess.DEVNULL))
        try:
            deadline = time.monotonic() + timeout_s
            while len(os.listdir(ready_dir)) < len(procs):
                early = [(proc, log) for proc, log in zip(procs, logs, strict=True)
                         if proc.poll() is not None]
                if early:
                    proc, log = early[0]
                    pytest.fail(f"a command exited before the start:\n{log.read_text()}")
                if time.monotonic() > deadline:
                    pytest.fail("the commands were not ready in time")
                time.sleep(0.01)
            start.touch()
            finished = []
            for proc, log in zip(procs, logs, strict=True):
                code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
                finished.append(Finished(code, log.read_text()))
            return finished
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()


def _is_python_script(path: Path) -> bool:
    """A Python file: a console script pip wrote for this virtualenv, or a .py file."""
    if path.suffix == ".py":
        return path.is_file()
    try:
        with path.open("rb") as file:
            first = file.readline()
    except OSError:
        return False
    return first.startswith(b"#!") and b"python" in first


def failures(workers: list[Worker] | list[Finished]) -> list[str]:
    """The last lines of every worker that did not exit 0."""
    return [f"exit {worker.exit_code}: {worker.log.strip().splitlines()[-1:]}"
            for worker in workers if worker.exit_code != 0]


def count_lines(workers: list[Worker] | list[Finished], text: str) -> int:
    """How many workers printed ``text`` (in any line)."""
    return sum(text in worker.log for worker in workers)


# The database, as SQLite sees it -----------------------------------------------------------
@dataclass(frozen=True)
class Health:
    integrity: list[str]
    leftover_tables: list[str]
    """``_alembic_tmp_*`` tables: a batch migration that died halfway."""
    versions: list[str]

    def problems(self, heads: list[str]) -> list[str]:
        found = []
        if self.integrity != ["ok"]:
            found.append(f"PRAGMA integrity_check: {self.integrity}")
        if self.leftover_tables:
            found.append(f"left-over tables: {self.leftover_tables}")
        if sorted(self.versions) != sorted(heads):
            found.append(f"alembic_version {self.versions}, the scripts' heads {heads}")
        return found


def health(db: Path) -> Health:
    # Read-write (never creating the file): a process killed mid-write leaves a hot
    # journal that the next opener rolls back, and a read-only one could not.
    connection = sqlite3.connect(f"file:{db}?mode=rw", uri=True, timeout=60)
    try:
        integrity = [row[0] for row in connection.execute("PRAGMA integrity_check")]
        leftovers = [row[0] for row in connection.execute(
            r"SELECT name FROM sqlite_master WHERE name LIKE '\_alembic\_tmp\_%' ESCAPE '\'")]
        try:
            versions = [row[0] for row in
                        connection.execute("SELECT version_num FROM alembic_version")]
        except sqlite3.OperationalError:  # no such table
            versions = []
        return Health(integrity, leftovers, versions)
    finally:
        connection.close()


def assert_healthy(db: Path, heads: list[str]) -> None:
    assert health(db).problems(heads) == [], db


def check(framework: str, *dbs: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """The heads of the framework's migration scripts, and what the framework reports of
    each database when it opens it again (scenario.py's ``check``)."""
    facts = json.loads(scenario("check", framework, *dbs).strip().splitlines()[-1])
    return facts["heads"], facts["databases"]


class LockHolder:
    """A process inside ``with migration_lock(url):`` for as long as the ``with``
    statement lasts (scenario.py's ``hold``)."""

    def __init__(self, db: Path, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.held = folder / "held"
        self.release = folder / "release"
        self.proc = subprocess.Popen(
            [sys.executable, str(SCENARIO), "hold", str(db), str(self.held), str(self.release)],
            env=environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def __enter__(self) -> LockHolder:
        deadline = time.monotonic() + 120
        while not self.held.exists() and self.proc.poll() is None:
            if time.monotonic() > deadline:
                self.proc.kill()
                break
            time.sleep(0.02)
        if not self.held.exists():
            pytest.fail(f"the holder never held the lock:\n{self.proc.communicate()[0]}")
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release.touch()
        output = self.proc.communicate(timeout=120)[0]
        assert self.proc.returncode == 0, output


# Flask-Migrate ----------------------------------------------------------------------------
FLASK_APP_SOURCE = textwrap.dedent("""\
    import os

    from flask import Flask
    from flask_migrate import Migrate
    from flask_sqlalchemy import SQLAlchemy

    SCHEMA = int(os.environ.get("APP_SCHEMA", "3"))
    db = SQLAlchemy()


    class User(db.Model):
        id = db.Column(db.Integer, primary_key=True)
        name = db.Column(db.String(80), unique=True, nullable=False)
        if SCHEMA >= 2:
            email = db.Column(db.String(120), index=True)


    if SCHEMA >= 3:
        class Post(db.Model):
            id = db.Column(db.Integer, primary_key=True)
            user_id = db.Column(db.ForeignKey("user.id"), nullable=False, index=True)
            title = db.Column(db.String(200), nullable=False)


    def create_app():
        app = Flask(__name__)
        app.config["SQLALCHEMY_DATABASE_URI"] = os.environ["DATABASE_URL"]
        db.init_app(app)
        Migrate(app, db)
        return app
    """)
"""A Flask app with Flask-Migrate: APP_SCHEMA 1, 2 or 3 of its models (for `flask db
migrate` to find a change each time), DATABASE_URL its database."""

GENERATED = re.compile(r"Generating \S+/versions/(?P<rev>\w+)_\w+\.py")
"""The revision in `flask db migrate`'s output."""
