"""Throw-away Alembic projects: the demo chain, a long generated chain, a hand-off chain.

Each is a copy of the repository's alembic.ini and alembic/ folder. A "stock" project
gets Alembic's own env.py (the ``generic`` template of the installed Alembic, verbatim);
the others keep the repository's env.py, which calls ``alembic_sqlite_lock.run_migrations``.
"""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import alembic
from scripts.workers import Project as DemoProject
from scripts.workers import make_project

STOCK_ENV_PY = Path(alembic.__file__).parent / "templates" / "generic" / "env.py"
HEAD = "0008"
"""The demo chain's head."""

HANDOFF_DIR_ENV = "BENCH_HANDOFF_DIR"
"""Environment variable naming where the hand-off revisions leave their timestamps."""
HANDOFF_HOLD_S = 0.2
"""How long the hand-off holder's revision keeps the lock."""


class Project(DemoProject):
    def reset(self) -> None:
        """Remove the database and every lock file beside it: the next run is cold."""
        for suffix in ("", "-journal", "-wal", "-shm", ".migration-lock", ".lock"):
            Path(f"{self.db}{suffix}").unlink(missing_ok=True)


def demo_project(root: Path, *, stock: bool) -> Project:
    """A copy of the demo project (revisions 0001-0008)."""
    make_project(root)
    project = Project(root)
    if stock:
        shutil.copy(STOCK_ENV_PY, project.env_py)
    return project


def chain_project(root: Path, *, stock: bool, length: int) -> Project:
    """``length`` trivial revisions r001, r002, ...: each creates one table."""
    project = demo_project(root, stock=stock)
    _clear_versions(project)
    down = None
    for number in range(1, length + 1):
        rev = f"r{number:03d}"
        _write_revision(project, rev, down, f"""
            op.create_table(
                "t{number:03d}",
                sa.Column("id", sa.Integer, primary_key=True),
                sa.Column("name", sa.String(50), nullable=False),
            )
        """)
        down = rev
    return project


def handoff_project(root: Path, *, stock: bool) -> Project:
    """Two revisions for the hand-off: ``a`` holds the lock, ``b`` stamps its start.

    ``a`` creates ``held`` in $BENCH_HANDOFF_DIR (so the driver knows the lock is taken)
    and sleeps; ``b`` writes the monotonic time it started into ``b_started``.
    """
    project = demo_project(root, stock=stock)
    _clear_versions(project)
    _write_revision(project, "a", None, f"""
        import os, time
        open(os.path.join(os.environ["{HANDOFF_DIR_ENV}"], "held"), "w").close()
        op.create_table("held_by_a", sa.Column("id", sa.Integer, primary_key=True))
        time.sleep({HANDOFF_HOLD_S})
    """)
    _write_revision(project, "b", "a", _B_BODY)
    return project


_B_BODY = f"""
    import os, time
    started = time.monotonic()
    with open(os.path.join(os.environ["{HANDOFF_DIR_ENV}"], "b_started"), "w") as f:
        f.write(repr(started))
    op.create_table("run_by_b", sa.Column("id", sa.Integer, primary_key=True))
"""


def handoff_solo_project(root: Path, *, stock: bool) -> Project:
    """Revision ``b`` of the hand-off chain alone, for one worker on a fresh file: what a
    worker spends from taking the lock to its first revision running, with no hand-off."""
    project = demo_project(root, stock=stock)
    _clear_versions(project)
    _write_revision(project, "b", None, _B_BODY)
    return project


def _clear_versions(project: Project) -> None:
    for path in project.versions.glob("*.py"):
        path.unlink()


def _write_revision(project: Project, rev: str, down: str | None, body: str) -> None:
    upgrade = textwrap.indent(textwrap.dedent(body).strip(), "    ")
    (project.versions / f"{rev}_bench.py").write_text(
        f'"""bench revision {rev}"""\n'
        "import sqlalchemy as sa\n\nfrom alembic import op\n\n"
        f"revision = {rev!r}\ndown_revision = {down!r}\n"
        "branch_labels = None\ndepends_on = None\n\n\n"
        f"def upgrade() -> None:\n{upgrade}\n\n\n"
        "def downgrade() -> None:\n    pass\n"
    )
