"""Alembic's other templates, in their documented one-call forms, with 4 workers at once.

Each test starts from what ``alembic init -t <template>`` writes today (the installed
Alembic's own files), changes env.py the way docs/reference.md says, and releases four
real ``alembic upgrade head`` processes at one instant: each revision applied once.
"""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import run_together
from sqlalchemy.pool import NullPool

import alembic

ALEMBIC = str(Path(sys.executable).with_name("alembic"))
WORKERS = 4

# Three revisions; the second inserts a row, once if the run is serialized.
REVISIONS = {
    "0001": 'op.create_table("items", sa.Column("id", sa.Integer, primary_key=True))',
    "0002": 'op.execute("INSERT INTO items (id) VALUES (1)")',
    "0003": 'op.add_column("items", sa.Column("name", sa.String(20)))',
}

ONE_CALL = ("from alembic_sqlite_lock import run_migrations\n\n"
            "run_migrations(context, target_metadata)\n")


def alembic_init(root: Path, template: str) -> subprocess.CompletedProcess[str]:
    root.mkdir(parents=True, exist_ok=True)
    return subprocess.run([ALEMBIC, "init", "-t", template, "migrations"], cwd=root,
                          capture_output=True, text=True, timeout=60, check=True)


def one_call(env_py: Path) -> None:
    """The documented change: everything from the first ``def run_migrations_...`` on is
    replaced by the one call; the imports, the config and target_metadata stay."""
    text = env_py.read_text()
    start = re.search(r"^(async )?def (run_migrations|run_async_migrations|do_run)", text,
                      re.MULTILINE)
    assert start is not None, text
    env_py.write_text(text[: start.start()] + ONE_CALL)


def set_url(ini: Path, url: str) -> None:
    text = ini.read_text()
    ini.write_text(re.sub(r"^sqlalchemy\.url = .*$", f"sqlalchemy.url = {url}", text,
                          flags=re.MULTILINE))


def write_revisions(versions: Path, engine_names: list[str] | None = None) -> None:
    versions.mkdir(exist_ok=True)
    down = None
    for rev, body in REVISIONS.items():
        if engine_names is None:
            functions = f"def upgrade():\n    {body}\n\n\ndef downgrade():\n    pass\n"
        else:  # the multidb template's revisions: one upgrade_<name>() per database
            functions = "def upgrade(engine_name):\n    globals()[f'upgrade_{engine_name}']()\n\n\n"
            functions += "def downgrade(engine_name):\n    pass\n\n\n"
            for name in engine_names:
                functions += f"def upgrade_{name}():\n    {body}\n\n\n"
        (versions / f"{rev}_r.py").write_text(
            "import sqlalchemy as sa\nfrom alembic import op\n\n"
            f"revision = {rev!r}\ndown_revision = {down!r}\n"
            "branch_labels = None\ndepends_on = None\n\n\n" + functions
        )
        down = rev


def upgrade_together(root: Path, databases: int = 1) -> None:
    """WORKERS `alembic upgrade head` at one instant: all succeed, and Alembic's own
    "Running upgrade" lines show each revision run once per database, in all."""
    finished = run_together([["alembic", "upgrade", "head"]] * WORKERS, cwd=root)
    for worker in finished:
        assert worker.returncode == 0, worker.stdout + worker.stderr
    ran = [line for worker in finished
           for line in re.findall(r"Running upgrade .*", worker.stderr)]
    assert len(ran) == len(REVISIONS) * databases, ran


def assert_migrated_once(db: Path) -> None:
    connection = sqlite3.connect(db)
    try:
        assert connection.execute("SELECT version_num FROM alembic_version").fetchall() == [
            ("0003",)]
        assert connection.execute("SELECT id, name FROM items").fetchall() == [(1, None)]
        assert connection.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert connection.execute(
            "SELECT count(*) FROM sqlite_master WHERE name LIKE '_alembic_tmp_%'"
        ).fetchall() == [(0,)]
    finally:
        connection.close()


def test_the_async_template_in_the_one_call_form(tmp_path: Path) -> None:
    """An async app's URL (sqlite+aiosqlite://) and env.py: the run goes through
    pysqlite on the same file, under the same lock (aiosqlite need not be installed)."""
    alembic_init(tmp_path, "async")
    one_call(tmp_path / "migrations" / "env.py")
    set_url(tmp_path / "alembic.ini", f"sqlite+aiosqlite:///{tmp_path / 'app.db'}")
    write_revisions(tmp_path / "migrations" / "versions")
    upgrade_together(tmp_path)
    assert_migrated_once(tmp_path / "app.db")


MULTIDB_LOCKS = r'''
from contextlib import ExitStack

from alembic_sqlite_lock import migration_lock

if context.is_offline_mode():
    run_migrations_offline()
else:
    # The migration lock of every database, always in the same order (no deadlock).
    with ExitStack() as locks:
        for name in sorted(re.split(r",\s*", db_names)):
            url = context.config.get_section_option(name, "sqlalchemy.url")
            locks.enter_context(migration_lock(url))
        run_migrations_online()
'''


def multidb_project(root: Path) -> None:
    """`alembic init -t multidb`, its two databases two files, the revisions."""
    alembic_init(root, "multidb")
    ini = root / "alembic.ini"
    text = ini.read_text()
    for name, file in (("engine1", "one.db"), ("engine2", "two.db")):
        text = re.sub(rf"^\[{name}\]\nsqlalchemy\.url = .*$",
                      f"[{name}]\nsqlalchemy.url = sqlite:///{root / file}", text,
                      flags=re.MULTILINE)
    ini.write_text(text)
    write_revisions(root / "migrations" / "versions", ["engine1", "engine2"])


