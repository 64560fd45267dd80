"""Many workers, one fresh SQLite file, one instant: each migration is applied once."""

from __future__ import annotations

import re
import threading
from collections import Counter
from pathlib import Path

import pytest
from conftest import DEMO_REVISIONS, Project, run_together, upgrade_in_processes

import alembic_sqlite_lock
from alembic_sqlite_lock import _commands


def assert_migrated_once(project: Project) -> None:
    assert project.version() == ["0008"]
    assert project.count("data_migrations") == 1
    assert project.count("tags") == 3
    assert "post_summaries" in project.tables()


def applied_lines(stderr: str) -> list[str]:
    return re.findall(r"Applied migration: (\w+)", stderr)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [4, 10, 32])
def test_cli_workers_started_together_apply_each_migration_once(
    project: Project, workers: int
) -> None:
    results = run_together(
        [["alembic", "-c", str(project.ini), "upgrade", "head"]] * workers,
        cwd=project.root,
        timeout_s=240,
    )

    for result in results:
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr
    applied = Counter(rev for r in results for rev in applied_lines(r.stderr))
    assert applied == Counter(DEMO_REVISIONS)  # every revision applied, exactly once
    appliers = [r for r in results if applied_lines(r.stderr)]
    assert len(appliers) == 1
    for other in results:
        if other is not appliers[0]:
            assert (
                "All migrations already applied by another worker" in other.stderr
                or "Database already at 0008, nothing to do" in other.stderr
            ), other.stderr
    assert_migrated_once(project)


@pytest.mark.parametrize("workers", [4, 10])
def test_upgrade_in_processes_released_by_a_barrier(project: Project, workers: int) -> None:
    """The seed's test, made real: N processes call the start-up function at once."""
    exit_codes, applied = upgrade_in_processes(project.ini, workers)

    assert exit_codes == [0] * workers
    assert sorted(rev for revs in applied for rev in revs) == DEMO_REVISIONS
    assert sorted(len(revs) for revs in applied) == [0] * (workers - 1) + [8]
    assert_migrated_once(project)


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
    from conftest import make_project

    make_project(tmp_path)
    project = Project(tmp_path)
    assert not project.db.exists()
    results = run_together(
        [["alembic", "-c", str(project.ini), "upgrade", "head"]] * 6, cwd=tmp_path
    )
    assert [r.returncode for r in results] == [0] * 6
    assert_migrated_once(project)
