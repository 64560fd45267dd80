"""``alembic-sqlite-lock upgrade`` at head answers without importing Alembic or
SQLAlchemy, and only when nothing could make that answer wrong: every other case runs
the full command (observed here by whether ``alembic`` was imported, and by what the
database looks like after)."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import Project

import alembic_sqlite_lock
from alembic_sqlite_lock._cli import _athead

OURS_CLI = Path(sys.executable).with_name("alembic-sqlite-lock")

# Runs the command line's main() in a new process, started as the console script is
# (which imports the package's API lazily), and reports its exit code and whether
# Alembic and SQLAlchemy were imported.
_PROBE = textwrap.dedent("""
    import json, sys
    sys.argv[0] = "/venv/bin/alembic-sqlite-lock"  # as the console script starts
    from alembic_sqlite_lock._cli import main
    code = main(sys.argv[1:])
    print(json.dumps([code, "alembic" in sys.modules, "sqlalchemy" in sys.modules]))
""")


def probe(project: Project, *args: str, cwd: Path | None = None) -> tuple[int, bool, str]:
    """(exit code, Alembic imported, stderr) of ``alembic-sqlite-lock -c INI ARGS``."""
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, "-c", str(project.ini), *args],
        cwd=cwd or project.root, capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.stdout.strip(), done.stderr
    code, alembic, sqlalchemy = json.loads(done.stdout.strip().splitlines()[-1])
    assert alembic == sqlalchemy or alembic  # SQLAlchemy never without Alembic here
    return code, alembic, done.stderr


@pytest.fixture
def at_head(project: Project) -> Project:
    """The demo project migrated to head; the run wrote the revision cache."""
    assert len(alembic_sqlite_lock.upgrade(project.ini)) == 8
    return project


def test_at_head_nothing_heavy_is_imported(at_head: Project) -> None:
    for args in (["upgrade"], ["upgrade", "head"], ["upgrade", "heads"], ["upgrade", "0008"]):
        code, imported, stderr = probe(at_head, *args)
        assert (code, imported) == (0, False), stderr
        assert "Database already at 0008, nothing to do" in stderr


def test_the_line_is_the_full_commands(at_head: Project) -> None:
    """The same line, formatted by alembic.ini's logging as env.py would have it."""
    fast = subprocess.run([str(OURS_CLI), "-c", str(at_head.ini), "upgrade"],
                          capture_output=True, text=True, check=True).stderr
    full = subprocess.run([str(OURS_CLI), "-c", str(at_head.ini), "upgrade", "-x", "a=b"],
                          capture_output=True, text=True, check=True).stderr

    def ours(text: str) -> list[str]:
        return [re.sub(r"pid \d+", "pid N", line) for line in text.splitlines()
                if "already at" in line]

    assert ours(fast) == ours(full) == ["INFO  [pid N] Database already at 0008, nothing to do"]


def test_control_without_the_cache_alembic_is_imported(at_head: Project) -> None:
    for path in at_head.versions.parent.glob("__pycache__/alembic_sqlite_lock.*.json"):
        path.unlink()
    code, imported, _ = probe(at_head, "upgrade")
    assert (code, imported) == (0, True)
    code, imported, _ = probe(at_head, "upgrade")  # the full run wrote it again
    assert (code, imported) == (0, False)


def test_below_head_the_full_command_migrates(at_head: Project) -> None:
    alembic_sqlite_lock.downgrade(at_head.ini, "0007")
    code, imported, stderr = probe(at_head, "upgrade")
    assert (code, imported) == (0, True), stderr
    assert at_head.version() == ["0008"]


def test_a_new_revision_is_applied(at_head: Project) -> None:
    at_head.add_revision("0009", "0008", 'op.create_table("t9", sa.Column("id", sa.Integer))')
    code, imported, stderr = probe(at_head, "upgrade")
    assert (code, imported) == (0, True), stderr
    assert at_head.version() == ["0009"]


