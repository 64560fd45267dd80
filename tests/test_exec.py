"""``alembic-sqlite-lock exec -- CMD``: a command run while holding the migration lock.

Real processes on SQLite, PostgreSQL and MariaDB (the ``backend`` fixture of
test_backend_contract.py): the command's exit status is the wrapper's; N wrappers
contending at once run a non-idempotent setup once (the same commands without exec do
not); other runs and blocks wait for the command; the command's own runs and blocks,
and its children's, go on without waiting for their wrapper, while a process that only
copied the wrapper's claim waits; signals reach the command; a killed wrapper leaves
no command running unlocked, nor a child of it in a block; ``exec`` inside ``exec``
holds both databases. Waits are seen in /proc/locks or on the server, never timed.
"""

from __future__ import annotations

import inspect
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import DEMO_REVISIONS, applied_lines, assert_migrated_once
from servers import ServerProject, alembic_popen, wait_until
from test_backend_contract import Backend, MariaDB, PostgreSQL, SQLite, backend
from test_migration_lock import (
    HOLDER,
    WORKERS,
    app_url,
    lock_url,
    rows,
    seed_once,
)

from alembic_sqlite_lock._backends._mysql import lock_name
from alembic_sqlite_lock._held import ENV

__all__ = ["backend"]  # the fixture, shared with the contract tests

PY = sys.executable
CLI = str(Path(sys.executable).with_name("alembic-sqlite-lock"))
ALEMBIC = str(Path(sys.executable).with_name("alembic"))


def exec_argv(url: str, *command: str, deadline_s: float | None = None) -> list[str]:
    settings = [] if deadline_s is None else ["--deadline_s", str(deadline_s)]
    return [CLI, "exec", "--url", url, *settings, "--", *command]


def run(argv: list[str], env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          env=env, timeout=120, check=False)


def gone(pid: int) -> bool:
    """Process ``pid`` has exited (no entry, or a zombie nobody reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")


def lock_waiters(backend: Backend) -> list[int]:
    """Who waits for the migration lock of this test's database now: on SQLite the pids
    blocked in flock on the run lock file (their "->" lines in /proc/locks); on a server
    one entry (0) per waiting session, counted in this database only (other tests, and
    other suites, wait for locks on the same server at the same time)."""
    if isinstance(backend, SQLite):
        try:
            inode = str(os.stat(backend.lock_file).st_ino)
            lines = Path("/proc/locks").read_text().splitlines()
        except OSError:
            return []
        # "1: -> FLOCK  ADVISORY  WRITE 4711 fe:00:123 0 EOF"
        return [int(fields[5]) for fields in map(str.split, lines)
                if len(fields) >= 7 and fields[1:3] == ["->", "FLOCK"]
                and fields[6].rpartition(":")[2] == inode]
    assert isinstance(backend.project, ServerProject)
    if backend.name == "postgresql":
        sql = ("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
               "AND database = (SELECT oid FROM pg_database "
               "WHERE datname = current_database())")
    else:
        sql = ("SELECT count(*) FROM information_schema.processlist "
               "WHERE info LIKE 'SELECT GET_LOCK%%' AND db = DATABASE()")
    count = backend.project.query(sql)[0][0]
    assert isinstance(count, int)
    return [0] * count


def waiting_here(backend: Backend, pid: int, waiters: int = 1) -> bool:
    """Process ``pid`` waits for the migration lock now: test_migration_lock's
    ``waiting_for_lock``, made exact (a holder has the lock file open too; a server
    may be waited on by other tests). On a server: ``waiters`` sessions wait."""
    if isinstance(backend, SQLite):
        return pid in lock_waiters(backend)
    return len(lock_waiters(backend)) >= waiters


def one_paragraph_error(stderr: str) -> str:
    """The CLI's error: one line, no traceback; returns it."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("alembic-sqlite-lock: error: "), stderr
    return lines[0]


