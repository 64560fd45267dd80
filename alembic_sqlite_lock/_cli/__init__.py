"""The ``alembic-sqlite-lock`` command line: a thin layer over the Python API.

``_athead`` answers ``upgrade`` at head without importing Alembic when it can; ``_main``
parses the command line and maps errors to exit codes, ``_status`` and ``_inspect`` are
``status`` and ``current``, ``_init`` writes a new project from the files in
``templates/``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: ``upgrade`` at head answered from the revision cache when it
    can (no Alembic, no SQLAlchemy imported), everything else by ``_main``."""
    from ._athead import answer

    args = sys.argv[1:] if argv is None else argv
    done = answer(args)
    if done is not None:
        return done
    from ._main import main as full

    return full(argv)
