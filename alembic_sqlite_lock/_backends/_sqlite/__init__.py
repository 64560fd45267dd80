"""SQLite: its own write lock (BEGIN IMMEDIATE), and the files it keeps beside the database.

``_backend`` holds the connections and the lock; the rest are the files beside the
database, each created and read through ``_sidefile``: the run lock (``_runlock``), the
holder record (``_holder``), backups (``_backup``), what the holder does with them during
a run (``_sidecar``), and what a failure on the file means (``_diagnose``).
"""

from __future__ import annotations

from collections.abc import Mapping

from sqlalchemy.engine import Connection

from .._base import Backend, RunOptions
from ._backend import HandedIn, OwnEngine

__all__ = ["HandedIn", "OwnEngine", "open_backend"]


def open_backend(
    section: Mapping[str, str] | None, handed_in: Connection | None, options: RunOptions
) -> Backend:
    """This package's entry in the registry (``_backends.BACKENDS``)."""
    if handed_in is not None:
        return HandedIn(handed_in, options.policy)
    assert section is not None
    return OwnEngine(section, options.policy)
