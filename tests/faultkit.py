"""Helpers for the fault tests: real processes, observable facts about files on disk."""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ALEMBIC = str(Path(sys.executable).with_name("alembic"))


def snapshot(directory: Path) -> dict[str, str]:
    """Every file directly in ``directory`` with a hash of its bytes."""
    return {
        entry.name: hashlib.sha256(entry.read_bytes()).hexdigest() if entry.is_file() else "dir"
        for entry in sorted(directory.iterdir())
    }


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.02)


def integrity(db: Path) -> str:
    conn = sqlite3.connect(db)
    try:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        conn.close()


def schema(db: Path) -> list[tuple[object, ...]]:
    """The schema as SQLite stores it (the version row is data, not schema)."""
    conn = sqlite3.connect(db)
    try:
        return conn.execute(
            "SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name"
        ).fetchall()
    finally:
        conn.close()


def start_cli(ini: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """The real `alembic` console script in its own process (not waited for)."""
    return subprocess.Popen(
        [ALEMBIC, "-c", str(ini), *args],
        cwd=ini.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def has_open(pid: int, path: Path) -> bool:
    """True when process ``pid`` has ``path`` open (Linux /proc)."""
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        return any(os.readlink(fd_dir / fd) == str(path) for fd in os.listdir(fd_dir))
    except (FileNotFoundError, ProcessLookupError):
        return False


def kill(proc: subprocess.Popen[str], sig: int = signal.SIGKILL) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)


HANGING_REVISION = '''
import os, pathlib, time
# Some DDL and data first, so that the kill lands after real work of the run.
op.create_table("t9", sa.Column("id", sa.Integer, primary_key=True))
op.execute("INSERT INTO t9 (id) VALUES (1)")
markers = pathlib.Path({markers!r})
(markers / f"0009.{{os.getpid()}}").touch()
if not (markers / "go").exists():
    time.sleep(600)
'''


def hanging_revision(markers: Path) -> str:
    """Body of a revision that does DDL, says so with a marker file, then hangs until
    ``markers/go`` exists (a process that starts it after that runs straight through)."""
    return HANGING_REVISION.format(markers=str(markers))


def markers_of(markers: Path, rev: str) -> list[int]:
    return [int(p.name.split(".")[1]) for p in markers.glob(f"{rev}.*")]