# A command that waits under the lock until released -------------------------------------
WAITS = textwrap.dedent("""\
    import os, sys, time
    running, release = sys.argv[1:3]
    with open(running + ".tmp", "w") as file:
        file.write(str(os.getpid()))
    os.replace(running + ".tmp", running)
    while not os.path.exists(release):
        time.sleep(0.01)
    """)

BLOCK = textwrap.dedent("""\
    import json, os, sys
    from alembic_sqlite_lock import migration_lock
    url, deadline_s, marker = sys.argv[1:4]
    with migration_lock(url, deadline_s=float(deadline_s)):
        with open(marker, "w") as file:
            json.dump({"pid": os.getpid(), "ppid": os.getppid()}, file)
    """)
"""A ``migration_lock()`` block that writes ``marker`` (its pid and parent's) inside."""


def block(url: str, deadline_s: float, marker: Path, env: dict[str, str] | None = None
          ) -> subprocess.CompletedProcess[str]:
    """Another process's ``migration_lock()`` block (:data:`BLOCK`), to its end."""
    return run([PY, "-c", BLOCK, url, str(deadline_s), str(marker)], env=env)


class Wrapped:
    """``alembic-sqlite-lock exec --url URL -- <WAITS>``: the wrapper holds the lock and
    its command waits until released (or killed)."""

    def __init__(self, url: str, folder: Path) -> None:
        folder.mkdir(exist_ok=True)
        self.running = folder / "running"
        self.release_file = folder / "release"
        self.log = folder / "wrapper.log"
        with self.log.open("w") as log:  # not a pipe: a command outliving us would hold it
            self.proc = subprocess.Popen(
                exec_argv(url, PY, "-c", WAITS, str(self.running), str(self.release_file)),
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            )
        wait_until(lambda: self.running.exists() or self.proc.poll() is not None,
                   "the command to start under the lock")
        assert self.proc.poll() is None, self.log.read_text()
        self.command_pid = int(self.running.read_text())

    @property
    def environment(self) -> dict[str, str]:
        """The command's environment, as a process could copy it."""
        raw = Path(f"/proc/{self.command_pid}/environ").read_bytes()
        return dict(entry.decode().split("=", 1) for entry in raw.split(b"\0") if entry)

    def release(self) -> int:
        self.release_file.touch()
        return self.proc.wait(timeout=60)

    def stop(self) -> None:
        """Teardown: nothing of ours outlives the test."""
        self.release_file.touch()
        for pid in (self.proc.pid, self.command_pid):
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(timeout=60)


@pytest.fixture
def wrapped() -> Iterator[list[Wrapped]]:
    """Wrappers a test starts (appended), stopped after it."""
    started: list[Wrapped] = []
    yield started
    for each in started:
        each.stop()


# Exit codes ------------------------------------------------------------------------------
@pytest.mark.parametrize("code", [0, 7])
def test_the_commands_exit_code_is_the_wrappers(tmp_path: Path, code: int) -> None:
    url = f"sqlite:///{tmp_path / 'app.db'}"
    done = run(exec_argv(url, "sh", "-c", f"echo out; exit {code}"))
    assert done.returncode == code, done.stderr
    assert done.stdout == "out\n"  # the command's own output, untouched
    assert f"Holding the migration lock on {url}; running sh -c" in done.stderr


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGKILL], ids=lambda s: s.name)
def test_a_command_killed_by_signal_n_gives_128_plus_n(tmp_path: Path, signum: int) -> None:
    url = f"sqlite:///{tmp_path / 'app.db'}"
    done = run(exec_argv(url, "sh", "-c", f"kill -{int(signum)} $$"))
    assert done.returncode == 128 + signum, done.stderr


