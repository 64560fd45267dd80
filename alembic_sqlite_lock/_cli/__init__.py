"""The ``alembic-sqlite-lock`` command line: a thin layer over the Python API.

``_main`` parses the command line and maps errors to exit codes, ``_status`` and
``_inspect`` are ``status`` and ``current``, ``_init`` writes a new project from the
files in ``templates/``.
"""

from __future__ import annotations

from ._main import main

__all__ = ["main"]
