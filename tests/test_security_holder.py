"""The holder record in a folder that other users may write: each attack staged for real.

Run as root (as the library often is, in containers), with a second user (the
`unprivileged` fixture, setpriv) planting links, FIFOs and forged records in a 2775
folder beside the database. The old code opened ``<db>.migration-holder.<pid>.tmp`` with
``open(tmp, "w")``, read the record with an unbounded ``json.load`` and believed any pid
it named; each test below failed against it.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Project, Unprivileged, held_flock, make_project

from alembic_sqlite_lock._backends._sqlite import _holder
from alembic_sqlite_lock._backends._sqlite._holder import Holder

CLI = str(Path(sys.executable).with_name("alembic-sqlite-lock"))
ALEMBIC = str(Path(sys.executable).with_name("alembic"))

CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
"""Any control character but the newline that ends a line (C0, DEL, C1, bidi)."""


@pytest.fixture
def as_root() -> None:
    """Staging these attacks needs two users: root (the worker) and the planter."""
    if os.geteuid() != 0:
        reason = "needs root: a second user plants files beside root's database"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason} (CI=true: these tests must run)")
        pytest.skip(reason)


def run(args: list[str], cwd: Path, *, timeout: float = 60,
        prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """A command that must finish: a hang (a FIFO opened, a wait without end) fails the
    test at ``timeout`` instead of hanging the suite."""
    return subprocess.run([*prefix, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, check=False)


def shared_project(shared_dir: Path, user: Unprivileged) -> tuple[Path, Path]:
    """A project whose database is ``shared_dir/data/app.db``, ``data`` a 2775 folder of
    root's that the second user's group may write (so that the user can plant files)."""
    ini = make_project(shared_dir / "proj")
    data = shared_dir / "data"
    data.mkdir()
    os.chown(data, 0, user.gid)
    data.chmod(0o2775)
    ini.write_text(ini.read_text().replace("sqlite:///%(here)s/app.db",
                                           f"sqlite:///{data / 'app.db'}"))
    return ini, data / "app.db"


def record_of(db: Path) -> str:
    return str(db) + _holder.SUFFIX


def assert_no_control(text: str) -> None:
    found = CONTROL.search(text)
    assert found is None, f"a raw control character {found.group()!r} in:\n{text!r}"


# (a) Links planted where the worker writes --------------------------------------------

def test_links_planted_at_temporary_names_are_never_followed(
    shared_dir: Path, unprivileged: Unprivileged, as_root: None
) -> None:
    """The second user plants links at the old predictable temporary names (for the next
    few thousand pids) and at other plausible names, half to a victim file of root's,
    half dangling into the victim's folder: a real run changes and creates nothing
    there."""
    ini, db = shared_project(shared_dir, unprivileged)
    victim_dir = shared_dir / "victim"
    victim_dir.mkdir(mode=0o755)
    victim = victim_dir / "shadow"
    victim.write_bytes(b"root:$6$secret:19000:0:99999:7:::\n")
    victim.chmod(0o640)
    victim_before = (victim.read_bytes(), os.stat(victim))

    record = record_of(db)
    probe = subprocess.Popen(["true"])
    probe.wait()
    names = [f"{record}.{pid}.tmp" for pid in range(probe.pid + 1, probe.pid + 3000)]
    names += [record, f"{record}.tmp", f"{db}.tmp", f"{db.parent}/.{db.name}{_holder.SUFFIX}.tmp"]
    for number, name in enumerate(names):
        target = victim if number % 2 else victim_dir / f"created-{number}"
        os.symlink(target, name)
        os.lchown(name, unprivileged.uid, unprivileged.gid)

    result = run([ALEMBIC, "-c", str(ini), "upgrade", "head"], ini.parent, timeout=120)

    assert result.returncode == 0, result.stderr
    assert victim.read_bytes() == victim_before[0]
    after = os.stat(victim)
    assert (after.st_mode, after.st_uid, after.st_gid, after.st_mtime_ns) == (
        victim_before[1].st_mode, victim_before[1].st_uid, victim_before[1].st_gid,
        victim_before[1].st_mtime_ns)
    assert sorted(os.listdir(victim_dir)) == ["shadow"]  # nothing made at a dangling link
    # The link at the record's own name was replaced by the record (a rename), which was
    # removed at the end; every other planted link is still there, untouched.
    assert not os.path.lexists(record)
    planted = {os.path.basename(name) for name in names if name != record}
    assert set(os.listdir(db.parent)) == planted | {"app.db", "app.db.migration-lock"}
    for name in names:
        if name != record:
            assert os.path.islink(name), name


# (b), (c) Not a regular file at the record's name ---------------------------------------

def _plant(kind: str, path: str) -> None:
    if kind == "a FIFO":
        os.mkfifo(path, 0o666)
    elif kind == "a link to /dev/zero":
        os.symlink("/dev/zero", path)
    elif kind == "a folder":
        os.mkdir(path)
    else:  # an oversized record: valid JSON, a megabyte of it
        record = _holder.this_process(["0007"], ["0008"]).as_dict()
        record["padding"] = "x" * (1 << 20)
        Path(path).write_text(json.dumps(record))


def _limit_memory() -> None:
    # The old unbounded read of /dev/zero grew to 1.35 GB before a MemoryError.
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))


@pytest.mark.parametrize("kind", ["a FIFO", "a link to /dev/zero", "a folder",
                                  "an oversized record"])
def test_status_and_waiters_ignore_what_is_not_a_small_regular_record(
    project: Project, kind: str
) -> None:
    assert project.alembic("upgrade", "0007").returncode == 0
    record = record_of(project.db)
    _plant(kind, record)

    text = subprocess.run([CLI, "status"], cwd=project.root, capture_output=True, text=True,
                          timeout=60, check=False, preexec_fn=_limit_memory)
    assert text.returncode == 0, text.stderr
    assert "Migration:  none running\n" in text.stdout + "\n"
    report = run([CLI, "status", "--json"], project.root)
    assert report.returncode == 0, report.stderr
    assert json.loads(report.stdout)["holder"] is None

    with held_flock(Path(str(project.db) + ".migration-lock")):
        started = time.monotonic()
        waiter = run([CLI, "upgrade", "--deadline_s", "1", "--busy_timeout_s", "0.2",
                      "--wait_while_holder_alive", "true"], project.root)
        assert waiter.returncode == 3, waiter.stdout + waiter.stderr
        assert time.monotonic() - started < 30  # its 1 s deadline, give or take startup
        assert "Could not take the migration lock" in waiter.stderr
        assert "held by" not in waiter.stderr
        running = run([CLI, "status"], project.root)
        assert "Migration:  running (holder not recorded yet)" in running.stdout

    # The next real run writes its record over the FIFO, link or file (a rename), and
    # removes it at the end; a folder it cannot replace is left, the run goes on.
    result = project.alembic("upgrade", "head")
    assert result.returncode == 0, result.stderr
    assert project.version() == ["0008"]
    if kind == "a folder":
        assert os.path.isdir(record)
    else:
        assert not os.path.lexists(record)
    assert os.path.exists("/dev/zero")


# (d) The record's mode and owner ----------------------------------------------------------

@pytest.fixture
def parked(shared_dir: Path, unprivileged: Unprivileged) -> Iterator[Parked]:
    parked = Parked(shared_dir, unprivileged)
    try:
        yield parked
    finally:
        parked.release()


class Parked:
    """A real `alembic upgrade head` under umask 000, parked inside revision 0009 (after
    the record is written, before the lock is let go) until released."""

    def __init__(self, shared_dir: Path, user: Unprivileged) -> None:
        self.user = user
        self.ini = make_project(shared_dir / "proj")
        self.db = self.ini.parent / "app.db"
        done = run([ALEMBIC, "-c", str(self.ini), "upgrade", "head"], self.ini.parent)
        assert done.returncode == 0, done.stderr
        (self.ini.parent / "app.db.migration-lock").unlink()
        self.gate = shared_dir / "gate"
        self.gate.mkdir()
        self.gate.chmod(0o777)
        Project(self.ini.parent).add_revision(
            "0009", "0008",
            f"import os, pathlib, time\npathlib.Path({str(self.gate / 'parked')!r}).touch()\n"
            f"while not os.path.exists({str(self.gate / 'go')!r}):\n"
            "    time.sleep(0.01)\nop.add_column('users', sa.Column('nickname', sa.Text()))",
        )
        self.proc: subprocess.Popen[str] | None = None

    def start(self, *, as_user: bool) -> None:
        prefix = self.user.prefix if as_user else []
        self.proc = subprocess.Popen(  # setpriv and alembic inherit the umask
            [*prefix, ALEMBIC, "-c", str(self.ini), "upgrade", "head"], umask=0,
            cwd=self.ini.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        deadline = time.monotonic() + 60
        while not (self.gate / "parked").exists():
            assert self.proc.poll() is None, self.proc.communicate()
            assert time.monotonic() < deadline, "the holder never parked in 0009"
            time.sleep(0.01)

    def release(self) -> None:
        (self.gate / "go").touch()
        if self.proc is None:
            return
        try:
            _out, err = self.proc.communicate(timeout=60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        assert self.proc.returncode == 0, err


@pytest.mark.parametrize(("runner", "database_owner"), [
    ("root", "root"), ("root", "the second user"), ("the second user", "the second user"),
])
def test_the_record_grants_no_more_than_the_database_under_umask_000(
    parked: Parked, runner: str, database_owner: str, as_root: None
) -> None:
    user = parked.user
    if database_owner != "root":
        for path in [parked.ini.parent, *parked.ini.parent.rglob("*")]:
            user.chown(path)
    parked.db.chmod(0o600)

    parked.start(as_user=runner != "root")

    info = os.stat(record_of(parked.db), follow_symlinks=False)
    assert oct(info.st_mode & 0o7777) == oct(0o600)
    expected = (0, 0) if database_owner == "root" else (user.uid, user.gid)
    assert (info.st_uid, info.st_gid) == expected
    parked.release()
    assert not os.path.lexists(record_of(parked.db))


# (e) Forged records ------------------------------------------------------------------------

def _pid_1_here() -> dict[str, object]:
    """A record naming pid 1 that the old code proved alive: this host, boot and pid
    namespace, pid 1's own start time."""
    here = _holder.Identity.here()
    return Holder(host=here.host, pid=1, process_start=_holder.process_start(1),
                  since=time.time(), from_revisions=["0007"], to_revisions=["0008"],
                  boot_id=here.boot_id, pid_namespace=here.pid_namespace).as_dict()