def test_a_command_not_found_gives_127_and_one_not_executable_126(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'app.db'}"
    missing = run(exec_argv(url, "alsl-no-such-command"))
    assert missing.returncode == 127, missing.stderr
    assert "cannot run 'alsl-no-such-command'" in missing.stderr
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o644)
    refused = run(exec_argv(url, str(script)))
    assert refused.returncode == 126, refused.stderr
    assert f"cannot run {str(script)!r}" in refused.stderr


@pytest.mark.parametrize("tail", [[], ["--"]], ids=["nothing", "only --"])
def test_no_command_is_a_usage_error_in_one_paragraph(tmp_path: Path, tail: list[str]) -> None:
    done = run([CLI, "exec", "--url", f"sqlite:///{tmp_path / 'app.db'}", *tail])
    assert done.returncode == 2, done.stderr
    assert "No command to run" in one_paragraph_error(done.stderr)


@pytest.mark.parametrize("how", ["not a url", "bad port", "--url and -c"])
def test_a_bad_database_is_a_usage_error_and_the_command_does_not_run(
    tmp_path: Path, how: str
) -> None:
    marker = tmp_path / "ran"
    if how == "not a url":
        argv = [CLI, "exec", "--url", "app.db", "--", "touch", str(marker)]
        named = "'app.db'"
    elif how == "bad port":
        argv = [CLI, "exec", "--url", "postgresql://u@127.0.0.1:notaport/db", "--",
                "touch", str(marker)]
        named = ("The database URL given is not a valid database URL "
                 "(postgresql://u@127.0.0.1:notaport/db): the port is not a number")
    else:
        ini = tmp_path / "alembic.ini"
        ini.write_text("[alembic]\nscript_location = x\nsqlalchemy.url = sqlite:///x.db\n")
        argv = [CLI, "exec", "--url", f"sqlite:///{tmp_path / 'app.db'}", "-c", str(ini),
                "--", "touch", str(marker)]
        named = "--url or with -c"
    done = run(argv)
    assert done.returncode == 2, done.stderr
    assert named in one_paragraph_error(done.stderr)
    assert not marker.exists()


# Exclusion ---------------------------------------------------------------------------------
SETUP_WINDOW_S = 1.0
"""seed_once's gap between its look and its INSERT, here: wider than
test_migration_lock's 0.3 s, since these commands are new interpreters on a machine
that may be loaded, and the control must see them overlap."""

SEED_COMMAND = "\n".join([
    "import os, sys, time",
    "import sqlalchemy as sa",
    "from sqlalchemy.pool import NullPool",
    f"WINDOW_S = {SETUP_WINDOW_S}",
    textwrap.dedent(inspect.getsource(seed_once)),
    "url, gate = sys.argv[1:3]",
    "sa.create_engine(url, poolclass=NullPool).dispose()  # the driver, imported now",
    "open(os.path.join(gate, f'ready-{os.getpid()}'), 'w').close()",
    "while not os.path.exists(os.path.join(gate, 'start')):",
    "    time.sleep(0.005)",
    "seed_once(url)",
])
"""test_migration_lock's non-idempotent setup (its source: the command imports no test
module) as a command of its own, which waits at a gate before it starts."""


