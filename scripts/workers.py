"""Helpers shared by the demo, the tests and the benchmark: a throw-away copy of the demo
Alembic project, and N real processes (new interpreters) released at one instant.

The benchmark releases workers forked after the imports instead (bench/forked.py), to
time the migration without interpreter start-up; it makes its projects here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GATE = REPO / "scripts" / "gated.py"


@dataclass
class Project:
    """Where a copy of the demo environment keeps its files."""

    root: Path

    @property
    def ini(self) -> Path:
        return self.root / "alembic.ini"

    @property
    def db(self) -> Path:
        return self.root / "app.db"

    @property
    def env_py(self) -> Path:
        return self.root / "alembic" / "env.py"

    @property
    def versions(self) -> Path:
        return self.root / "alembic" / "versions"


def make_project(root: Path, *, ini_text: str | None = None) -> Path:
    """Copy the demo environment (alembic.ini, env.py, versions/) into ``root``.

    The ini uses %(here)s, so the copy migrates ``root/app.db``. Returns the ini path.
    """
    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(
        REPO / "alembic",
        root / "alembic",
        ignore=shutil.ignore_patterns("__pycache__"),
        dirs_exist_ok=True,
    )
    ini = root / "alembic.ini"
    ini.write_text(ini_text if ini_text is not None else (REPO / "alembic.ini").read_text())
    return ini


@dataclass
class Finished:
    pid: int
    returncode: int
    stdout: str
    stderr: str


def run_together(
    commands: list[list[str]],
    *,
    cwd: Path,
    timeout_s: float = 120,
    env: dict[str, str] | None = None,
) -> list[Finished]:
    """Start every command (a console script and its arguments), wait until all are
    imported and ready, release them at once, and collect what each did."""
    with tempfile.TemporaryDirectory(prefix="gate-") as gate:
        ready_dir = Path(gate, "ready")
        ready_dir.mkdir()
        start_file = Path(gate, "start")
        procs = [
            subprocess.Popen(
                [sys.executable, str(GATE), str(ready_dir), str(start_file), "--", *command],
                cwd=cwd,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for command in commands
        ]
        try:
            deadline = time.monotonic() + timeout_s
            while len(os.listdir(ready_dir)) < len(procs):
                early = [p for p in procs if p.poll() is not None]
                if early:
                    out, err = early[0].communicate()
                    raise RuntimeError(f"a worker exited before the start signal:\n{err}")
                if time.monotonic() > deadline:
                    raise TimeoutError("workers were not ready in time")
                time.sleep(0.01)
            start_file.touch()
            finished = []
            for proc in procs:
                out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
                finished.append(Finished(proc.pid, proc.returncode, out, err))
            return finished
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