def _forged(kind: str) -> dict[str, object]:
    record = _pid_1_here()
    if kind == "control characters":
        record["host"] = f"{socket.gethostname()}\x1b[2J\x1b]0;pwned\x07\n[INFO] FORGED"
        record["to_revisions"] = ["0008\x1b[31m", "\u202eevil", "a\r\nFORGED: b"]
    elif kind == "a huge pid":
        record["pid"] = 10**30
        record["since"] = 1e300
    return record


LOCK_HOLDER = """\
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.read()
"""


@pytest.mark.parametrize("writer", ["the second user", "root"])
@pytest.mark.parametrize("kind", ["pid 1", "control characters", "a huge pid"])
def test_a_forged_record_is_not_believed_shown_raw_or_waited_on(
    shared_dir: Path, unprivileged: Unprivileged, as_root: None, writer: str, kind: str
) -> None:
    """The second user can write the folder and read the lock file, so it can take the
    run lock and write a record. Written by that user the record is not believed at all;
    written by root (trusted) a malformed one is ignored, and one naming pid 1 is shown
    but never waited on past the deadline: pid 1 does not hold the run lock."""
    ini, db = shared_project(shared_dir, unprivileged)
    assert run([ALEMBIC, "-c", str(ini), "upgrade", "0007"], ini.parent).returncode == 0
    lock = Path(str(db) + ".migration-lock")
    lock.chmod(0o644)  # readable by all, as a 0644 database's lock file may well be
    record = record_of(db)
    text = json.dumps(_forged(kind))
    if writer == "root":
        Path(record).write_text(text)
    else:
        wrote = run([sys.executable, "-c",
                     "import sys; open(sys.argv[1], 'x').write(sys.argv[2])", record, text],
                    shared_dir, prefix=tuple(unprivileged.prefix))
        assert wrote.returncode == 0, wrote.stderr
        assert os.stat(record).st_uid == unprivileged.uid

    holder = subprocess.Popen([*unprivileged.prefix, sys.executable, "-c", LOCK_HOLDER,
                               str(lock)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "held\n"
        believed = writer == "root" and kind == "pid 1"

        status = run([CLI, "status"], ini.parent)
        assert status.returncode == 0, status.stderr
        assert_no_control(status.stdout + status.stderr)
        assert "FORGED" not in status.stdout
        if believed:
            assert f"Migration:  running: pid 1 on {socket.gethostname()}, 0007 -> 0008" \
                in status.stdout
        else:
            assert "Migration:  running (holder not recorded yet)" in status.stdout

        report = run([CLI, "status", "--json"], ini.parent)
        assert report.returncode == 0, report.stderr
        assert_no_control(report.stdout.replace("\n", " ") + report.stderr)
        shown = json.loads(report.stdout)["holder"]
        assert (shown and shown["pid"]) == (1 if believed else None)

        started = time.monotonic()
        waiter = run([CLI, "upgrade", "--deadline_s", "1", "--busy_timeout_s", "0.2",
                      "--wait_while_holder_alive", "true"], ini.parent)
        assert waiter.returncode == 3, waiter.stdout + waiter.stderr
        assert time.monotonic() - started < 30  # its 1 s deadline, not pid 1's lifetime
        assert "Could not take the migration lock" in waiter.stderr
        assert "holder is alive on this host" not in waiter.stderr
        assert "Traceback" not in waiter.stderr
        assert_no_control(waiter.stdout + waiter.stderr)
        assert ("held by pid 1 on " in waiter.stderr) is believed
    finally:
        holder.communicate("", timeout=30)


# The checks themselves -------------------------------------------------------------------

def test_printable_escapes_every_control_character() -> None:
    assert _holder.printable("web-2") == "web-2"
    assert _holder.printable("a\nb\x1b[31m\x9b\u202e\x00") == "a\\nb\\x1b[31m\\x9b\\u202e\\x00"
    holder = Holder(host="web\x1b[2J", pid=7, process_start=None, since=0.0,
                    from_revisions=["a\nb"], to_revisions=["c"])
    assert_no_control(_holder.describe(holder, now=1.0))


GOOD = {"host": "web-2", "pid": 4711, "process_start": 123, "since": 1.7e9,
        "from_revisions": ["a1"], "to_revisions": ["b2"], "boot_id": None,
        "pid_namespace": "pid:[4026531836]"}


@pytest.mark.parametrize("change", [
    {"pid": 0}, {"pid": -1}, {"pid": 4194305}, {"pid": 10**30}, {"pid": True},
    {"pid": "4711"}, {"pid": 4711.0}, {"pid": None}, {"process_start": -1},
    {"process_start": 2**64}, {"process_start": "1"}, {"since": float("inf")},
    {"since": float("nan")}, {"since": 1e300}, {"since": -1}, {"since": "now"},
    {"host": ""}, {"host": "h" * 300}, {"host": 7}, {"host": "web\n2"},
    {"host": "web\x1b[31m"}, {"host": "web\u202e"}, {"from_revisions": "a1"},
    {"to_revisions": [1]}, {"to_revisions": ["b\x07"]}, {"to_revisions": ["b"] * 2000},
    {"boot_id": ["x"]}, {"pid_namespace": "p\r"},
])
def test_an_invalid_record_counts_as_none(tmp_path: Path, change: dict[str, object]) -> None:
    path = tmp_path / ("app.db" + _holder.SUFFIX)
    path.write_text(json.dumps({**GOOD, **change}))
    assert _holder.read(str(path)) is None
    path.write_text(json.dumps(GOOD))
    assert _holder.read(str(path)) == Holder.from_dict(GOOD)


@pytest.mark.parametrize("text", ["[" * 100_000, "[1, 2]", "null", '"x"', "{", "\xff"])
def test_unparsable_records_count_as_none(tmp_path: Path, text: str) -> None:
    path = tmp_path / ("app.db" + _holder.SUFFIX)
    path.write_bytes(text.encode("latin-1"))
    assert _holder.read(str(path)) is None


def test_a_record_of_an_untrusted_user_is_not_read(
    tmp_path: Path, unprivileged: Unprivileged, as_root: None
) -> None:
    path = tmp_path / ("app.db" + _holder.SUFFIX)
    path.write_text(json.dumps(GOOD))
    os.chown(path, unprivileged.uid, unprivileged.gid)
    assert _holder.read(str(path)) is None
    (tmp_path / "app.db").touch()
    os.chown(tmp_path / "app.db", unprivileged.uid, unprivileged.gid)  # now it's theirs
    assert _holder.read(str(path)) == Holder.from_dict(GOOD)


def test_only_the_process_holding_the_run_lock_exclusively_counts(tmp_path: Path) -> None:
    lock = tmp_path / "app.db.migration-lock"
    lock.touch()
    assert not _holder.holds_run_lock(os.getpid(), str(lock))
    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # a waiter's shared lock is not the run lock
        assert not _holder.holds_run_lock(os.getpid(), str(lock))
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert _holder.holds_run_lock(os.getpid(), str(lock))
        assert not _holder.holds_run_lock(1, str(lock))
    finally:
        os.close(fd)
    assert not _holder.holds_run_lock(os.getpid(), str(lock))
    assert not _holder.holds_run_lock(os.getpid(), str(tmp_path / "missing"))