def seed_commands(backend: Backend, tmp_path: Path, *, under_exec: bool) -> list[int]:
    """WORKERS commands run the setup: once every one of them is either at the gate or
    (under exec) a wrapper waiting for the lock, the gate opens. Their exit codes."""
    gate = tmp_path / "gate"
    gate.mkdir()
    command = [PY, "-c", SEED_COMMAND, app_url(backend), str(gate)]
    if under_exec:
        command = exec_argv(lock_url(backend), *command, deadline_s=120)
    logs = [tmp_path / f"worker-{n}.log" for n in range(WORKERS)]
    procs = []
    for log in logs:
        with log.open("w") as out:
            procs.append(subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out,
                                          stderr=out))
    try:
        wait_until(lambda: len(list(gate.glob("ready-*"))) + len(lock_waiters(backend))
                   >= WORKERS or any(proc.poll() is not None for proc in procs),
                   "every worker to be at the gate or waiting for the lock")
        (gate / "start").touch()
        codes = [proc.wait(timeout=240) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert len(list(gate.glob("ready-*"))) == WORKERS, "a command did not start"
    if under_exec:
        assert codes == [0] * WORKERS, [log.read_text() for log in logs]
    return codes


@pytest.mark.slow  # eight commands one after the other, each a new interpreter
def test_wrappers_contending_at_once_run_a_setup_once(backend: Backend, tmp_path: Path
                                                      ) -> None:
    seed_commands(backend, tmp_path, under_exec=True)
    assert rows(app_url(backend)) == 1
    assert backend.lock_is_free()


def test_control_the_same_commands_without_exec_run_the_setup_more_than_once(
    backend: Backend, tmp_path: Path
) -> None:
    codes = seed_commands(backend, tmp_path, under_exec=False)
    # Several see the table empty and insert (or some fail on the race).
    assert any(code != 0 for code in codes) or rows(app_url(backend)) > 1, codes


def test_a_block_and_a_run_wait_for_the_command_and_then_proceed(
    backend: Backend, tmp_path: Path, wrapped: list[Wrapped]
) -> None:
    wrapped.append(wrapper := Wrapped(lock_url(backend), tmp_path / "exec"))
    held, release = tmp_path / "held", tmp_path / "release"
    other = subprocess.Popen([PY, "-c", HOLDER, lock_url(backend), str(held), str(release)],
                             stderr=subprocess.PIPE, text=True)
    migrate = alembic_popen(backend.project, "upgrade", "head")
    for proc in (other, migrate):
        wait_until(lambda p=proc: waiting_here(backend, p.pid, waiters=2)
                   or p.poll() is not None, "the block and the run to wait for the command")
    assert other.poll() is None, other.communicate()
    assert migrate.poll() is None, migrate.communicate()
    assert not held.exists()
    assert backend.project.version() == []

    assert wrapper.release() == 0
    wait_until(lambda: held.exists() or other.poll() is not None, "the block to enter")
    release.touch()
    _out, err = other.communicate(timeout=60)
    assert other.returncode == 0, err
    _out, err = migrate.communicate(timeout=120)
    assert migrate.returncode == 0, err
    assert applied_lines(err) == DEMO_REVISIONS
    assert_migrated_once(backend.project)


def test_lock_timeout_exits_3_without_running_the_command(
    backend: Backend, tmp_path: Path
) -> None:
    url = lock_url(backend)
    if backend.name == "postgresql":  # trust authentication: any password is accepted
        url = url.replace("postgres@", "postgres:s3cret@", 1)
    marker = tmp_path / "ran"
    with backend.hold_lock():
        done = run(exec_argv(url, "touch", str(marker), deadline_s=1))
    assert done.returncode == 3, done.stderr
    assert not marker.exists()
    assert backend.shown_url.split("@")[-1] in done.stderr
    assert "s3cret" not in done.stderr
    assert "Traceback" not in done.stderr


# The command's own runs and blocks -------------------------------------------------------
@pytest.mark.parametrize("inner", ["alembic-sqlite-lock upgrade", "alembic upgrade"])
def test_the_commands_own_run_migrates_without_waiting_for_its_wrapper(
    backend: Backend, inner: str
) -> None:
    ini = str(backend.project.ini)
    if inner == "alembic upgrade":  # the project's env.py, which calls run_migrations()
        command = [ALEMBIC, "-c", ini, "-x", "lock_deadline_s=1", "upgrade", "head"]
    else:
        command = [CLI, "-c", ini, "upgrade", "head", "--deadline_s", "1"]
    # A wait for the wrapper would end in LockTimeout after 1 s: exit 3.
    done = run([CLI, "exec", "-c", ini, "--", *command])
    assert done.returncode == 0, done.stderr
    assert applied_lines(done.stderr) == DEMO_REVISIONS
    assert_migrated_once(backend.project)
    assert backend.lock_is_free()


def test_control_without_the_claim_the_commands_run_waits_for_its_wrapper(
    backend: Backend,
) -> None:
    """The same command with ALEMBIC_SQLITE_LOCK_HELD taken out of its environment (on
    SQLite it still has the wrapper's descriptor): it waits for its wrapper, and times
    out. The claim, checked, is what lets the command's run go on."""
    ini = str(backend.project.ini)
    done = run([CLI, "exec", "-c", ini, "--", "env", "-u", ENV,
                CLI, "-c", ini, "upgrade", "head", "--deadline_s", "1"])
    assert done.returncode == 3, done.stderr  # the inner run's LockTimeout, passed on
    assert "Could not take the migration lock" in done.stderr
    assert backend.project.version() == []


@pytest.mark.parametrize("depth", ["child", "grandchild"])
def test_a_block_in_the_command_or_its_child_goes_on(
    backend: Backend, tmp_path: Path, depth: str
) -> None:
    marker = tmp_path / "entered"
    command = [PY, "-c", BLOCK, lock_url(backend), "1", str(marker)]
    if depth == "grandchild":  # sh must wait for python to say its status: no exec
        command = ["sh", "-c", '"$@"; exit $?', "sh", *command]
    with (tmp_path / "log").open("w") as log:
        wrapper = subprocess.Popen(exec_argv(lock_url(backend), *command),
                                   stdin=subprocess.DEVNULL, stderr=log)
        assert wrapper.wait(timeout=120) == 0, (tmp_path / "log").read_text()
    inside = json.loads(marker.read_text())
    if depth == "child":
        assert inside["ppid"] == wrapper.pid
    else:
        assert inside["ppid"] != wrapper.pid  # sh's child, not the wrapper's
    assert backend.lock_is_free()


def test_a_claim_copied_into_a_process_outside_the_wrapper_waits(
    backend: Backend, tmp_path: Path, wrapped: list[Wrapped]
) -> None:
    """A stale or copied ALEMBIC_SQLITE_LOCK_HELD names a wrapper that holds the lock,
    and its session on a server: without being the wrapper's descendant (and, on SQLite,
    without the wrapper's descriptor) it is no proof, and the block waits."""
    wrapped.append(wrapper := Wrapped(lock_url(backend), tmp_path / "exec"))
    copied = wrapper.environment
    assert json.loads(copied[ENV])["pid"] == wrapper.proc.pid
    marker = tmp_path / "entered"
    done = block(lock_url(backend), 1, marker, env=copied)
    assert done.returncode != 0
    assert "LockTimeout" in done.stderr, done.stderr
    assert not marker.exists()

    assert wrapper.release() == 0  # now the claim is stale: the lock is taken anew
    done = block(lock_url(backend), 1, marker, env=copied)
    assert done.returncode == 0, done.stderr
    assert marker.exists()
    assert backend.lock_is_free()


@pytest.mark.parametrize("at_fd", ["/dev/null", "the lock file"])
def test_sqlite_a_claimed_descriptor_that_is_not_the_wrappers_is_no_proof(
    tmp_path: Path, wrapped: list[Wrapped], at_fd: str
) -> None:
    """The claimed descriptor number is open in the process, but on another file, or on
    the lock file opened anew (its own open file description, not the wrapper's)."""
    db = tmp_path / "app.db"
    url = f"sqlite:///{db}"
    wrapped.append(wrapper := Wrapped(url, tmp_path / "exec"))
    path = "/dev/null" if at_fd == "/dev/null" else f"{db}.migration-lock"
    marker = tmp_path / "entered"
    forger = textwrap.dedent(f"""\
        import json, os
        claimed = json.loads(os.environ[{ENV!r}])["locks"][0]["fd"]
        os.dup2(os.open({path!r}, os.O_RDWR), claimed)
        """) + BLOCK
    done = subprocess.run([PY, "-c", forger, url, "1", str(marker)], env=wrapper.environment,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode != 0
    assert "LockTimeout" in done.stderr, done.stderr
    assert not marker.exists()
    assert wrapper.release() == 0


# Signals and a killed wrapper --------------------------------------------------------------
TRAPS = textwrap.dedent("""\
    import os, signal, sys, time
    running, marker = sys.argv[1:3]
    def stop(signum, _frame):
        with open(marker, "w") as file:
            file.write(signal.Signals(signum).name)
        sys.exit(42)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, stop)
    open(running, "w").close()
    while True:
        time.sleep(0.01)
    """)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP],
                         ids=lambda s: s.name)
