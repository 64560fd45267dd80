"""The machine and versions a run was measured on."""

from __future__ import annotations

import os
import platform
import sqlite3
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from scripts.workers import REPO


def describe(tmp: Path) -> list[tuple[str, str]]:
    return [
        ("CPU", f"{_cpu_model()}, {os.cpu_count()} logical CPUs "
                f"({len(os.sched_getaffinity(0))} usable)"),
        ("OS", f"{platform.system()} {platform.release()} ({platform.machine()})"),
        ("Python", f"{platform.python_implementation()} {sys.version.split()[0]}"),
        ("SQLite", sqlite3.sqlite_version),
        ("Alembic", metadata.version("alembic")),
        ("SQLAlchemy", metadata.version("sqlalchemy")),
        ("filelock", metadata.version("filelock")),
        ("mlflow-skinny (its chain)", _version_of("mlflow-skinny")),
        ("alembic-sqlite-lock", f"{metadata.version('alembic-sqlite-lock')} "
                                f"(git {_git_revision()})"),
        ("Database files", f"under {tmp.parent} ({_filesystem(tmp)})"),
        ("Bytecode", "workers use and write .pyc files (PYTHONDONTWRITEBYTECODE is ignored)"),
        ("Load average at start", " ".join(f"{x:.2f}" for x in os.getloadavg())),
    ]


def _version_of(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "alembic_sqlite_lock"],
                               cwd=REPO, capture_output=True, text=True,
                               check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{rev}, package modified" if dirty else rev


def _filesystem(path: Path) -> str:
    """The type of the filesystem holding ``path`` (fsync cost depends on it)."""
    best, kind = "", "unknown filesystem"
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return kind
    resolved = str(path.resolve())
    for line in mounts:
        fields = line.split()
        if len(fields) >= 3 and resolved.startswith(fields[1]) and len(fields[1]) > len(best):
            best, kind = fields[1], fields[2]
    return kind
