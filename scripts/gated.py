"""Start a console script at the same instant as its siblings.

    python scripts/gated.py READY_DIR START_FILE -- alembic -c alembic.ini upgrade head

Imports everything the command needs first, writes READY_DIR/<pid>, waits for
START_FILE to exist, then runs the installed console script (the very file pip
generated for `alembic`) in this process. Interpreter start-up therefore happens
before the start signal, and N workers really do overlap.
"""

from __future__ import annotations

import os
import runpy
import shutil
import sys
import time

# The work the command will do; imported before the start signal, not after.
import alembic.command
import alembic.config
import sqlalchemy.dialects.sqlite

import alembic_sqlite_lock

_PRELOADED = (alembic.command, alembic.config, sqlalchemy.dialects.sqlite, alembic_sqlite_lock)


def main(argv: list[str]) -> None:
    ready_dir, start_file, separator, program, *args = argv
    assert separator == "--", "usage: gated.py READY_DIR START_FILE -- PROGRAM [ARGS...]"
    script = shutil.which(program, path=os.path.dirname(sys.executable)) or shutil.which(program)
    if script is None:
        sys.exit(f"gated.py: no console script named {program!r}")
    with open(os.path.join(ready_dir, str(os.getpid())), "w"):
        pass
    while not os.path.exists(start_file):
        time.sleep(0.0005)
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