def test_the_multidb_template_with_a_migration_lock_per_database(tmp_path: Path) -> None:
    multidb_project(tmp_path)
    env = tmp_path / "migrations" / "env.py"
    text = env.read_text()
    tail = text.index("if context.is_offline_mode():")
    env.write_text(text[:tail] + MULTIDB_LOCKS)
    upgrade_together(tmp_path, databases=2)
    assert_migrated_once(tmp_path / "one.db")
    assert_migrated_once(tmp_path / "two.db")


def alembic_version() -> tuple[int, ...]:
    return tuple(int(part) for part in alembic.__version__.split(".")[:2])


@pytest.mark.skipif(alembic_version() < (1, 16), reason="the pyproject template: Alembic 1.16+")
def test_the_pyproject_template_and_its_tool_table_of_settings(tmp_path: Path) -> None:
    alembic_init(tmp_path, "pyproject")
    one_call(tmp_path / "migrations" / "env.py")
    set_url(tmp_path / "alembic.ini", f"sqlite:///{tmp_path / 'app.db'}")
    write_revisions(tmp_path / "migrations" / "versions")
    pyproject = tmp_path / "pyproject.toml"
    # The settings are read from there: a bad one fails, naming the file.
    pyproject.write_text(pyproject.read_text() + "\n[tool.alembic_sqlite_lock]\n"
                         "deadline_s = -5\n")
    bad = subprocess.run([ALEMBIC, "upgrade", "head"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60, check=False)
    assert bad.returncode != 0
    assert f"[tool.alembic_sqlite_lock] in {pyproject}" in bad.stdout, bad.stdout
    assert not (tmp_path / "app.db").exists()  # refused before the first connection
    pyproject.write_text(pyproject.read_text().replace("deadline_s = -5", "deadline_s = 90"))
    upgrade_together(tmp_path)
    assert_migrated_once(tmp_path / "app.db")
    # And our command line reads the same file.
    ours = subprocess.run(
        [str(Path(sys.executable).with_name("alembic-sqlite-lock")), "status", "--json"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False)
    assert ours.returncode == 0, ours.stderr
    assert json.loads(ours.stdout)["current"] == ["0003"]


def test_control_the_stock_multidb_template_goes_wrong(tmp_path: Path) -> None:
    """The same four workers on the template as Alembic writes it: no lock, and the
    race shows (a worker fails, or a revision runs more than once)."""
    multidb_project(tmp_path)
    finished = run_together([["alembic", "upgrade", "head"]] * WORKERS, cwd=tmp_path)
    ran = [line for worker in finished
           for line in re.findall(r"Running upgrade .*", worker.stderr)]
    failed = [worker for worker in finished if worker.returncode != 0]
    assert failed or len(ran) > len(REVISIONS) * 2


# `alembic-sqlite-lock init --async`: the async template's env.py, written by us ----------

CLI = str(Path(sys.executable).with_name("alembic-sqlite-lock"))


def init_async(root: Path, *url: str) -> None:
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run([CLI, "init", "--async", "migrations", *(("--url", *url) if url else ())],
                   cwd=root, capture_output=True, text=True, timeout=60, check=True)
    env_py = (root / "migrations" / "env.py").read_text()
    assert "run_migrations(context, target_metadata)" in env_py
    assert "import asyncio" not in env_py  # one call: no async code left in env.py
    write_revisions(root / "migrations" / "versions")


def upgrade_together_once(root: Path) -> None:
    """WORKERS `alembic upgrade head` at one instant: our alembic.ini logs our lines
    (not Alembic's): each revision "Applied" once in all."""
    finished = run_together([["alembic", "upgrade", "head"]] * WORKERS, cwd=root)
    for worker in finished:
        assert worker.returncode == 0, worker.stdout + worker.stderr
    applied = [rev for worker in finished
               for rev in re.findall(r"Applied migration: (\w+)", worker.stderr)]
    assert sorted(applied) == sorted(REVISIONS), applied


def test_init_async_on_sqlite_with_aiosqlite(tmp_path: Path) -> None:
    init_async(tmp_path)
    assert "sqlalchemy.url = sqlite+aiosqlite:///%(here)s/app.db" in (
        tmp_path / "alembic.ini").read_text()
    upgrade_together_once(tmp_path)
    assert_migrated_once(tmp_path / "app.db")


@pytest.mark.slow
def test_init_async_on_postgresql_with_asyncpg(tmp_path: Path) -> None:
    """The asyncpg URL of a FastAPI app, once through psycopg (installed), once through
    asyncpg itself (asyncpg's own URL option: psycopg would not read it)."""
    from servers import PG_ADMIN, admin_engine, postgresql_database, postgresql_url, with_driver

    admin = admin_engine(PG_ADMIN)
    try:
        for query in ("", "prepared_statement_cache_size=100"):
            with postgresql_database(admin) as name:
                root = tmp_path / (query or "plain")
                url = with_driver(postgresql_url(name), "asyncpg", query)
                init_async(root, url)
                upgrade_together_once(root)
                engine = sa.create_engine(with_driver(postgresql_url(name), "psycopg"),
                                          poolclass=NullPool)
                try:
                    with engine.connect() as connection:
                        assert connection.exec_driver_sql(
                            "SELECT version_num FROM alembic_version").all() == [("0003",)]
                        assert connection.exec_driver_sql(
                            "SELECT id, name FROM items").all() == [(1, None)]
                finally:
                    engine.dispose()
    finally:
        admin.dispose()
