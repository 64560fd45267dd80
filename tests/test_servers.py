"""Real servers: every gunicorn and uvicorn worker migrates one fresh SQLite file at boot.

The apps are the ones in examples/, run by the real console scripts, bound to 127.0.0.1
on a free port. A test passes only when every worker booted and stayed up (the number of
distinct worker pids answering /health equals the worker count), each migration ran
once (row counts of the demo data migration, one "Applied migration" line per revision)
and every other worker logged that it found the work done. A control runs the same app
with Alembic's plain ``command.upgrade`` and a race forced by a slow revision, and shows
that these checks catch it every time.
"""

from __future__ import annotations

import functools
import json
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import (
    DEMO_REVISIONS,
    REPO,
    STOCK_RACE_SYMPTOM,
    Project,
    make_project,
    waiting_for_lock_waiters,
)

import alembic

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
FLASK_DIR = REPO / "examples" / "flask_app"
FASTAPI_DIR = REPO / "examples" / "fastapi_app"
STOCK_ENV_PY = Path(alembic.__file__).parent / "templates" / "generic" / "env.py"

BOOT_TIMEOUT_S = 90  # generous: 8 workers importing Flask on 2 busy cores
ALIVE_AFTER_S = 5
HEALTH_TIMEOUT_S = 60
REQUESTS_PER_WORKER = 8  # per round: 64 concurrent requests for 8 workers
HOLD_S = 0.2

# "<time> [<pid>] [<LEVEL>] <logger>: <message>", the format both examples configure.
LOG_LINE = re.compile(r"\[(\d+)\] \[([A-Z]+)\] ([\w.]+): (.*)")
FOUND_DONE = re.compile(
    r"All migrations already applied by another worker|Database already at \w+, nothing to do"
)

# A revision that holds its worker for a while: with the library it holds the lock, and
# every other worker that boots meanwhile must wait; without it, workers that boot
# meanwhile read a stale version and run migrations again. It records each run in the
# demo's data_migrations table, so a second run shows in the data.
SLOW_SECONDS = 4
INSERT_0009 = (
    "op.execute(\"INSERT INTO data_migrations (revision, note) VALUES ('0009', 'slow')\")\n"
)
SLOW_REVISION_BODY = f"import time\ntime.sleep({SLOW_SECONDS})\n{INSERT_0009}"


# Running servers --------------------------------------------------------------------------


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    started: float = field(default_factory=time.monotonic)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        """SIGTERM the whole process group (master and workers), SIGKILL what stays."""
        for sig, grace in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break  # no process of the group is left
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                continue
            if sig == signal.SIGTERM:
                # The master is gone; a worker it failed to reap must not outlive the test.
                time.sleep(0.5)


_PORTS = random.SystemRandom()  # never reseeded by a test


def free_port() -> int:
    """A free port below the kernel's ephemeral range: between this check and the server
    binding it, no outgoing connection (of a test running in parallel) can be given it,
    as a port from bind(0) could."""
    try:
        first_ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        first_ephemeral = 32768
    for _ in range(100):
        port = _PORTS.randrange(10000, max(first_ephemeral, 10001))
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


StartServer = Callable[..., Server]


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[StartServer]:
    """Start a server in its own process group; every server is stopped at teardown."""
    servers: list[Server] = []

    def start(argv: list[str], *, cwd: Path, env: dict[str, str]) -> Server:
        port = free_port()
        log_path = tmp_path / f"server-{len(servers)}.log"
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("APP_")}
        full_env.update(env, PYTHONUNBUFFERED="1")
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [*argv, *bind_args(argv[0], port)],
                cwd=cwd,
                env=full_env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        server = Server(proc, port, log_path)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def bind_args(executable: str, port: int) -> list[str]:
    if Path(executable).name == "gunicorn":
        return ["--bind", f"127.0.0.1:{port}"]
    return ["--host", "127.0.0.1", "--port", str(port)]


@functools.cache
def gunicorn_control_socket_off() -> list[str]:
    """Parallel tests must not share ~/.gunicorn/gunicorn.ctl (recent gunicorn opens one)."""
    help_text = subprocess.run([str(BIN / "gunicorn"), "--help"], capture_output=True,
                               text=True, timeout=60, check=True).stdout
    return ["--no-control-socket"] if "--no-control-socket" in help_text else []


