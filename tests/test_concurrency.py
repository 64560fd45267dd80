"""Many workers on one SQLite file: threads of one process, the process mutex, a file
that does not exist yet, an app writing during the migration, both journal modes.

N processes released at once on every backend are in test_backend_contract.py.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from conftest import Project, assert_migrated_once, make_project, run_together
from faultkit import ALEMBIC, integrity, kill, wait_for

import alembic_sqlite_lock
from alembic_sqlite_lock import _commands


def test_upgrade_from_eight_threads_of_one_process(project: Project) -> None:
    barrier = threading.Barrier(8, timeout=60)
    applied: list[list[str]] = []
    errors: list[BaseException] = []

    def worker() -> None:
        barrier.wait()
        try:
            applied.append(alembic_sqlite_lock.upgrade(project.ini))
        except BaseException as error:  # collected and asserted below
            errors.append(error)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    assert errors == []
    assert sorted(len(revs) for revs in applied) == [0] * 7 + [8]
    assert_migrated_once(project)


def test_process_mutex_serializes_threads(project: Project) -> None:
    """Alembic's context proxy is process-wide: a second thread waits for the mutex."""
    done = threading.Event()

    def worker() -> None:
        alembic_sqlite_lock.upgrade(project.ini)
        done.set()

    with _commands._PROCESS_MUTEX:
        thread = threading.Thread(target=worker)
        thread.start()
        # While this thread holds the mutex the worker cannot even start its command.
        assert not done.wait(timeout=1.0)
        assert project.version() == []
    thread.join(timeout=60)
    assert done.is_set()
    assert_migrated_once(project)


def test_fresh_file_is_created_once(tmp_path: Path) -> None:
    """Workers racing on a database file that does not exist yet: SQLite creates it."""
    make_project(tmp_path)
    project = Project(tmp_path)
    assert not project.db.exists()
    results = run_together(
        [["alembic", "-c", str(project.ini), "upgrade", "head"]] * 6, cwd=tmp_path
    )
    assert [r.returncode for r in results] == [0] * 6
    assert_migrated_once(project)


# An application writing to the database during the migration ---------------------------
APP = textwrap.dedent("""
    import pathlib, sqlite3, sys, time
    db, mode, held, done = sys.argv[1:5]
    conn = sqlite3.connect(db, isolation_level=None, timeout=60)
    conn.execute(f"PRAGMA journal_mode = {mode}")
    committed = 0
    # One long write transaction: the migration must wait it out.
    conn.execute("BEGIN IMMEDIATE")
    for i in range(50):
        conn.execute("INSERT INTO app_events (note) VALUES ('long')")
    pathlib.Path(held).touch()
    time.sleep(2)
    conn.execute("COMMIT")
    committed += 50
    # Then short writes and reads on the same open connection until the migration is over.
    while not pathlib.Path(done).exists():
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO app_events (note) VALUES ('short')")
        conn.execute("COMMIT")
        committed += 1
        conn.execute("SELECT count(*) FROM users").fetchone()
        time.sleep(0.005)
    print(committed)
""")


@pytest.mark.parametrize("mode", ["delete", "wal"])
def test_an_app_write_transaction_makes_the_migration_wait_and_loses_nothing(
    project: Project, tmp_path: Path, mode: str
) -> None:
    assert project.alembic("upgrade", "0004").returncode == 0
    conn = sqlite3.connect(project.db)
    conn.execute("CREATE TABLE app_events (id INTEGER PRIMARY KEY, note TEXT)")
    conn.commit()
    conn.close()
    held, done = tmp_path / "held", tmp_path / "done"
    app = subprocess.Popen(
        [sys.executable, "-c", APP, str(project.db), mode, str(held), str(done)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_for(held.exists, "the app to hold its write transaction")
        migration = subprocess.run(
            [ALEMBIC, "-c", str(project.ini), "upgrade", "head"],
            cwd=project.root, capture_output=True, text=True, timeout=120, check=False,
        )
        done.touch()
        out, err = app.communicate(timeout=60)
    finally:
        kill(app)
    assert migration.returncode == 0, migration.stdout + migration.stderr
    assert app.returncode == 0, err
    assert project.version() == ["0008"]
    assert project.count("data_migrations") == 1
    assert project.count("app_events") == int(out) >= 51  # every app write is there
    assert project.query("PRAGMA journal_mode")[0][0] == mode
    assert integrity(project.db) == "ok"


@pytest.mark.parametrize("mode", ["delete", "wal"])
def test_workers_at_once_in_both_journal_modes(project: Project, mode: str) -> None:
    conn = sqlite3.connect(project.db)
    assert conn.execute(f"PRAGMA journal_mode = {mode}").fetchone()[0] == mode
    conn.close()

    results = run_together(
        [["alembic", "-c", str(project.ini), "upgrade", "head"]] * 4, cwd=project.root
    )

    assert [r.returncode for r in results] == [0] * 4, [r.stderr for r in results]
    applying = sum(r.stderr.count("Applying migration: ") for r in results)
    assert applying == 8
    assert project.version() == ["0008"]
    assert project.count("data_migrations") == 1
    assert project.query("PRAGMA journal_mode")[0][0] == mode
    assert integrity(project.db) == "ok"
