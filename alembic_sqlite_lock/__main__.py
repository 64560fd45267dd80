"""``python -m alembic_sqlite_lock``: the same as the ``alembic-sqlite-lock`` command."""

from ._cli import main

if __name__ == "__main__":
    raise SystemExit(main())
