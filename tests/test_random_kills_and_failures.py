"""Property: whatever the number of workers, whoever is killed and whichever revision
fails, the database ends at a revision the chain allows, with the schema of a solo run
to that revision, intact, and no data migration ran twice.

Real processes (the `alembic` console script), a bounded number of examples.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
from pathlib import Path

import pytest
from conftest import Project, make_project, run_together
from faultkit import integrity, schema
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

TEST_REVISIONS = ["0009", "0010", "0011"]
HEAD = "0011"
ORDER = ["0001", "0002", "0003", "0004", "0005", "0006", "0007", "0008", *TEST_REVISIONS]

DDL = {
    "0009": "op.create_table('p9', sa.Column('id', sa.Integer, primary_key=True))",
    # A data migration with nothing unique to lean on: a second run would show.
    "0010": "op.execute(\"INSERT INTO data_migrations (revision, note) VALUES ('0010', 'x')\")",
    "0011": "op.add_column('p9', sa.Column('note', sa.String(20)))",
}


def revision_body(rev: str, markers: Path) -> str:
    return f"""
import os, pathlib, time
markers = pathlib.Path({str(markers)!r})
(markers / f"{rev}.{{os.getpid()}}").touch()
{DDL[rev]}
time.sleep(0.3)  # workers overlap
if (markers / "kill-{rev}").exists():
    # The kill lands here, after this revision's DDL ran: the first worker to get here
    # waits for it; whoever runs the revision after the kill goes on.
    give_up_at = time.monotonic() + 60
    while not (markers / "killed").exists() and time.monotonic() < give_up_at:
        time.sleep(0.005)
if (markers / "fail-{rev}").exists():
    raise RuntimeError("planned failure in {rev}")
"""


def build(root: Path) -> tuple[Project, Path]:
    make_project(root)
    project = Project(root)
    markers = root / "markers"
    markers.mkdir()
    down = "0008"
    for rev in TEST_REVISIONS:
        project.add_revision(rev, down, revision_body(rev, markers))
        down = rev
    return project, markers


_REFERENCE: dict[str | None, list[tuple[object, ...]]] = {}


def reference_schema(root: Path, revision: str | None) -> list[tuple[object, ...]]:
    """The schema a single worker, alone, leaves at ``revision``."""
    if revision not in _REFERENCE:
        project, _markers = build(root / f"solo-{revision}")
        if revision is not None:
            assert project.alembic("upgrade", revision).returncode == 0
        else:
            sqlite3.connect(project.db).close()
        _REFERENCE[revision] = schema(project.db)
    return _REFERENCE[revision]


def killer(markers: Path, revision: str, stop: threading.Event, killed: list[int]) -> None:
    """SIGKILL the first process that reaches ``revision``: it holds the lock and waits
    in that revision for this kill (``kill-<revision>``), so it is the only one there
    and still alive."""
    while not stop.wait(0.005):
        found = list(markers.glob(f"{revision}.*"))
        if found:
            pid = int(found[0].name.split(".")[1])
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            (markers / "killed").touch()
            return


@pytest.mark.timeout(900)
@settings(max_examples=8, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    workers=st.integers(min_value=2, max_value=6),
    start=st.sampled_from([None, "0004", "0008"]),
    kill_at=st.sampled_from([None, *TEST_REVISIONS]),
    fail_at=st.sampled_from([None, *TEST_REVISIONS]),
)
def test_any_workers_kills_and_failures_leave_a_consistent_database(
    tmp_path_factory: pytest.TempPathFactory,
    workers: int,
    start: str | None,
    kill_at: str | None,
    fail_at: str | None,
) -> None:
    root = tmp_path_factory.mktemp("prop")
    project, markers = build(root / "proj")
    if start is not None:
        assert project.alembic("upgrade", start).returncode == 0
    if fail_at is not None:
        (markers / f"fail-{fail_at}").touch()

    stop, killed = threading.Event(), []  # type: ignore[var-annotated]
    watcher = None
    if kill_at is not None:
        (markers / f"kill-{kill_at}").touch()
        watcher = threading.Thread(target=killer, args=(markers, kill_at, stop, killed))
        watcher.start()
    try:
        results = run_together(
            [["alembic", "-c", str(project.ini), "upgrade", "head"]] * workers, cwd=project.root
        )
    finally:
        stop.set()
        if watcher is not None:
            watcher.join()

    # Killed: only the process the killer chose, and only if anyone reached that revision.
    assert [r.pid for r in results if r.returncode == -signal.SIGKILL] == killed
    survivors = [r for r in results if r.pid not in killed]
    assert survivors  # at most one of two or more workers is killed
    for result in survivors:
        assert "Traceback" not in result.stdout + result.stderr
        if fail_at is None:
            assert result.returncode == 0, result.stdout + result.stderr
        else:
            assert result.returncode != 0
            assert f"planned failure in {fail_at}" in result.stdout

    # One run is one transaction: a failure anywhere leaves the starting revision.
    expected = start if fail_at is not None else HEAD
    assert project.version() == ([] if expected is None else [expected])
    assert integrity(project.db) == "ok"
    assert schema(project.db) == reference_schema(root, expected)
    if expected is not None and ORDER.index(expected) >= ORDER.index("0005"):
        audit = project.query("SELECT revision, count(*) FROM data_migrations GROUP BY revision")
        want = {"0005": 1, **({"0010": 1} if expected == HEAD else {})}
        assert dict(audit) == want  # type: ignore[arg-type]