def gunicorn(workers: int, app: str = "app:create_app()", *extra: str) -> list[str]:
    return [
        str(BIN / "gunicorn"), "-c", str(FLASK_DIR / "gunicorn.conf.py"),
        "--chdir", str(FLASK_DIR), "--workers", str(workers),
        *gunicorn_control_socket_off(), *extra, app,
    ]


def uvicorn(workers: int) -> list[str]:
    return [
        str(BIN / "uvicorn"), "app:app", "--app-dir", str(FASTAPI_DIR),
        "--workers", str(workers), "--log-config", str(FASTAPI_DIR / "logging.json"),
    ]


# Talking to them --------------------------------------------------------------------------


def get_health(port: int, hold: float = 0.0) -> tuple[int, dict[str, object]]:
    url = f"http://127.0.0.1:{port}/health?hold={hold}"
    try:
        with urllib.request.urlopen(url, timeout=15) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def wait_until_serving(server: Server) -> None:
    """Until /health answers 200; fails at once if the master exits."""
    deadline = time.monotonic() + BOOT_TIMEOUT_S
    while time.monotonic() < deadline:
        assert server.alive(), f"the server exited with {server.proc.returncode}:\n{server.log()}"
        try:
            if get_health(server.port)[0] == 200:
                return
        except (OSError, ValueError):
            pass  # not listening yet, or a worker still booting closed the connection
        time.sleep(0.2)
    pytest.fail(f"/health never answered 200 within {BOOT_TIMEOUT_S}s:\n{server.log()}")


def wait_until_alive_after(server: Server, seconds: float) -> None:
    time.sleep(max(0.0, server.started + seconds - time.monotonic()))
    assert server.alive(), f"the master exited with {server.proc.returncode}:\n{server.log()}"


def worker_pids_answering(server: Server, workers: int) -> set[int]:
    """Distinct pids behind /health: rounds of concurrent requests, each held briefly so
    that a busy worker leaves the next connections to the others."""
    pids: set[int] = set()
    deadline = time.monotonic() + HEALTH_TIMEOUT_S
    requests = REQUESTS_PER_WORKER * workers
    with ThreadPoolExecutor(requests) as pool:
        while len(pids) < workers and time.monotonic() < deadline:
            answers = list(pool.map(lambda _: get_health(server.port, HOLD_S), range(requests)))
            for status, body in answers:
                assert status == 200, body  # every worker is at head, or it does not answer
                pids.add(int(str(body["pid"])))
    return pids


def children_of(pid: int) -> set[int]:
    """Child pids of ``pid`` (Linux /proc): proves the answering pids are its workers."""
    children = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.add(int(stat.parent.name))
    return children


# What they logged ------------------------------------------------------------------------


@dataclass
class WorkerLog:
    applied: list[str] = field(default_factory=list)
    found_done: list[str] = field(default_factory=list)
    app_lines: list[str] = field(default_factory=list)


def parse_log(text: str, app_logger: str) -> dict[int, WorkerLog]:
    workers: dict[int, WorkerLog] = {}
    for match in LOG_LINE.finditer(text):
        pid, _level, logger, message = int(match[1]), match[2], match[3], match[4]
        entry = workers.setdefault(pid, WorkerLog())
        if logger.startswith("alembic_sqlite_lock"):
            if applied := re.fullmatch(r"Applied migration: (\w+)", message):
                entry.applied.append(applied[1])
            elif FOUND_DONE.fullmatch(message):
                entry.found_done.append(message)
        elif logger == app_logger:
            entry.app_lines.append(message)
    return workers


def assert_one_worker_migrated(
    log: str, worker_pids: set[int], revisions: list[str], app_logger: str
) -> WorkerLog:
    """Exactly one "Applied migration" per revision, all by one worker; each other worker
    found the work done; each worker's app logger still emits after the upgrade ran."""
    assert "Traceback" not in log, log
    by_pid = parse_log(log, app_logger)
    applied = Counter(rev for entry in by_pid.values() for rev in entry.applied)
    assert applied == Counter(revisions), log
    appliers = {pid for pid, entry in by_pid.items() if entry.applied}
    assert len(appliers) == 1, log
    assert appliers <= worker_pids, log
    assert not by_pid[next(iter(appliers))].found_done, log
    migrated = {pid for pid, entry in by_pid.items() if entry.applied or entry.found_done}
    assert migrated == worker_pids, log  # no worker restarted, none skipped its upgrade
    for pid in worker_pids - appliers:
        assert len(by_pid[pid].found_done) == 1, log
    for pid in worker_pids:
        assert any(line.startswith(f"Worker {pid} ready at ") for line in
                   by_pid[pid].app_lines), log
    return by_pid[next(iter(appliers))]


