"""Shared fixtures: a throw-away copy of the demo Alembic project per test."""

from __future__ import annotations

import fcntl
import itertools
import multiprocessing
import os
import pwd
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from faultkit import ALEMBIC, hanging_revision  # noqa: E402
from workers import Project as DemoProject  # noqa: E402
from workers import make_project, run_together  # noqa: E402

__all__ = [
    "REPO",
    "Project",
    "Unprivileged",
    "applied_lines",
    "assert_migrated_once",
    "make_project",
    "run_together",
    "set_url",
    "traced_connect",
]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A slow test gets 600 s before pytest-timeout stops it: its own budgets (servers
    booting, dozens of processes on a loaded 2-core runner) should fail it first, with
    their clearer messages."""
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(600))


DEMO_REVISIONS = ["0001", "0002", "0003", "0004", "0005", "0006", "0007", "0008"]

CHEAP_LOOK = 'SELECT version_num FROM "main"."alembic_version"'
"""The library's own read of the version, in a statement trace (traced_connect)."""


def waiting_for_lock_waiters(lock_file: Path | str, others: int, at_most_s: float) -> str:
    """Revision code that holds the revision until ``others`` other processes have
    ``lock_file`` (the run lock beside the database) open, at most ``at_most_s``: each of
    them has looked at the version before this run commits, and waits for it. Proof by
    /proc instead of a sleep that a loaded machine can outlast."""
    return textwrap.dedent(f"""\
        import os, time
        def _waiting() -> int:
            count = 0
            for pid in filter(str.isdigit, os.listdir("/proc")):
                if int(pid) == os.getpid():
                    continue
                try:
                    fds = os.listdir(f"/proc/{{pid}}/fd")
                    count += any(os.readlink(f"/proc/{{pid}}/fd/{{fd}}") == {str(lock_file)!r}
                                 for fd in fds)
                except OSError:
                    pass
            return count
        give_up_at = time.monotonic() + {at_most_s}
        while _waiting() < {others} and time.monotonic() < give_up_at:
            time.sleep(0.01)
        """)


STOCK_RACE_SYMPTOM = re.compile(
    r"expected to match one row when updating|already exists|database is locked"
    r"|duplicate column name|error in view post_summaries: no such table: main\.posts"
)
"""What a worker that runs the demo chain without a whole-run lock dies of when another
worker is mid-chain: a table, index or view the other made; a version row that moved
under it; a lock it could not get; a column 0008 already added; or, having read a version
older than 0006 while the other was past 0007, 0006's rebuild of posts failing on 0007's
view (SQLite checks views when the rebuilt table is renamed)."""


