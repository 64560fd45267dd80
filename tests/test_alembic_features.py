"""Alembic features real chains rely on keep working under the lock, with N workers."""

from __future__ import annotations

import logging
import re
import sqlite3
from collections import Counter
from pathlib import Path

import pytest
from conftest import DEMO_REVISIONS, Project, run_together, waiting_for_lock_waiters

import alembic_sqlite_lock
from alembic_sqlite_lock import MigrationError


def upgrade_together(project: Project, *args: str, workers: int = 4) -> list[str]:
    """N `alembic ... upgrade` workers at once; returns every 'Applied' revision seen."""
    results = run_together(
        [["alembic", "-c", str(project.ini), *args]] * workers, cwd=project.root
    )
    for result in results:
        assert result.returncode == 0, result.stdout + result.stderr
    return [rev for r in results for rev in re.findall(r"Applied migration: (\w+)", r.stderr)]


def env_with(project: Project, configure_kwargs: str) -> None:
    project.env_py.write_text(
        "from logging.config import fileConfig\n"
        "from alembic import context\n"
        "from alembic_sqlite_lock import run_migrations\n"
        "fileConfig(context.config.config_file_name, disable_existing_loggers=False)\n"
        f"run_migrations(context, None, {configure_kwargs})\n"
    )


# autocommit_block -------------------------------------------------------------------

BACKFILL_WITH_AUTOCOMMIT = """\
op.create_table("events", sa.Column("id", sa.Integer, primary_key=True),
                sa.Column("kind", sa.String(20), nullable=False))
with op.get_context().autocommit_block():
    # VACUUM cannot run inside a transaction at all.
    op.execute("VACUUM")
op.execute("INSERT INTO events (kind) VALUES ('backfilled')")
"""


def test_autocommit_block_works_and_the_run_stays_serialized(project: Project) -> None:
    project.add_revision("0009", "0008", BACKFILL_WITH_AUTOCOMMIT)

    applied = upgrade_together(project, "upgrade", "head", workers=6)

    assert Counter(applied) == Counter([*DEMO_REVISIONS, "0009"])
    assert project.version() == ["0009"]
    assert project.query("SELECT kind FROM events") == [("backfilled",)]
    assert project.count("data_migrations") == 1


def test_a_failure_after_an_autocommit_block_reports_where_the_database_is(
    project: Project,
) -> None:
    alembic_sqlite_lock.upgrade(project.ini)
    project.add_revision(
        "0009", "0008", BACKFILL_WITH_AUTOCOMMIT + 'raise RuntimeError("after the block")\n'
    )

    with pytest.raises(MigrationError) as caught:
        alembic_sqlite_lock.upgrade(project.ini)

    message = str(caught.value)
    assert "Migration 0009" in message
    assert "the database is still at 0008" in message or "the database is at 0008" in message
    assert project.version() == ["0008"]
    # DDL before the block was committed by it: the documented trade-off.
    assert "events" in project.tables()
    assert project.count("events") == 0


# transaction_per_migration ----------------------------------------------------------


def test_transaction_per_migration_is_honoured_and_still_serialized(project: Project) -> None:
    env_with(project, "transaction_per_migration=True")

    applied = upgrade_together(project, "upgrade", "head", workers=6)

    assert Counter(applied) == Counter(DEMO_REVISIONS)
    assert project.version() == ["0008"]
    assert project.count("data_migrations") == 1


def test_transaction_per_migration_keeps_the_revisions_before_a_failure(
    project: Project,
) -> None:
    env_with(project, "transaction_per_migration=True")
    project.add_revision("0009", "0008", 'op.execute("CREATE TABLE t9 (id INTEGER)")')
    project.add_revision("0010", "0009", 'raise RuntimeError("0010 broke")')

    result = project.alembic("upgrade", "head")

    assert result.returncode != 0
    assert "Migration 0010" in result.stdout
    assert "the database is at 0009" in result.stdout
    assert project.version() == ["0009"]  # the trade-off: committed revision by revision
    assert "t9" in project.tables()


# Relative targets, branches, merges --------------------------------------------------


def hold_until_the_others_wait(
    project: Project, revision_file: str, function: str, others: int
) -> None:
    """Make a revision wait until ``others`` other processes have the run lock file open:
    each of them has looked at the version before this run commits, and waits for it."""
    path = project.versions / revision_file
    signature = f"def {function}() -> None:\n"
    code = waiting_for_lock_waiters(f"{project.db}.migration-lock", others, at_most_s=60)
    indented = "".join(f"    {line}\n" for line in code.splitlines())
    path.write_text(path.read_text().replace(signature, signature + indented))


