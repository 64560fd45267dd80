"""SQLite: its own write lock (BEGIN IMMEDIATE), and the files it keeps beside the database.

``_backend`` holds the connections and the lock; the rest are the files beside the
database, each created and read through ``_sidefile``: the run lock (``_runlock``), the
holder record (``_holder``), backups (``_backup``), what the holder does with them during
a run (``_sidecar``), and what a failure on the file means (``_diagnose``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Connection

from .._base import Backend, FilesBeside, RunOptions
from . import _backend, _backup, _holder, _runlock
from ._backend import HandedIn, OwnEngine

__all__ = [
    "HandedIn",
    "OwnEngine",
    "database_file",
    "database_path",
    "files_beside",
    "missing_database",
    "open_backend",
]


def open_backend(
    section: Mapping[str, str] | None, handed_in: Connection | None, options: RunOptions
) -> Backend:
    """This package's entry in the registry (``_backends.BACKENDS``)."""
    if handed_in is not None:
        return HandedIn(handed_in, options.policy)
    assert section is not None
    return OwnEngine(section, options.policy)


# What the command line asks (through ``_backends``), the SQLite way -------------------
def missing_database(url: str) -> str | None:
    """The path of a plain sqlite file URL whose file does not exist (a look must not
    create it), else None."""
    return _backend.missing_database_file(url)


def database_path(url: str) -> str | None:
    """The absolute path of a plain sqlite file URL, whether the file exists or not."""
    return _backend.plain_database_file(url)


def database_file(connection: Connection) -> str:
    """The main database's file as SQLite resolved it ("" for in-memory)."""
    return _backend.database_path(connection)


@dataclass(frozen=True)
class _HolderShown:
    record: _holder.Holder

    @property
    def since(self) -> float:
        return self.record.since

    def as_dict(self) -> dict[str, Any]:
        return self.record.as_dict()

    def describe(self) -> str:
        return _holder.describe(self.record)


def files_beside(database_path: str, backup_dir_setting: str) -> FilesBeside:
    """The run lock (is a migration running?), the holder record and the backups beside
    ``database_path``. Read-only: creates nothing, never waits, never opens the database
    file itself (closing a descriptor of it would drop SQLite's locks in this process)."""
    record_path = _holder.record_path_for(database_path)
    holder = _holder.read(record_path) if record_path else None
    backup_dir = _backup.backup_directory(backup_dir_setting, database_path)
    lock_path = _runlock.lock_path_for(database_path)
    running = _runlock.run_lock_held(lock_path)
    return FilesBeside(
        migration_running=running,
        lock_problem=None if running is not None else _runlock.run_lock_problem(lock_path),
        holder=None if holder is None else _HolderShown(holder),
        holder_stale=holder is not None and _holder.is_stale(holder),
        backup_dir=backup_dir,
        backups=_backup.listing(backup_dir, database_path),
        backup_folder_problem=_backup.folder_problem(backup_dir, database_path),
    )