def test_a_signal_sent_to_the_wrapper_reaches_the_command(tmp_path: Path, signum: int) -> None:
    running, marker = tmp_path / "running", tmp_path / "got"
    with (tmp_path / "log").open("w") as log:
        wrapper = subprocess.Popen(
            exec_argv(f"sqlite:///{tmp_path / 'app.db'}", PY, "-c", TRAPS, str(running),
                      str(marker)), stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        wait_until(lambda: running.exists() or wrapper.poll() is not None,
                   "the command to trap signals")
        wrapper.send_signal(signum)
        assert wrapper.wait(timeout=60) == 42, (tmp_path / "log").read_text()
    finally:
        if wrapper.poll() is None:
            wrapper.kill()
            wrapper.wait()
    assert marker.read_text() == signal.Signals(signum).name


def test_a_killed_wrapper_leaves_no_command_running_unlocked(
    backend: Backend, tmp_path: Path, wrapped: list[Wrapped]
) -> None:
    url = lock_url(backend)
    wrapped.append(wrapper := Wrapped(url, tmp_path / "exec"))
    wrapper.proc.send_signal(signal.SIGKILL)
    assert wrapper.proc.wait(timeout=60) == -signal.SIGKILL
    if isinstance(backend, SQLite):
        # The command inherited the run lock's descriptor: the lock is its now.
        assert not gone(wrapper.command_pid)
        assert not backend.lock_is_free()
        waited = block(url, 0.5, tmp_path / "entered")
        assert "LockTimeout" in waited.stderr, waited.stderr
        assert not (tmp_path / "entered").exists()
        wrapper.release_file.touch()
        wait_until(lambda: gone(wrapper.command_pid), "the command to finish")
    else:
        # The lock lived in the wrapper's session: the command dies with the wrapper.
        wait_until(lambda: gone(wrapper.command_pid), "the command to die with its wrapper")
        assert not wrapper.release_file.exists()
        wait_until(backend.lock_is_free, "the server to end the wrapper's session")
    done = block(url, 30, tmp_path / "entered")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "entered").exists()


