"""SIGTERM at the edges of the COMMIT: the exit line says what really happened.

A supervisor's SIGTERM can land at any instant; the rare one is just after the COMMIT
returned, when the database is migrated and "rolling back" would be a lie. The instant
is forced by a hook in the project's env.py that sends the signal from inside
``Connection.commit`` (after the real COMMIT, or just before it); everything else is
the real command line, a real signal and a real database.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import Project
from faultkit import integrity, kill, markers_of, start_cli, wait_for

from alembic_sqlite_lock._signals import EXIT_CODE, terminate_as_exit

CLI = str(Path(sys.executable).with_name("alembic-sqlite-lock"))
ALEMBIC = str(Path(sys.executable).with_name("alembic"))

COMMIT_HOOK = '''\
import os
import signal

from sqlalchemy.engine import Connection

_real_commit = Connection.commit


def _commit_and_sigterm(self):
    # The test's way to hit the instant: the first COMMIT of the run is the locked one.
    when = os.environ.pop("ALP_TEST_SIGTERM_AT_COMMIT", "")
    if when == "before":
        os.kill(os.getpid(), signal.SIGTERM)
    _real_commit(self)
    if when == "after":
        os.kill(os.getpid(), signal.SIGTERM)


Connection.commit = _commit_and_sigterm
'''


@pytest.fixture
def at_0008_with_0009(project: Project) -> Project:
    assert project.alembic("upgrade", "head").returncode == 0
    project.add_revision(
        "0009", "0008",
        'op.create_table("t9", sa.Column("id", sa.Integer, primary_key=True))\n'
        'if os.environ.get("ALP_TEST_SIGTERM_IN_MIGRATION"):\n'
        '    os.kill(os.getpid(), signal.SIGTERM)',
        header="import os\nimport signal\n",
    )
    env_py = project.env_py.read_text()
    project.env_py.write_text(COMMIT_HOOK + "\n" + env_py.split('"""', 2)[2])
    return project


def _run(project: Project, command: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([command, "-c", str(project.ini), "upgrade", "head"],
                          cwd=project.root, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env}, check=False)


@pytest.mark.parametrize("when", ["after", "before"])
@pytest.mark.parametrize("command", [CLI, ALEMBIC], ids=["alembic-sqlite-lock", "alembic"])
def test_sigterm_at_the_commit_says_it_was_committed(
    at_0008_with_0009: Project, command: str, when: str
) -> None:
    project = at_0008_with_0009
    result = _run(project, command, {"ALP_TEST_SIGTERM_AT_COMMIT": when})
    err = result.stdout + result.stderr
    assert result.returncode == EXIT_CODE, err
    assert project.version() == ["0009"]
    assert "t9" in project.tables()
    assert ("SIGTERM received after the migration was committed (the database is at "
            "0009): exiting") in err
    assert "rolled back" not in err
    assert "rolling back" not in err
    assert "Traceback" not in err
    assert integrity(project.db) == "ok"


@pytest.mark.parametrize("command", [CLI, ALEMBIC], ids=["alembic-sqlite-lock", "alembic"])
def test_sigterm_in_a_migration_says_it_was_rolled_back(
    at_0008_with_0009: Project, command: str
) -> None:
    project = at_0008_with_0009
    result = _run(project, command, {"ALP_TEST_SIGTERM_IN_MIGRATION": "1"})
    err = result.stdout + result.stderr
    assert result.returncode == EXIT_CODE, err
    assert project.version() == ["0008"]
    assert "t9" not in project.tables()
    assert ("SIGTERM received during the migration run: rolled back; the database is at "
            "0008; exiting") in err
    assert "committed" not in err
    assert "Traceback" not in err
    assert not Path(str(project.db) + "-journal").exists()


def test_sigterm_waits_for_a_commit_in_progress() -> None:
    reached: list[str] = []

    def commit_with_a_sigterm_inside() -> None:
        with terminate_as_exit() as stop, stop.held():
            os.kill(os.getpid(), signal.SIGTERM)
            # The handler ran (between bytecodes) and did not stop the held block.
            reached.append("after the signal")
            stop.committed = True
        reached.append("past the stop")  # never: leaving the hold stops the run

    with pytest.raises(SystemExit) as stopped:
        commit_with_a_sigterm_inside()
    assert reached == ["after the signal"]
    assert stopped.value.code == EXIT_CODE
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


# SIGTERM in the middle of a revision, and whose handler it is ---------------------------


def test_sigterm_rolls_back_and_exits_non_zero(project: Project, hanging: Path) -> None:
    holder = start_cli(project.ini, "upgrade", "head")
    try:
        wait_for(lambda: markers_of(hanging, "0009"), "the holder to run DDL of 0009")
        holder.send_signal(signal.SIGTERM)
        out, err = holder.communicate(timeout=60)
    finally:
        kill(holder)
    assert holder.returncode == EXIT_CODE
    assert "SIGTERM received during the migration run: rolled back; the database is at 0008" in err
    assert "Traceback" not in out + err
    # Rolled back by the process itself: no hot journal left for the next worker.
    assert not Path(str(project.db) + "-journal").exists()
    assert project.version() == ["0008"]
    assert "t9" not in project.tables()
    assert integrity(project.db) == "ok"


def test_sigterm_handler_is_only_ours_when_nobody_else_has_one() -> None:
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    with terminate_as_exit():
        ours = signal.getsignal(signal.SIGTERM)
        assert callable(ours)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL

    def app_server_handler(_signum: int, _frame: object) -> None:
        pass

    signal.signal(signal.SIGTERM, app_server_handler)
    try:
        with terminate_as_exit():
            assert signal.getsignal(signal.SIGTERM) is app_server_handler
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    seen: list[object] = []

    def in_a_thread() -> None:
        with terminate_as_exit():
            seen.append(signal.getsignal(signal.SIGTERM))

    thread = threading.Thread(target=in_a_thread)
    thread.start()
    thread.join()
    assert seen == [signal.SIG_DFL]
