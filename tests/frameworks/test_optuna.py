"""Optuna's RDB storage on one SQLite file, 8 workers at once.

``RDBStorage(url)`` creates Optuna's tables and stamps its Alembic version table with no
lock: workers started together die of ``table studies already exists`` or ``UNIQUE
constraint failed: alembic_version.version_num``. ``optuna storage upgrade`` runs
Optuna's migrations with no lock either: several at once die halfway and leave
``_alembic_tmp_*`` tables behind. In ``migration_lock()`` and under
``alembic-sqlite-lock exec`` exactly one sets up or upgrades the storage.
"""

from __future__ import annotations

import functools
import sqlite3
from pathlib import Path

import pytest
from frameworkkit import (
    CONTROL_REPETITIONS,
    PATIENT,
    REPETITIONS,
    WORKERS,
    LockHolder,
    assert_healthy,
    check,
    count_lines,
    environment,
    failures,
    health,
    race,
    require,
    run_together,
    scenario,
)

require("optuna")

pytestmark = pytest.mark.slow

CREATES_THE_STUDY = "A new study created in RDB with name: s"
UPGRADES = "Upgrading the storage schema to the latest version."
UP_TO_DATE = "This storage is up-to-date."
OLD_REVISION = "v2.4.0.a"
"""The schema Optuna 2.4 left: five migrations to go, three of them rebuilding tables."""


@functools.cache
def heads() -> list[str]:
    return check("optuna")[0]


def test_workers_in_migration_lock_set_the_storage_up_once(tmp_path: Path) -> None:
    dbs = []
    for repetition in range(REPETITIONS):
        db = tmp_path / f"optuna-{repetition}.db"
        workers = race("optuna", "lock", db)
        assert failures(workers) == [], repetition
        assert [worker.seen["locked"] for worker in workers] == [True] * WORKERS
        assert sum(worker.fresh for worker in workers) == 1
        assert count_lines(workers, CREATES_THE_STUDY) == 1
        dbs.append(db)
    script_heads, reports = check("optuna", *dbs)
    for db, report in zip(dbs, reports, strict=True):
        assert_healthy(db, script_heads)
        assert report == {"studies": ["s"], "trials": ["COMPLETE"] * WORKERS}, db


BARE_REPETITIONS = 10
"""Optuna's setup is quick: a repetition without the lock went wrong 3 times in 5 (7 of
8 workers failing each time), on a loaded 2-core machine; 10 make a silent control
unlikely (about 1 in 10,000)."""


def test_control_workers_without_the_lock_break_the_start(tmp_path: Path) -> None:
    shown = []
    for repetition in range(BARE_REPETITIONS):
        db = tmp_path / f"optuna-{repetition}.db"
        workers = race("optuna", "bare", db)
        wrong = failures(workers) + health(db).problems(heads())
        shown.append(wrong)
        if wrong:
            break
    assert any(shown), "no repetition went wrong without the lock"


def test_warm_workers_with_ready_do_not_take_the_lock(tmp_path: Path) -> None:
    db = tmp_path / "optuna.db"
    (first,) = race("optuna", "lock", db, 1)
    assert first.exit_code == 0, first.log
    assert first.fresh
    with LockHolder(db, tmp_path / "holder"):
        warm = race("optuna", "ready", db)
        assert failures(warm) == []
        assert [worker.seen["locked"] for worker in warm] == [False] * WORKERS
        assert not any(worker.fresh for worker in warm)
        # Control: without ready= the same workers queue for the held lock, and give up.
        queued = race("optuna", "lock", db, WORKERS, "--deadline", "1")
        assert [worker.exit_code for worker in queued] == [1] * WORKERS
        assert count_lines(queued, "LockTimeout") == WORKERS
    script_heads, (report,) = check("optuna", db)
    assert_healthy(db, script_heads)
    assert report == {"studies": ["s"], "trials": ["COMPLETE"] * (1 + WORKERS)}


# `optuna storage upgrade`, a one-shot command ----------------------------------------
def old_storage(db: Path) -> Path:
    scenario("old-optuna", db, OLD_REVISION)
    assert health(db).versions == [OLD_REVISION]
    return db


def upgrade_commands(db: Path, *, wrapped: bool) -> list[list[str]]:
    url = f"sqlite:///{db}"
    upgrade = ["optuna", "storage", "upgrade", "--storage", url]
    if not wrapped:
        return [upgrade] * WORKERS
    return [["alembic-sqlite-lock", "exec", "--url", url, *PATIENT, "--", *upgrade]] * WORKERS


def library_version(db: Path) -> str:
    connection = sqlite3.connect(db)
    try:
        return str(connection.execute("SELECT library_version FROM version_info").fetchone()[0])
    finally:
        connection.close()


def test_storage_upgrades_under_exec_migrate_once(tmp_path: Path) -> None:
    dbs = []
    for repetition in range(REPETITIONS):
        db = old_storage(tmp_path / f"optuna-{repetition}.db")
        done = run_together(upgrade_commands(db, wrapped=True), cwd=tmp_path,
                            env=environment(), preload="alembic_sqlite_lock._lock")
        assert failures(done) == [], repetition
        assert count_lines(done, UPGRADES) == 1
        assert count_lines(done, UP_TO_DATE) == WORKERS - 1
        assert library_version(db) != "2.4.0"  # the upgrade's own last step ran
        dbs.append(db)
    script_heads, reports = check("optuna", *dbs)
    for db, report in zip(dbs, reports, strict=True):
        assert_healthy(db, script_heads)
        assert report == {"studies": [], "trials": []}


def test_control_storage_upgrades_without_exec_break_the_storage(tmp_path: Path) -> None:
    shown = []
    for repetition in range(CONTROL_REPETITIONS):
        db = old_storage(tmp_path / f"optuna-{repetition}.db")
        done = run_together(upgrade_commands(db, wrapped=False), cwd=tmp_path,
                            env=environment(), preload="optuna.cli")
        wrong = failures(done) + health(db).problems(heads())
        shown.append(wrong)
        if wrong:
            break
    assert any(shown), "no repetition went wrong without exec"