# A lost lock, a killed wrapper's grandchild, exec inside exec ---------------------------
WAITS_THEN_BLOCK = textwrap.dedent("""\
    import os, sys, time
    from alembic_sqlite_lock import migration_lock
    url, running, go, marker = sys.argv[1:5]
    open(running, "w").close()
    while not os.path.exists(go):
        time.sleep(0.01)
    with migration_lock(url, deadline_s=1):
        open(marker, "w").close()
    """)
"""A command that, once told to go, enters a block of its own."""


def take_the_lock_away(backend: Backend) -> None:
    """The wrapper's lock is lost while it runs its command: SQLite's run lock file is
    replaced (the wrapper holds the old one); a server ends the wrapper's session (an
    administrator, a restart, a network cut)."""
    if isinstance(backend, SQLite):
        backend.lock_file.unlink()
        return
    assert isinstance(backend, (PostgreSQL, MariaDB))
    assert backend.admin is not None
    with backend.admin.connect() as connection:
        if isinstance(backend, PostgreSQL):
            ended = connection.execute(sa.text(
                "SELECT pg_terminate_backend(pid) FROM (SELECT DISTINCT pid FROM pg_locks "
                "l JOIN pg_database d ON d.oid = l.database WHERE l.locktype = 'advisory' "
                "AND l.granted AND d.datname = :db) held"), {"db": backend.database}
            ).scalars().all()
            assert ended == [True]
        else:
            session = connection.execute(
                sa.text("SELECT IS_USED_LOCK(:name)"),
                {"name": lock_name(backend.database, "alembic_version")}).scalar()
            assert session is not None
            connection.exec_driver_sql(f"KILL {int(session)}")
    wait_until(backend.lock_is_free, "the server to end the wrapper's session")