def test_an_env_py_that_picks_another_database_is_run(at_head: Project) -> None:
    """env.py may point the run elsewhere: only running it can tell. alembic.ini's own
    database is at head, so answering from it would be wrong."""
    other = at_head.root / "other.db"
    text = at_head.env_py.read_text()
    at_head.env_py.write_text(text.replace(
        "run_migrations(context, target_metadata)",
        f'config.set_main_option("sqlalchemy.url", "sqlite:///{other}")\n'
        "run_migrations(context, target_metadata)"))
    code, imported, stderr = probe(at_head, "upgrade")
    assert (code, imported) == (0, True), stderr
    with sqlite3.connect(other) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [
            ("0008",)]


@pytest.mark.parametrize("edit", [
    'run_migrations(context, target_metadata, version_table="other_version")',
    "import os\nif os.environ.get('X'):\n    pass\nrun_migrations(context, target_metadata)",
    "def f():\n    pass\nrun_migrations(context, target_metadata)",
    "target_metadata = make_metadata()\nrun_migrations(context, target_metadata)",
    "run_migrations(context, target_metadata)\nrun_migrations(context, target_metadata)",
])
def test_env_py_doing_anything_else_is_run(at_head: Project, edit: str) -> None:
    text = at_head.env_py.read_text()
    at_head.env_py.write_text(text.replace("run_migrations(context, target_metadata)", edit))
    assert _athead._one_call_env(str(at_head.env_py)) is None


def test_the_repositorys_and_inits_env_py_are_the_one_call_form(at_head: Project) -> None:
    template = Path(alembic_sqlite_lock.__file__).parent / "_cli" / "templates" / "env.py"
    assert _athead._one_call_env(str(template)) is True
    assert _athead._one_call_env(str(at_head.env_py)) is True


@pytest.mark.parametrize("args", [
    ["upgrade", "-x", "a=b"],
    ["upgrade", "--deadline_s", "60"],
    ["upgrade", "+0"],  # relative: Alembic's (it refuses +0: exit 2)
    ["upgrade", "0005"],  # below the database: Alembic's walk
    ["upgrade", "--sql", "0007:0008"],
])
def test_other_command_lines_run_the_full_command(at_head: Project, args: list[str]) -> None:
    _code, imported, _ = probe(at_head, *args)
    assert imported


def test_a_bad_setting_still_fails_at_head(at_head: Project) -> None:
    text = at_head.ini.read_text()
    at_head.ini.write_text(text.replace("[alembic_sqlite_lock]\n",
                                        "[alembic_sqlite_lock]\ndeadline_s = abc\n"))
    code, imported, stderr = probe(at_head, "upgrade")
    assert (code, imported) == (2, True)
    assert "deadline_s" in stderr


def test_settings_that_move_the_revisions_run_the_full_command(at_head: Project) -> None:
    text = at_head.ini.read_text()
    at_head.ini.write_text(text.replace(
        "[alembic]\n", f"[alembic]\nversion_locations = {at_head.versions}\n", 1))
    assert probe(at_head, "upgrade")[:2] == (0, True)


def test_pyproject_with_alembic_tables_runs_the_full_command(at_head: Project) -> None:
    (at_head.root / "pyproject.toml").write_text("[tool.alembic_sqlite_lock]\ndeadline_s = 60\n")
    assert probe(at_head, "upgrade")[:2] == (0, True)
    (at_head.root / "pyproject.toml").write_text("[project]\nname = 'app'\n")
    assert probe(at_head, "upgrade")[:2] == (0, False)


def test_revision_cache_off_runs_the_full_command(at_head: Project) -> None:
    text = at_head.ini.read_text()
    at_head.ini.write_text(text.replace("[alembic_sqlite_lock]\n",
                                        "[alembic_sqlite_lock]\nrevision_cache = off\n"))
    assert probe(at_head, "upgrade")[:2] == (0, True)


def test_a_fifo_at_the_database_path_is_not_opened(tmp_path: Path) -> None:
    fifo = tmp_path / "app.db"
    os.mkfifo(fifo)
    assert _athead._versions(str(fifo)) is None  # returns at once: never opened


def test_a_database_in_a_write_is_left_to_the_full_command(at_head: Project) -> None:
    conn = sqlite3.connect(at_head.db, isolation_level=None)
    try:
        conn.execute("BEGIN EXCLUSIVE")
        assert _athead._versions(str(at_head.db)) is None  # no wait: the full command's
    finally:
        conn.close()
