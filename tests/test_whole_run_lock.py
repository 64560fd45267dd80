"""The lock covers the whole run: the version read, every revision and the version row.

Alembic commits after each revision on SQLite (it treats SQLite's DDL as
non-transactional); with the seed's recipe alone the lock would be released between
revisions and a second worker could start mid-chain. These tests catch that, and a
control test shows they would.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import DEMO_REVISIONS, REPO, STOCK_RACE_SYMPTOM, Project, traced_connect

import alembic_sqlite_lock

REAL_CONNECT = sqlite3.dbapi2.connect


def test_one_begin_immediate_and_one_commit_per_run(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    statements: list[tuple[int, str]] = []
    monkeypatch.setattr(sqlite3.dbapi2, "connect", traced_connect(statements))

    alembic_sqlite_lock.upgrade(project.ini)

    begins = [(key, sql) for key, sql in statements if sql.startswith("BEGIN IMMEDIATE")]
    commits = [(key, sql) for key, sql in statements if sql.strip().upper() == "COMMIT"]
    assert len(begins) == 1, begins
    assert len(commits) == 1, commits
    lock_conn = begins[0][0]
    assert commits[0][0] == lock_conn
    run = [sql for key, sql in statements if key == lock_conn]
    first, last = run.index(begins[0][1]), run.index(commits[0][1])
    # The version read and every DDL statement happen inside that one transaction.
    inside = run[first:last]
    assert "alembic_version" in inside[1]  # the version read comes right after BEGIN
    ddl = [sql for sql in run if sql.lstrip().upper().startswith(("CREATE", "ALTER", "DROP"))]
    assert len(ddl) >= 8
    assert all(sql in inside for sql in ddl)
    assert project.version() == ["0008"]


PAUSING_ENV = '''
import os, time
from pathlib import Path
from alembic.runtime.migration import MigrationContext

# Test hook: pause before each revision's transaction would begin, i.e. *between*
# revisions. A design that commits per revision releases the lock right here. Worker A
# (PEER_PID set) holds its first pause until worker B is provably in the race: B waits
# for the run lock (it has the lock file open), B began a revision of its own (its
# marker), or B exited.
def _peer_is_in() -> bool:
    peer = os.environ["PEER_PID"]
    if Path(os.environ["PEER_MARKER"]).exists() or not Path(f"/proc/{peer}").exists():
        return True
    try:
        fds = os.listdir(f"/proc/{peer}/fd")
        return any(os.readlink(f"/proc/{peer}/fd/{fd}") == os.environ["PEER_LOCK"] for fd in fds)
    except OSError:
        return False

_begin = MigrationContext.begin_transaction
_pauses = []
def _slow_begin(self, _per_migration=False):
    if _per_migration:
        Path(os.environ["MARKER"]).touch()
        if os.environ.get("PEER_PID") and len(_pauses) == 1:
            deadline = time.monotonic() + 60
            while not _peer_is_in() and time.monotonic() < deadline:
                time.sleep(0.005)
        _pauses.append(1)
        time.sleep(float(os.environ.get("PAUSE_S", "0")))
    return _begin(self, _per_migration)
MigrationContext.begin_transaction = _slow_begin
'''

OUR_ENV = PAUSING_ENV + '''
from logging.config import fileConfig
from alembic import context
fileConfig(context.config.config_file_name, disable_existing_loggers=False)
from alembic_sqlite_lock import run_migrations
run_migrations(context, None)
'''

# The seed's recipe taken literally: BEGIN IMMEDIATE on every begin, stock boilerplate.
NAIVE_ENV = PAUSING_ENV + '''
from alembic import context
from sqlalchemy import engine_from_config, event, pool
config = context.config
engine = engine_from_config(config.get_section(config.config_ini_section), prefix="sqlalchemy.",
                            poolclass=pool.NullPool, connect_args={"isolation_level": None})
@event.listens_for(engine, "begin")
def _begin_immediate(conn):
    conn.exec_driver_sql("BEGIN IMMEDIATE")
with engine.connect() as connection:
    context.configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()
'''


def race_with_a_pause_between_revisions(project: Project, env_py: str) -> tuple[Any, Any]:
    """Worker A pauses between revisions; worker B is released while A is mid-chain."""
    project.env_py.write_text(textwrap.dedent(env_py))
    alembic = str(Path(sys.executable).with_name("alembic"))
    gate = project.root / "gate"
    (gate / "ready").mkdir(parents=True)
    base_env = dict(os.environ)
    b = subprocess.Popen(
        [sys.executable, str(REPO / "scripts" / "gated.py"), str(gate / "ready"),
         str(gate / "start"), "--", "alembic", "-c", str(project.ini), "upgrade", "head"],
        env={**base_env, "MARKER": str(gate / "b.marker"), "PAUSE_S": "0"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=project.root,
    )
    deadline = time.monotonic() + 60
    while not os.listdir(gate / "ready"):
        assert time.monotonic() < deadline, "worker B never got ready"
        assert b.poll() is None, "worker B exited before the start signal"
        time.sleep(0.01)
    a = subprocess.Popen(
        [alembic, "-c", str(project.ini), "upgrade", "head"],
        env={**base_env, "MARKER": str(gate / "a.marker"), "PAUSE_S": "0.3",
             "PEER_PID": str(b.pid), "PEER_MARKER": str(gate / "b.marker"),
             "PEER_LOCK": f"{project.db}.migration-lock"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=project.root,
    )
    try:
        while not (gate / "a.marker").exists():
            assert time.monotonic() < deadline, "worker A never reached a revision"
            assert a.poll() is None, a.stderr and a.stderr.read()
            time.sleep(0.005)
        # A has begun its first revision; its next pause lasts until B is in the race.
        (gate / "start").touch()
        a_out = a.communicate(timeout=60)
        b_out = b.communicate(timeout=60)
    finally:
        for proc in (a, b):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return (a.returncode, *a_out), (b.returncode, *b_out)


def test_a_pause_between_revisions_does_not_let_a_second_worker_in(project: Project) -> None:
    (a_code, _, a_err), (b_code, _, b_err) = race_with_a_pause_between_revisions(
        project, OUR_ENV
    )
    assert (a_code, b_code) == (0, 0), a_err + b_err
    assert [line.split(": ")[-1] for line in a_err.splitlines()
            if "Applied migration" in line] == DEMO_REVISIONS
    assert "Applying migration" not in b_err
    assert "All migrations already applied by another worker" in b_err
    assert project.version() == ["0008"]
    assert project.count("data_migrations") == 1


def test_control_the_same_race_breaks_a_per_revision_lock(project: Project) -> None:
    """Proves the test above can fail: the seed's recipe alone lets B in mid-chain."""
    (a_code, _, a_err), (b_code, _, b_err) = race_with_a_pause_between_revisions(
        project, NAIVE_ENV
    )
    broken = a_code != 0 or b_code != 0 or "Running upgrade" in b_err
    if not broken:
        broken = project.count("data_migrations") != 1
    assert broken, "the naive env.py survived the race; the race is not deterministic"
    assert STOCK_RACE_SYMPTOM.search(a_err + b_err) or project.count("data_migrations") != 1


def test_database_locked_twice_at_lock_acquisition_then_success(
    project: Project, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A mock only to force the rare path: connect raises "database is locked" twice."""
    calls: list[str] = []

    def flaky_connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        calls.append("connect")
        if len(calls) in (2, 3):  # call 1 is the unlocked look at the version table
            raise sqlite3.OperationalError("database is locked")
        return REAL_CONNECT(*args, **kwargs)

    monkeypatch.setattr(sqlite3.dbapi2, "connect", flaky_connect)
    caplog.set_level(logging.DEBUG, logger="alembic_sqlite_lock")

    applied = alembic_sqlite_lock.upgrade(project.ini, base_delay_s=0.01, jitter_s=0)

    assert applied == DEMO_REVISIONS
    assert len(calls) == 1 + 3  # the look, then exactly three lock attempts
    retries = [r for r in caplog.records if "Database locked by another worker" in r.message]
    assert [r.getMessage() for r in retries] == [
        "Database locked by another worker, retry 1/10 in 0.02s",
        "Database locked by another worker, retry 2/10 in 0.04s",
    ]
    assert {r.levelno for r in retries} == {logging.DEBUG}
    assert project.version() == ["0008"]