def test_relative_targets_are_resolved_from_what_each_worker_first_saw(
    project: Project,
) -> None:
    hold_until_the_others_wait(project, "0002_create_posts.py", "upgrade", others=3)
    hold_until_the_others_wait(project, "0008_users_display_name.py", "downgrade", others=3)
    applied = upgrade_together(project, "upgrade", "+2", workers=4)
    assert project.version() == ["0002"]
    assert Counter(applied) == Counter(["0001", "0002"])

    alembic_sqlite_lock.upgrade(project.ini)
    results = run_together(
        [["alembic", "-c", str(project.ini), "downgrade", "-1"]] * 4, cwd=project.root
    )
    assert [r.returncode for r in results] == [0] * 4
    reverted = [rev for r in results
                for rev in re.findall(r"Reverted migration: (\w+)", r.stderr)]
    assert reverted == ["0008"]
    assert project.version() == ["0007"]


def add_branches(project: Project) -> None:
    """Two branches off 0008 (one labelled), one depending on the other, then a merge."""
    project.add_revision("b1", "0008", 'op.execute("CREATE TABLE b1 (id INTEGER)")',
                         header="")
    path = project.versions / "b1_test.py"
    path.write_text(path.read_text().replace("branch_labels = None",
                                             "branch_labels = ('feature',)"))
    project.add_revision("c1", "0008", 'op.execute("CREATE TABLE c1 (id INTEGER)")')
    project.add_revision("c2", "c1", 'op.execute("CREATE TABLE c2 (id INTEGER)")')
    path = project.versions / "c2_test.py"
    path.write_text(path.read_text().replace("depends_on = None", "depends_on = 'b1'"))


def test_branch_labels_heads_depends_on_and_merges(project: Project) -> None:
    add_branches(project)

    applied = upgrade_together(project, "upgrade", "feature@head")
    assert Counter(applied) == Counter([*DEMO_REVISIONS, "b1"])
    assert project.version() == ["b1"]

    applied = upgrade_together(project, "upgrade", "heads")
    assert Counter(applied) == Counter(["c1", "c2"])
    # c2 depends on b1, so Alembic records c2 alone as the head of both.
    assert project.version() == ["c2"]
    assert {"b1", "c1", "c2"} <= project.tables()

    project.add_revision("m1", ("b1", "c2"), "pass")  # type: ignore[arg-type]
    applied = upgrade_together(project, "upgrade", "head")
    assert applied == ["m1"]
    assert project.version() == ["m1"]


def test_upgrade_head_with_several_heads_is_a_clear_error(project: Project) -> None:
    add_branches(project)
    result = project.alembic("upgrade", "head")
    assert result.returncode != 0
    assert "FAILED: Cannot upgrade" in result.stdout
    assert "alembic upgrade heads" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    assert project.tables() == set()


# context.configure options ----------------------------------------------------------


def test_configure_options_pass_through(project: Project) -> None:
    env_with(
        project,
        "version_table='schema_version', render_as_batch=True, compare_type=True, "
        "include_object=lambda *a: True, user_module_prefix='myapp.types.'",
    )

    applied = upgrade_together(project, "upgrade", "head")

    assert Counter(applied) == Counter(DEMO_REVISIONS)
    assert "alembic_version" not in project.tables()
    assert project.query("SELECT version_num FROM schema_version") == [("0008",)]
    current = project.alembic("current")
    assert current.returncode == 0
    assert "0008 (head)" in current.stdout


# URLs as people write them ----------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:///app.db",  # relative to the working directory
        "sqlite:///file:app.db?mode=rwc&uri=true",  # a URI filename
    ],
)
def test_relative_and_uri_urls(project: Project, url: str) -> None:
    text = project.ini.read_text().replace("sqlite:///%(here)s/app.db", url)
    project.ini.write_text(text)

    applied = upgrade_together(project, "upgrade", "head")

    assert Counter(applied) == Counter(DEMO_REVISIONS)
    assert project.version() == ["0008"]
    assert Path(str(project.db) + ".migration-lock").exists()  # the run lock found the file


# PRAGMA foreign_keys in a revision -------------------------------------------------