def assert_migrated_once(db: Path, data_revisions: dict[str, int] | None = None) -> None:
    rows = dict(query(db, "SELECT revision, count(*) FROM data_migrations GROUP BY revision"))
    assert rows == (data_revisions or {"0005": 1})
    assert query(db, "SELECT count(*) FROM tags") == [(3,)]


def query(db: Path, sql: str) -> list[tuple[object, ...]]:
    connection = sqlite3.connect(db)
    try:
        return connection.execute(sql).fetchall()
    finally:
        connection.close()


def check_server(server: Server, workers: int, app_logger: str, revisions: list[str]) -> None:
    """The whole check: boots, stays up, every worker answers, one worker migrated."""
    wait_until_serving(server)
    wait_until_alive_after(server, ALIVE_AFTER_S)
    pids = worker_pids_answering(server, workers)
    assert len(pids) == workers, (pids, server.log())
    assert pids <= children_of(server.proc.pid), (pids, server.log())
    assert server.alive(), server.log()
    server.stop()
    assert_one_worker_migrated(server.log(), pids, revisions, app_logger)


# The tests ------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [4, 8])
def test_gunicorn_workers_all_boot_and_migrate_once(
    start_server: StartServer, tmp_path: Path, workers: int
) -> None:
    db = tmp_path / "app.db"
    server = start_server(gunicorn(workers), cwd=FLASK_DIR, env={"APP_DATABASE": str(db)})
    check_server(server, workers, "flask_app", DEMO_REVISIONS)
    assert query(db, "SELECT version_num FROM alembic_version") == [("0008",)]
    assert_migrated_once(db)


def test_uvicorn_workers_all_boot_and_migrate_once(
    start_server: StartServer, tmp_path: Path
) -> None:
    db = tmp_path / "app.db"
    server = start_server(uvicorn(4), cwd=FASTAPI_DIR, env={"APP_DATABASE": str(db)})
    check_server(server, 4, "fastapi_app", DEMO_REVISIONS)
    assert query(db, "SELECT version_num FROM alembic_version") == [("0008",)]
    assert_migrated_once(db)


def test_gunicorn_preload_migrates_once_in_the_master(
    start_server: StartServer, tmp_path: Path
) -> None:
    """With --preload the app factory runs once, in the master, before the fork."""
    db = tmp_path / "app.db"
    server = start_server(gunicorn(4, "app:create_app()", "--preload"), cwd=FLASK_DIR,
                          env={"APP_DATABASE": str(db)})
    wait_until_serving(server)
    wait_until_alive_after(server, ALIVE_AFTER_S)
    pids = worker_pids_answering(server, 4)
    assert len(pids) == 4, (pids, server.log())
    server.stop()
    by_pid = parse_log(server.log(), "flask_app")
    master = by_pid[server.proc.pid]
    assert master.applied == DEMO_REVISIONS, server.log()
    assert all(not by_pid[pid].applied and not by_pid[pid].found_done
               for pid in pids if pid in by_pid), server.log()
    assert_migrated_once(db)


def slow_project(root: Path, waiters_of: Path | None = None) -> Project:
    """A copy of the demo project whose chain ends with the slow revision 0009: it sleeps
    SLOW_SECONDS, or with ``waiters_of`` (a database) it lasts until another worker waits
    for that database's run lock, which proves that worker looked while 0009 ran."""
    make_project(root)
    project = Project(root)
    body = SLOW_REVISION_BODY
    if waiters_of is not None:
        body = waiting_for_lock_waiters(f"{waiters_of}.migration-lock", 1, 60) + INSERT_0009
    project.add_revision("0009", "0008", body)
    return project


def test_gunicorn_workers_wait_for_a_slow_migration(
    start_server: StartServer, tmp_path: Path
) -> None:
    """The forced race of the control below, with the library: the worker running 0009
    holds the lock until another waits for it; the others find the work done, and boot."""
    db = tmp_path / "app.db"
    project = slow_project(tmp_path / "proj", waiters_of=db)
    server = start_server(gunicorn(4), cwd=FLASK_DIR,
                          env={"APP_DATABASE": str(db), "APP_ALEMBIC_INI": str(project.ini)})
    check_server(server, 4, "flask_app", [*DEMO_REVISIONS, "0009"])
    assert "All migrations already applied by another worker" in server.log()
    assert query(db, "SELECT version_num FROM alembic_version") == [("0009",)]
    assert_migrated_once(db, {"0005": 1, "0009": 1})


