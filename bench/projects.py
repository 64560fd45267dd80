"""Throw-away Alembic projects: the demo chain, a long generated chain, a hand-off chain, a
long chain whose revision files import an application, MLflow's chain.

Each is a copy of the repository's alembic.ini and alembic/ folder. A "stock" project
gets Alembic's own env.py (the ``generic`` template of the installed Alembic, verbatim);
the others keep the repository's env.py, which calls ``alembic_sqlite_lock.run_migrations``.
"""

from __future__ import annotations

import importlib.util
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


def _write_revision(project: Project, rev: str, down: str | None, body: str, *,
                    header: str = "") -> None:
    """A revision file; ``header``: code between the imports and the identifiers."""
    upgrade = textwrap.indent(textwrap.dedent(body).strip(), "    ")
    (project.versions / f"{rev}_bench.py").write_text(
        f'"""bench revision {rev}"""\n'
        "import sqlalchemy as sa\n\nfrom alembic import op\n\n"
        + (f"{header}\n\n" if header else "")
        + f"revision = {rev!r}\ndown_revision = {down!r}\n"
        "branch_labels = None\ndepends_on = None\n\n\n"
        f"def upgrade() -> None:\n{upgrade}\n\n\n"
        "def downgrade() -> None:\n    pass\n"
    )


APP_PACKAGE = "benchapp"
"""The heavy chain's application package, beside alembic.ini; its revision files import
it, so the driver must never import it (see :func:`heavy_chain_project`)."""
HEAVY_MODELS = 40
"""ORM classes in ``benchapp.models``."""

# Standard-library modules a real app pulls in (mail, XML, money, addresses...) that
# neither the driver nor Alembic has loaded: importing them is part of the app's cost.
_APP_IMPORTS = (
    "csv", "decimal", "email.mime.multipart", "email.mime.text", "fractions",
    "html.parser", "http.cookies", "ipaddress", "json", "statistics", "uuid",
    "xml.dom.minidom", "xml.etree.ElementTree", "zoneinfo",
)


def heavy_chain_project(root: Path, *, stock: bool, length: int = 150) -> Project:
    """``length`` revisions r001, r002, ..., each creating one table, whose files all
    import the application's models (``benchapp.models``: :data:`HEAVY_MODELS` declarative
    classes with columns, indexes and relationships, and some standard-library modules),
    as real chains do: stock Alembic executes every revision file on every start, so
    every worker pays that import even with nothing to migrate.

    The package lives in the project folder; each revision file appends that folder to
    ``sys.path`` before importing it (env.py stays the light one of its kind).
    """
    project = demo_project(root, stock=stock)
    _write_app(root / APP_PACKAGE)
    _clear_versions(project)
    down = None
    for number in range(1, length + 1):
        rev = f"r{number:03d}"
        _write_revision(project, rev, down, f"""
            op.create_table(
                "t{number:03d}",
                sa.Column("id", sa.Integer, primary_key=True),
                sa.Column("name", sa.String(50), nullable=False),
                sa.Column("model", sa.String(50), nullable=False,
                          server_default=Model{number % HEAVY_MODELS:02d}.__tablename__),
            )
        """, header=_app_header(f"Model{number % HEAVY_MODELS:02d}"))
        down = rev
    return project


def _app_header(model: str) -> str:
    """A revision file's import of the application (the folder above alembic/, which
    ``prepend_sys_path = .`` does not name: that is relative to the current directory)."""
    return (
        "import os\nimport sys\n\n"
        "_APP_ROOT = os.path.dirname(os.path.dirname(os.path.dirname("
        "os.path.abspath(__file__))))\n"
        "if _APP_ROOT not in sys.path:\n    sys.path.append(_APP_ROOT)\n\n"
        f"from {APP_PACKAGE}.models import {model}  # noqa: E402\n"
    )


def _write_app(package: Path) -> None:
    """``benchapp``: an empty ``__init__`` and ``models`` (see :func:`heavy_chain_project`)."""
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text('"""The heavy chain\'s application."""\n')
    lines = [
        '"""The application\'s models, generated by bench/projects.py."""',
        "",
        *(f"import {module}  # noqa: F401" for module in _APP_IMPORTS),
        "from datetime import datetime",
        "from decimal import Decimal",
        "",
        "import sqlalchemy as sa",
        "from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship",
        "",
        "",
        "class Base(DeclarativeBase):",
        "    pass",
    ]
    for number in range(HEAVY_MODELS):
        name, parent = f"Model{number:02d}", f"Model{number - 1:02d}"
        lines += [
            "", "",
            f"class {name}(Base):",
            f'    __tablename__ = "app_model{number:02d}"',
            f'    __table_args__ = (sa.Index("ix_model{number:02d}_created", "created_at"),)',
            "",
            "    id: Mapped[int] = mapped_column(primary_key=True)",
            "    slug: Mapped[str] = mapped_column(sa.String(120), unique=True)",
            "    title: Mapped[str | None] = mapped_column(sa.String(200))",
            "    amount: Mapped[Decimal] = mapped_column(sa.Numeric(12, 2), default=0)",
            "    created_at: Mapped[datetime] = mapped_column("
            "server_default=sa.func.current_timestamp())",
        ]
        if number:
            lines += [
                f'    parent_id: Mapped[int | None] = mapped_column(sa.ForeignKey('
                f'"app_model{number - 1:02d}.id"))',
                f'    parent: Mapped["{parent} | None"] = relationship(back_populates="children")',
            ]
        if number < HEAVY_MODELS - 1:
            lines.append(f'    children: Mapped[list["Model{number + 1:02d}"]] = '
                         'relationship(back_populates="parent")')
    (package / "models.py").write_text("\n".join(lines) + "\n")


def mlflow_versions() -> Path | None:
    """mlflow-skinny's revision folder (its tracking store's chain), found without
    importing mlflow; None when it is not installed."""
    spec = importlib.util.find_spec("mlflow")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        versions = Path(location) / "store" / "db_migrations" / "versions"
        if versions.is_dir():
            return versions
    return None


def mlflow_project(root: Path, *, stock: bool, versions: Path) -> Project:
    """The demo project with MLflow's revision files (``versions``) as its chain."""
    project = demo_project(root, stock=stock)
    _clear_versions(project)
    for path in versions.glob("*.py"):
        if not path.name.startswith("_"):
            shutil.copyfile(path, project.versions / path.name)
    return project