def test_a_foreign_keys_pragma_inside_the_run_warns_and_loses_no_child_row(
    project: Project, caplog: pytest.LogCaptureFixture
) -> None:
    alembic_sqlite_lock.upgrade(project.ini, "0007")
    conn = sqlite3.connect(project.db)
    conn.execute("INSERT INTO users (id, email) VALUES (1, 'a@example.org')")
    conn.execute("INSERT INTO posts (author_id, title) VALUES (1, 'hello')")
    conn.commit()
    conn.close()
    # Alembic's advice for rebuilding a parent table, which SQLite ignores in a transaction.
    (project.versions / "0008_users_display_name.py").write_text(
        (project.versions / "0008_users_display_name.py").read_text().replace(
            '    op.add_column("users"',
            '    op.execute("PRAGMA foreign_keys=OFF")\n'
            '    with op.batch_alter_table("users", recreate="always") as batch:\n'
            '        batch.alter_column("email", existing_type=sa.String(255))\n'
            '    op.execute("PRAGMA foreign_keys=ON")\n'
            '    op.add_column("users"',
        )
    )
    # The view reads users, and a rebuild of users would break it: drop it around.
    caplog.set_level(logging.WARNING, logger="alembic_sqlite_lock")
    project.query("DROP VIEW post_summaries")

    alembic_sqlite_lock.upgrade(project.ini)

    warnings = [r.getMessage() for r in caplog.records if "foreign_keys" in r.getMessage()]
    assert len(warnings) == 2
    assert all(w.startswith("Migration 0008 (users get a display name) runs") for w in warnings)
    assert project.count("posts") == 1
    assert project.version() == ["0008"]


# Scale --------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_long_chain_with_a_big_backfill(tmp_path: Path) -> None:
    """200 generated revisions, one backfilling 100,000 rows, with 4 workers at once."""
    from conftest import make_project

    make_project(tmp_path)
    project = Project(tmp_path)
    for old in project.versions.glob("*.py"):
        old.unlink()
    project.add_revision("r001", None, 'op.execute("CREATE TABLE items (id INTEGER PRIMARY '
                         'KEY, n INTEGER NOT NULL, tag TEXT)")')
    project.add_revision(
        "r002", "r001",
        'op.execute("WITH RECURSIVE seq(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM seq '
        'WHERE n < 100000) INSERT INTO items (n) SELECT n FROM seq")',
    )
    for number in range(3, 201):
        body = (f'op.execute("UPDATE items SET tag = \'batch{number}\' WHERE n % 200 = {number}")'
                if number % 2 else f'op.execute("CREATE TABLE t{number} (id INTEGER)")')
        project.add_revision(f"r{number:03}", f"r{number - 1:03}", body)

    applied = upgrade_together(project, "upgrade", "head", workers=4)

    assert Counter(applied) == Counter(f"r{n:03}" for n in range(1, 201))
    assert project.version() == ["r200"]
    assert project.count("items") == 100_000


def _upgrade_with_attached_version_schema(ini: str, meta_db: str, barrier: object) -> None:
    import sqlalchemy as sa
    from alembic.config import Config

    engine = sa.create_engine(f"sqlite:///{Path(ini).parent / 'app.db'}")
    with engine.connect() as connection:
        connection.exec_driver_sql(f"ATTACH DATABASE '{meta_db}' AS meta")
        connection.commit()  # SQLAlchemy began a transaction for the ATTACH
        config = Config(ini)
        config.attributes["connection"] = connection
        barrier.wait()  # type: ignore[attr-defined]
        alembic_sqlite_lock.upgrade(config)


def test_version_table_in_an_attached_database(project: Project) -> None:
    """version_table_schema naming an attached database, 4 processes at once."""
    import multiprocessing

    env_with(project, "version_table_schema='meta'")
    meta_db = str(project.root / "meta.db")
    fork = multiprocessing.get_context("fork")
    barrier = fork.Barrier(4, timeout=60)
    procs = [
        fork.Process(target=_upgrade_with_attached_version_schema,
                     args=(str(project.ini), meta_db, barrier))
        for _ in range(4)
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
    assert [proc.exitcode for proc in procs] == [0] * 4
    assert "alembic_version" not in project.tables()
    conn = sqlite3.connect(meta_db)
    try:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [("0008",)]
    finally:
        conn.close()
    assert project.count("data_migrations") == 1