CONTROL_APP = '''\
"""The Flask example with Alembic's own command.upgrade in place of the library's."""
from alembic import command

import alembic_sqlite_lock


def plain_upgrade(config, revision="head", **_settings):
    command.upgrade(config, revision)
    return []


alembic_sqlite_lock.upgrade = plain_upgrade

from app import create_app  # noqa: E402  (examples/flask_app/app.py, after the swap)
'''


def test_control_plain_alembic_upgrade_races_every_time(
    start_server: StartServer, tmp_path: Path
) -> None:
    """Same app, same gunicorn, Alembic's stock env.py and command.upgrade: the checks fail.

    Deterministic, not lucky: gunicorn forks its workers together and each runs the app
    factory at once; the first to reach 0009 sleeps in it for SLOW_SECONDS with nothing
    locked, so every worker that boots meanwhile reads a version older than 0009 and
    runs migrations again. Each such run must fail (STOCK_RACE_SYMPTOM lists how), so a worker
    fails to boot and gunicorn's master shuts down.
    """
    project = slow_project(tmp_path / "proj")
    shutil.copyfile(STOCK_ENV_PY, project.env_py)
    (tmp_path / "control_app.py").write_text(CONTROL_APP)
    db = tmp_path / "app.db"
    server = start_server(
        gunicorn(4, "control_app:create_app()", "--pythonpath", str(tmp_path)),
        cwd=FLASK_DIR,
        env={"APP_DATABASE": str(db), "APP_ALEMBIC_INI": str(project.ini)},
    )
    try:
        returncode = server.proc.wait(timeout=BOOT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the race went unnoticed: gunicorn is still up:\n{server.log()}")
    log = server.log()
    assert returncode != 0, log
    assert "Worker failed to boot" in log, log
    assert STOCK_RACE_SYMPTOM.search(log), log


# Logging inside the app -----------------------------------------------------------------------

AFTER_START_UP = """\
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(name)s: %(message)s")
sys.path.insert(0, {flask_dir!r})
import app as example

flask_app = example.create_app()
example.log.info("still logging after start-up")
print("health", flask_app.test_client().get("/health").status_code)
"""


def run_app_once(tmp_path: Path, project: Project) -> subprocess.CompletedProcess[str]:
    """The Flask app's factory in a fresh interpreter (fileConfig would leak into pytest)."""
    return subprocess.run(
        [sys.executable, "-c", AFTER_START_UP.format(flask_dir=str(FLASK_DIR))],
        env={**os.environ, "APP_DATABASE": str(tmp_path / "app.db"),
             "APP_ALEMBIC_INI": str(project.ini)},
        capture_output=True, text=True, timeout=120, check=False,
    )


def test_app_logger_still_emits_after_the_upgrade_ran_env_py(
    project: Project, tmp_path: Path
) -> None:
    """This repository's env.py calls fileConfig only under Alembic's command line."""
    result = run_app_once(tmp_path, project)
    assert result.returncode == 0, result.stderr
    assert re.search(r"^alembic_sqlite_lock[\w.]*: Applied migration: 0008$", result.stdout, re.M)
    assert re.search(r"^flask_app: Worker \d+ ready at 0008", result.stdout, re.M)
    assert "flask_app: still logging after start-up" in result.stdout
    assert "health 200" in result.stdout


def test_control_stock_fileconfig_in_env_py_silences_the_app_logger(
    project: Project, tmp_path: Path
) -> None:
    """Alembic's template calls fileConfig() unconditionally, which disables every logger
    that already exists: the app's logger goes quiet, which the test above would catch."""
    env_py = project.env_py.read_text()
    guarded = re.search(r"^if config\.config_file_name.*\n(.*)\n", env_py, re.M)
    assert guarded is not None
    project.env_py.write_text(
        env_py.replace(guarded[0], "fileConfig(config.config_file_name)\n")
    )
    result = run_app_once(tmp_path, project)
    assert result.returncode == 0, result.stderr
    assert "health 200" in result.stdout  # the app works...
    assert "still logging after start-up" not in result.stdout + result.stderr  # ...mute
    assert "ready at 0008" not in result.stdout + result.stderr