class Project(DemoProject):
    """A copy of the demo project (alembic.ini, alembic/env.py, alembic/versions/), with
    the tests' ways to run it and to read facts back from its database."""

    def alembic(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run the real `alembic` console script of this virtualenv."""
        exe = Path(sys.executable).with_name("alembic")
        return subprocess.run(
            [str(exe), "-c", str(self.ini), *args],
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def add_revision(self, rev: str, down: str | None, upgrade: str,
                     downgrade: str = "pass", header: str = "") -> Path:
        """Write a revision file; ``upgrade``/``downgrade`` are function bodies."""
        body = "\n".join("    " + line for line in upgrade.strip().splitlines())
        down_body = "\n".join("    " + line for line in downgrade.strip().splitlines())
        path = self.versions / f"{rev}_test.py"
        path.write_text(
            f'"""test revision {rev}"""\n'
            "import sqlalchemy as sa\nfrom alembic import op\n"
            f"{header}\n"
            f"revision = {rev!r}\ndown_revision = {down!r}\n"
            "branch_labels = None\ndepends_on = None\n\n\n"
            f"def upgrade():\n{body}\n\n\ndef downgrade():\n{down_body}\n"
        )
        return path

    # Facts about the database, read with plain sqlite3 -------------------------------
    def query(self, sql: str) -> list[tuple[object, ...]]:
        conn = sqlite3.connect(self.db)
        try:
            return conn.execute(sql).fetchall()
        finally:
            conn.close()

    def version(self) -> list[str]:
        if "alembic_version" not in self.tables():
            return []
        return sorted(str(v) for (v,) in self.query("SELECT version_num FROM alembic_version"))

    def tables(self) -> set[str]:
        if not self.db.exists():
            return set()
        return {str(n) for (n,) in self.query(
            "SELECT name FROM sqlite_master WHERE type IN ('table', 'view')")}

    def count(self, table: str) -> int:
        return int(self.query(f"SELECT count(*) FROM {table}")[0][0])


def set_url(project: Project, url: str) -> None:
    """Point the project's alembic.ini at ``url``, as written (no %% escaping)."""
    text = project.ini.read_text()
    start = text.index("sqlalchemy.url = ")
    end = text.index("\n", start)
    project.ini.write_text(text[:start] + f"sqlalchemy.url = {url}" + text[end:])


def assert_migrated_once(project: Project) -> None:
    """The demo chain ran to its head once: one run of the data migration 0005 (its
    row, its three tags) and the view of 0007, on any backend."""
    assert project.version() == ["0008"]
    assert project.count("data_migrations") == 1
    assert project.count("tags") == 3
    assert "post_summaries" in project.tables()


def applied_lines(stderr: str) -> list[str]:
    """The revisions a worker's log says it applied, in order."""
    return re.findall(r"Applied migration: (\w+)", stderr)


@pytest.fixture
def project(tmp_path: Path) -> Iterator[Project]:
    make_project(tmp_path / "proj")
    return Project(tmp_path / "proj")


@pytest.fixture
def hanging(project: Project, tmp_path: Path) -> Path:
    """The project at 0008 plus a revision 0009 that does DDL and then hangs."""
    assert project.alembic("upgrade", "head").returncode == 0
    markers = tmp_path / "markers"
    markers.mkdir()
    project.add_revision("0009", "0008", hanging_revision(markers))
    return markers


@contextmanager
def held_flock(path: Path) -> Iterator[None]:
    """Another holder of a run lock: its own open file description, flock taken."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _upgrade_after_barrier(ini: str, barrier: Any, results: Any) -> None:
    import alembic_sqlite_lock

    barrier.wait()
    results.put(alembic_sqlite_lock.upgrade(ini))


def upgrade_in_processes(ini: Path, workers: int) -> tuple[list[int | None], list[list[str]]]:
    """``workers`` forked processes call ``upgrade(ini)`` at once, released by a
    fork-inherited Barrier; returns their exit codes and what each one applied."""
    fork = multiprocessing.get_context("fork")
    barrier = fork.Barrier(workers, timeout=60)
    results = fork.Queue()
    procs = [fork.Process(target=_upgrade_after_barrier, args=(str(ini), barrier, results))
             for _ in range(workers)]
    for proc in procs:
        proc.start()
    try:
        applied = [results.get(timeout=120) for _ in procs]
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    return [proc.exitcode for proc in procs], applied


@contextmanager
def write_lock_held(db: Path) -> Iterator[None]:
    """Another connection holds SQLite's write (RESERVED) lock on ``db``, as a long write
    transaction would; closing it rolls that transaction back."""
    holder = sqlite3.connect(db, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        yield
    finally:
        holder.close()


def traced_connect(statements: list[tuple[int, str]]) -> Callable[..., sqlite3.Connection]:
    """sqlite3.connect that records every statement SQLite runs, per connection
    (monkeypatch it over ``sqlite3.dbapi2.connect``, which SQLAlchemy calls)."""
    real_connect = sqlite3.dbapi2.connect
    numbers = itertools.count(1)  # not id(): a closed connection's id is reused

    def connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        conn = real_connect(*args, **kwargs)
        key = next(numbers)
        conn.set_trace_callback(lambda sql: statements.append((key, sql)))
        return conn

    return connect
# Runs as an unprivileged user ------------------------------------------------------
# Root ignores file modes, so a test about permissions runs the real `alembic` CLI as a
# system user (setpriv), in a directory outside pytest's 0700 temp root that the user
# can reach. The virtualenv must be readable by that user.

UNPRIVILEGED_USER = "alsl-test"


@dataclass
class Unprivileged:
    uid: int
    gid: int
    name: str
    prefix: list[str]

    def alembic(self, ini: Path, *args: str) -> subprocess.CompletedProcess[str]:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(ini.parent),
               "PYTHONDONTWRITEBYTECODE": "1"}
        return subprocess.run(
            [*self.prefix, ALEMBIC, "-c", str(ini), *args],
            cwd=ini.parent, capture_output=True, text=True, env=env, timeout=120, check=False,
        )

    def chown(self, path: Path) -> None:
        if os.geteuid() == 0:
            os.chown(path, self.uid, self.gid)


def _ensure_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(UNPRIVILEGED_USER)
    except KeyError:
        pass
    done = subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
         UNPRIVILEGED_USER],
        capture_output=True, text=True, check=False,
    )
    try:  # another xdist worker may have created it at the same moment
        return pwd.getpwnam(UNPRIVILEGED_USER)
    except KeyError:
        pytest.skip(f"cannot create an unprivileged user: {done.stderr.strip()}")
        raise


@pytest.fixture(scope="session")
def unprivileged() -> Unprivileged:
    if os.geteuid() != 0:
        me = pwd.getpwuid(os.geteuid())
        return Unprivileged(me.pw_uid, me.pw_gid, me.pw_name, [])
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv is needed to run as another user")
    user = _ensure_user()
    probe = subprocess.run(
        ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups",
         "--", ALEMBIC, "--version"], capture_output=True, text=True, check=False,
    )
    if probe.returncode != 0:
        pytest.skip(f"the virtualenv is not usable by {UNPRIVILEGED_USER}: "
                    f"{probe.stderr.strip()}")
    return Unprivileged(
        user.pw_uid, user.pw_gid, UNPRIVILEGED_USER,
        ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups", "--"],
    )


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory any user can traverse (pytest's own temp root is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="alsl-perm-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