def test_a_command_whose_wrapper_lost_the_lock_waits_for_the_new_holder(
    backend: Backend, tmp_path: Path
) -> None:
    """The claim in the command's environment still names the wrapper, an ancestor, and
    the lock it took: a block of the command checks that the lock is still held for it,
    and waits for the worker that holds it now."""
    url = lock_url(backend)
    running, go, marker, log = (tmp_path / name for name in ("running", "go", "in", "log"))
    with log.open("w") as out:
        wrapper = subprocess.Popen(
            exec_argv(url, PY, "-c", WAITS_THEN_BLOCK, url, str(running), str(go),
                      str(marker)), stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    try:
        wait_until(lambda: running.exists() or wrapper.poll() is not None,
                   "the command to start under the lock")
        assert wrapper.poll() is None, log.read_text()
        take_the_lock_away(backend)
        with backend.hold_lock():  # another worker's, now
            go.touch()
            code = wrapper.wait(timeout=120)
    finally:
        if wrapper.poll() is None:
            wrapper.kill()
            wrapper.wait()
    assert code == 1, log.read_text()  # the command's LockTimeout, passed on
    assert "LockTimeout" in log.read_text()
    assert not marker.exists()


IN_A_BLOCK = textwrap.dedent("""\
    import os, sys, time
    from alembic_sqlite_lock import migration_lock
    url, running, release, done = sys.argv[1:5]
    with migration_lock(url, deadline_s=1):
        with open(running + ".tmp", "w") as file:
            file.write(str(os.getpid()))
        os.replace(running + ".tmp", running)
        while not os.path.exists(release):
            time.sleep(0.01)
        open(done, "w").close()  # the block's work, done under the lock
    """)


def test_a_killed_wrapper_leaves_no_grandchild_in_a_block_unlocked(
    backend: Backend, tmp_path: Path
) -> None:
    """The command is a shell that runs Python (``sh -c "python app.py"``, a Makefile, an
    npm script), whose child entered a block on the wrapper's lock; the wrapper is
    SIGKILLed. SQLite: the shell and its child have the run lock's descriptor, and the
    lock stays theirs until the block ends. A server: the lock dies with the wrapper's
    session, so the child must die too, before another worker holding the lock could
    see it go on in its block."""
    url = lock_url(backend)
    running, release, done = tmp_path / "running", tmp_path / "release", tmp_path / "done"
    with (tmp_path / "log").open("w") as log:
        wrapper = subprocess.Popen(
            exec_argv(url, "sh", "-c", '"$@"; exit $?', "sh", PY, "-c", IN_A_BLOCK, url,
                      str(running), str(release), str(done)),
            stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    grandchild = 0
    try:
        wait_until(lambda: running.exists() or wrapper.poll() is not None,
                   "the grandchild to enter its block")
        assert wrapper.poll() is None, (tmp_path / "log").read_text()
        grandchild = int(running.read_text())
        wrapper.send_signal(signal.SIGKILL)
        wrapper.wait(timeout=60)
        if isinstance(backend, SQLite):
            # The shell and its child have the run lock's descriptor: still held.
            assert "LockTimeout" in block(url, 0.5, tmp_path / "entered").stderr
            release.touch()
            wait_until(lambda: gone(grandchild), "the grandchild to finish")
            assert done.exists()  # its block ended under the lock
        else:
            wait_until(backend.lock_is_free, "the server to end the wrapper's session")
        entered = block(url, 30, tmp_path / "entered")
        assert entered.returncode == 0, entered.stderr  # another worker holds it now
        release.touch()
        wait_until(lambda: gone(grandchild), "the grandchild to be gone")
        if not isinstance(backend, SQLite):
            assert not done.exists(), "the grandchild went on in its block unlocked"
    finally:
        release.touch()
        if grandchild and not gone(grandchild):
            os.kill(grandchild, signal.SIGKILL)
        if wrapper.poll() is None:
            wrapper.kill()
            wrapper.wait()


@pytest.mark.parametrize("locked", ["the inner wrapper's database",
                                    "the outer wrapper's database"])
def test_sqlite_exec_inside_exec_on_another_database(tmp_path: Path, locked: str) -> None:
    """``exec --url A -- exec --url B -- CMD``: CMD runs under both locks, so its block
    on A goes on as its block on B does."""
    outer, inner = f"sqlite:///{tmp_path / 'a.db'}", f"sqlite:///{tmp_path / 'b.db'}"
    marker = tmp_path / "entered"
    target = inner if locked == "the inner wrapper's database" else outer
    done = run(exec_argv(outer, *exec_argv(inner, PY, "-c", BLOCK, target, "1", str(marker))))
    assert done.returncode == 0, done.stderr
    assert marker.exists()


AFTER_THE_WRAPPER = textwrap.dedent("""\
    import os, sys, time
    from alembic_sqlite_lock import migration_lock
    url, marker, running = sys.argv[1:4]
    wrapper = os.getppid()
    open(running, "w").close()
    while os.getppid() == wrapper:  # until the wrapper is killed
        time.sleep(0.01)
    with migration_lock(url, deadline_s=1):
        open(marker, "w").close()
    """)

KILLS_THE_WRAPPER = textwrap.dedent("""\
    import ctypes, os, signal, subprocess, sys, time
    cli, url, marker, running, command = sys.argv[1:6]
    ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphans are ours
    wrapper = subprocess.Popen([cli, "exec", "--url", url, "--", sys.executable, "-c",
                                command, url, marker, running], stdin=subprocess.DEVNULL)
    give_up = time.monotonic() + 60
    while not os.path.exists(running) and time.monotonic() < give_up:
        time.sleep(0.01)
    os.kill(wrapper.pid, signal.SIGKILL)
    wrapper.wait()
    _pid, status = os.wait()  # the command, reparented to us
    sys.exit(os.waitstatus_to_exitcode(status))
    """)


@pytest.mark.parametrize("namespace", ["the host's pid namespace",
                                       "a pid namespace of its own"])
def test_sqlite_after_the_wrapper_is_killed_the_commands_blocks_go_on(
    tmp_path: Path, namespace: str
) -> None:
    """The command inherited the run lock's descriptor and holds the lock once its
    wrapper is SIGKILLed: its own later blocks must not wait for itself. In a pid
    namespace of its own (a container), /proc/locks no longer shows the dead wrapper's
    lock, so the check cannot rely on it."""
    prefix: list[str] = []
    if namespace == "a pid namespace of its own":
        prefix = ["unshare", "--pid", "--fork", "--mount-proc"]
        probe = subprocess.run([*prefix, "true"], capture_output=True, check=False)
        if probe.returncode != 0:
            pytest.skip(f"cannot make a pid namespace: {probe.stderr.decode().strip()}")
    marker = tmp_path / "entered"
    done = run([*prefix, PY, "-c", KILLS_THE_WRAPPER, CLI, f"sqlite:///{tmp_path / 'app.db'}",
                str(marker), str(tmp_path / "running"), AFTER_THE_WRAPPER])
    assert done.returncode == 0, done.stderr
    assert marker.exists()
