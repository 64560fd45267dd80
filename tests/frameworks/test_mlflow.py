"""MLflow's tracking store (mlflow-skinny) on one fresh SQLite file, 8 jobs at once.

MLflow creates and migrates its tables itself, when a job first opens the store
(``mlflow.set_experiment``), with no lock: started together, jobs die of ``duplicate
column name`` or ``table experiments already exists``. In ``migration_lock()`` exactly
one sets the store up and the others find it done; with ``ready=`` warm jobs do not
even queue.
"""

from __future__ import annotations

import functools
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from frameworkkit import (
    CONTROL_REPETITIONS,
    REPETITIONS,
    SCENARIO,
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
)

require("mlflow")

pytestmark = pytest.mark.slow

SETS_UP = "Creating initial MLflow database tables"
"""MLflow's log line when a job finds no tables and creates and migrates them."""


@functools.cache
def heads() -> list[str]:
    return check("mlflow")[0]


def test_jobs_in_migration_lock_set_the_store_up_once(tmp_path: Path) -> None:
    dbs = []
    for repetition in range(REPETITIONS):
        db = tmp_path / f"mlflow-{repetition}.db"
        workers = race("mlflow", "lock", db)
        assert failures(workers) == [], repetition
        assert [worker.seen["locked"] for worker in workers] == [True] * WORKERS
        assert sum(worker.fresh for worker in workers) == 1
        assert count_lines(workers, SETS_UP) == 1
        dbs.append(db)
    script_heads, reports = check("mlflow", *dbs)
    for db, report in zip(dbs, reports, strict=True):
        assert_healthy(db, script_heads)
        assert report == {"experiments": ["Default", "x"], "runs": []}, db


def test_control_jobs_without_the_lock_break_the_start(tmp_path: Path) -> None:
    shown = []
    for repetition in range(CONTROL_REPETITIONS):
        db = tmp_path / f"mlflow-{repetition}.db"
        workers = race("mlflow", "bare", db)
        wrong = failures(workers) + health(db).problems(heads())
        shown.append(wrong)
        if wrong:
            break
    assert any(shown), "no repetition went wrong without the lock"


def test_a_job_killed_mid_setup_leaves_the_lock_to_the_next_one(tmp_path: Path) -> None:
    db = tmp_path / "mlflow.db"
    paused = tmp_path / "paused"
    holder = subprocess.Popen(
        [sys.executable, str(SCENARIO), "hold-mid-setup", str(db), str(paused)],
        env=environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not paused.exists() and holder.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if not paused.exists():
            holder.kill()
            pytest.fail(f"the job never reached its 10th migration:\n{holder.communicate()[0]}")
        assert json.loads(paused.read_text())["pid"] == holder.pid
        # While it lives, a job that will not wait is refused: the lock is the holder's.
        refused = race("mlflow", "lock", db, 1, "--no-wait")
        assert refused[0].exit_code != 0
        assert "LockTimeout" in refused[0].log
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.communicate(timeout=60)
    assert holder.returncode == -signal.SIGKILL
    assert health(db).versions != heads()  # killed halfway through MLflow's migrations
    # The next job, which will not wait either, gets the lock and finishes the setup.
    (following,) = race("mlflow", "lock", db, 1, "--no-wait")
    assert following.exit_code == 0, following.log
    assert following.seen["locked"]
    assert SETS_UP in following.log
    script_heads, (report,) = check("mlflow", db)
    assert_healthy(db, script_heads)
    assert report == {"experiments": ["Default", "x"], "runs": []}


def test_warm_jobs_with_ready_do_not_take_the_lock(tmp_path: Path) -> None:
    db = tmp_path / "mlflow.db"
    (first,) = race("mlflow", "lock", db, 1)
    assert first.exit_code == 0, first.log
    assert first.fresh
    with LockHolder(db, tmp_path / "holder"):
        warm = race("mlflow", "ready", db)
        assert failures(warm) == []
        assert [worker.seen["locked"] for worker in warm] == [False] * WORKERS
        assert not any(worker.fresh for worker in warm)
        # Control: without ready= the same jobs queue for the held lock, and give up.
        queued = race("mlflow", "lock", db, WORKERS, "--deadline", "1")
        assert [worker.exit_code for worker in queued] == [1] * WORKERS
        assert count_lines(queued, "LockTimeout") == WORKERS
    script_heads, (report,) = check("mlflow", db)
    assert_healthy(db, script_heads)
    assert report == {"experiments": ["Default", "x"], "runs": []}
