"""The run lock file next to a directory other users may write: each attack staged for real.

The library often runs as root beside a shared data folder. Whatever sits at
``<db>.migration-lock`` (a symlink, a FIFO, a file this user may not open, a file someone
holds or swaps) must never make a run believe it holds a lock it does not hold, never
make root create or open a file elsewhere, and never hang a run or ``status``.
Real files, real processes; a second user through setpriv (the `unprivileged` fixture).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import stat
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
from conftest import Project, Unprivileged, make_project, write_lock_held
from faultkit import ALEMBIC, has_open, schema, snapshot, start_cli, wait_for
from test_alembic_features import env_with
from test_permissions import assert_clean_failure

from alembic_sqlite_lock._backends._sqlite._runlock import SUFFIX, RunLock, run_lock_held

CLI = str(Path(sys.executable).with_name("alembic-sqlite-lock"))
PYTHON = sys.executable


def lock_file(project: Project) -> Path:
    return Path(str(project.db) + SUFFIX)


def warnings_in(log: str) -> list[str]:
    return [line for line in log.splitlines()
            if line.startswith("WARN") and "The run lock file" in line]


def as_root() -> None:
    """Staging another user's files needs root; CI runs as root and must not skip."""
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("this test must run as root in CI")
        pytest.skip("needs root to stage files of another user")


# (a) A symlink planted at the lock file's name ------------------------------------------

def test_a_symlink_at_the_lock_path_creates_nothing_at_its_target(
    project: Project, tmp_path: Path
) -> None:
    victim = tmp_path / "victim"  # root would have created it, empty, through O_CREAT
    lock_file(project).symlink_to(victim)

    result = project.alembic("upgrade", "head")

    assert result.returncode == 0, result.stdout + result.stderr
    assert not victim.exists()
    assert not victim.is_symlink()
    assert project.version() == ["0008"]
    [warning] = warnings_in(result.stderr)
    assert f"The run lock file {lock_file(project)} is a symbolic link" in warning
    assert f"rm {lock_file(project)}" in warning
    assert lock_file(project).is_symlink()  # left for the operator to look at
    assert run_lock_held(str(lock_file(project))) is None  # status: cannot tell


def test_a_symlink_to_an_existing_file_leaves_that_file_alone(
    project: Project, tmp_path: Path
) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    victim.chmod(0o600)
    lock_file(project).symlink_to(victim)

    result = project.alembic("upgrade", "head")

    assert result.returncode == 0, result.stdout + result.stderr
    assert victim.read_text() == "precious\n"
    assert stat.S_IMODE(victim.stat().st_mode) == 0o600
    assert len(warnings_in(result.stderr)) == 1


# (b) A FIFO: nothing may block on it ----------------------------------------------------

def test_a_fifo_at_the_lock_path_blocks_neither_upgrade_nor_status(project: Project) -> None:
    os.mkfifo(lock_file(project))

    # A hang fails the test through the subprocess timeout.
    result = project.alembic("upgrade", "head", timeout=60)

    assert result.returncode == 0, result.stdout + result.stderr
    assert project.version() == ["0008"]
    [warning] = warnings_in(result.stderr)
    assert f"The run lock file {lock_file(project)} is not a regular file (a FIFO)" in warning
    assert "goes on under SQLite's write lock alone" in warning

    status = subprocess.run([CLI, "status"], cwd=project.root, capture_output=True,
                            text=True, timeout=60, check=False)
    assert status.returncode == 0, status.stdout + status.stderr
    assert (f"Migration:  cannot tell: the run lock file {lock_file(project)} is not a "
            "regular file (a FIFO)") in status.stdout
    assert stat.S_ISFIFO(os.lstat(lock_file(project)).st_mode)


def test_a_folder_at_the_lock_path_refuses_a_run_that_needs_the_lock(project: Project) -> None:
    lock_file(project).mkdir()
    project.env_py.write_text(
        "from alembic import context\n"
        "from alembic_sqlite_lock import run_migrations\n"
        "run_migrations(context, None, transaction_per_migration=True)\n"
    )

    result = project.alembic("upgrade", "head")

    assert_clean_failure(
        result, f"the run lock file {lock_file(project)} is not a regular file (a folder)",
        "transaction_per_migration", "Nothing was migrated.", f"rm {lock_file(project)}",
    )
    assert project.version() == []
    assert "users" not in project.tables()


# (c) A lock file the run's user may not open (root's, 0600) ----------------------------

def user_database(root: Path, user: Unprivileged, revision: str = "0008") -> Project:
    """A project in ``root`` (its folder the user's) whose database, owned by the user,
    is at ``revision``; no lock file."""
    make_project(root)
    project = Project(root)
    done = project.alembic("upgrade", revision)
    assert done.returncode == 0, done.stderr
    lock_file(project).unlink()
    user.chown(root)
    user.chown(project.db)
    return project


def root_only_lock_file(project: Project) -> None:
    path = lock_file(project)
    path.touch()
    os.chown(path, 0, 0)
    path.chmod(0o600)


def start_as(user: Unprivileged, project: Project, *args: str) -> subprocess.Popen[str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(project.root),
           "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.Popen([*user.prefix, ALEMBIC, "-c", str(project.ini), *args],
                            cwd=project.root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(procs: list[subprocess.Popen[str]]) -> list[subprocess.CompletedProcess[str]]:
    done = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return done


def test_an_unopenable_lock_file_refuses_autocommit_block_in_every_worker(
    shared_dir: Path, unprivileged: Unprivileged
) -> None:
    as_root()
    project = user_database(shared_dir / "proj", unprivileged)
    markers = shared_dir / "proj" / "markers"
    markers.mkdir()
    unprivileged.chown(markers)
    project.add_revision("0009", "0008", textwrap.dedent(f"""\
        with op.get_context().autocommit_block():
            pathlib.Path({str(markers)!r}, f"0009.{{os.getpid()}}").touch()
            op.execute("CREATE TABLE IF NOT EXISTS backfilled (x INTEGER)")
        """), header="import os, pathlib")
    root_only_lock_file(project)
    before = (schema(project.db), project.version(), snapshot(project.root))

    results = finish([start_as(unprivileged, project, "upgrade", "head") for _ in range(2)])

    for result in results:
        assert_clean_failure(
            result, f"the run lock file {lock_file(project)} cannot be opened by user "
            f"{unprivileged.name}", "autocommit_block()", "nothing was migrated",
            f"chown --reference={project.db} {lock_file(project)}",
        )
    assert list(markers.iterdir()) == []  # the block never ran
    assert (schema(project.db), project.version(), snapshot(project.root)) == before
    assert stat.S_IMODE(lock_file(project).stat().st_mode) == 0o600  # left as it was


def test_an_unopenable_lock_file_still_lets_one_transaction_migrate_once(
    shared_dir: Path, unprivileged: Unprivileged
) -> None:
    as_root()
    project = user_database(shared_dir / "proj", unprivileged, "0004")
    markers = shared_dir / "proj" / "markers"
    markers.mkdir()
    unprivileged.chown(markers)
    project.add_revision("0009", "0008", textwrap.dedent(f"""\
        pathlib.Path({str(markers)!r}, f"0009.{{os.getpid()}}").touch()
        op.add_column("users", sa.Column("nickname", sa.Text()))
        """), header="import os, pathlib")
    root_only_lock_file(project)

    results = finish([start_as(unprivileged, project, "upgrade", "head") for _ in range(2)])

    for result in results:
        assert result.returncode == 0, result.stdout + result.stderr
        assert "Traceback" not in result.stderr
        # Once per run, not once per attempt (a worker that came late took no lock).
        assert len(warnings_in(result.stderr)) <= 1
    assert project.version() == ["0009"]
    assert len(list(markers.iterdir())) == 1  # exactly one worker ran the chain
    [migrated] = [r for r in results if "Applied migration: 0009" in r.stderr]
    [warning] = warnings_in(migrated.stderr)
    assert f"{lock_file(project)} cannot be opened by user {unprivileged.name}" in warning
    assert "(Permission denied; it belongs to uid 0 with mode 0600)" in warning
    assert "goes on under SQLite's write lock alone" in warning


# (d) Created by root, the lock file is the database owner's ---------------------------

def test_root_creates_the_lock_file_with_the_database_owner_and_mode(
    shared_dir: Path, unprivileged: Unprivileged
) -> None:
    as_root()
    project = user_database(shared_dir / "proj", unprivileged, "0004")
    project.db.chmod(0o640)

    result = project.alembic("upgrade", "head")  # as root

    assert result.returncode == 0, result.stdout + result.stderr
    info = lock_file(project).stat()
    assert (info.st_uid, info.st_gid) == (unprivileged.uid, unprivileged.gid)
    assert stat.S_IMODE(info.st_mode) == 0o640
    assert warnings_in(result.stderr) == []
    # So the app's own user locks it on its next run, with no warning.
    project.add_revision("0009", "0008", "op.add_column('users', sa.Column('n', sa.Text()))")
    again = unprivileged.alembic(project.ini, "upgrade", "head")
    assert again.returncode == 0, again.stdout + again.stderr
    assert warnings_in(again.stderr) == []
    assert project.version() == ["0009"]


# (e) The lock file swapped under a holder -----------------------------------------------

WAITER = textwrap.dedent("""\
    import sys
    from alembic_sqlite_lock._backends._sqlite._runlock import RunLock
    lock = RunLock(sys.argv[1])
    print("held" if lock.acquire(120) else "busy", flush=True)
    sys.stdin.read()  # keeps it until the test closes stdin
    """)


def hold(path: Path) -> int:
    """Another holder: its own open file description, flock taken."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def test_a_waiter_on_a_swapped_lock_file_waits_for_the_file_at_the_path(
    tmp_path: Path,
) -> None:
    path = tmp_path / ("app.db" + SUFFIX)
    old = tmp_path / "moved-away"
    first = hold(path)
    waiter = subprocess.Popen([PYTHON, "-c", WAITER, str(path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    second = None
    try:
        wait_for(lambda: has_open(waiter.pid, path), "the waiter opening the lock file")
        path.rename(old)  # someone who may write the folder swaps the file...
        second = hold(path)  # ...and a second holder takes the new one
        os.close(first)  # the first holder lets go of the old file

        # The waiter got the old file, saw it is no longer the one at the path, and now
        # waits for the new one, which the second holder has: it does not get in.
        wait_for(lambda: has_open(waiter.pid, path) and not has_open(waiter.pid, old),
                 "the waiter leaving the swapped-away file for the one at the path")
        assert waiter.stdout is not None
        assert select.select([waiter.stdout], [], [], 0)[0] == []  # nothing printed
        assert waiter.poll() is None

        os.close(second)
        second = None
        assert waiter.stdout.readline() == "held\n"
    finally:
        for fd in (first, second):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        waiter.kill()
        waiter.communicate()


def test_a_worker_does_not_migrate_while_a_holder_of_a_swapped_file_runs(
    project: Project, tmp_path: Path
) -> None:
    """The swap lets a newcomer take the new file at once; SQLite's write lock still
    keeps it out while the holder's transaction runs, and it finds the work done."""
    assert project.alembic("upgrade", "head").returncode == 0
    gate, parked = tmp_path / "go", tmp_path / "parked"
    project.add_revision("0009", "0008", textwrap.dedent(f"""\
        pathlib.Path({str(parked)!r}).touch()
        while not os.path.exists({str(gate)!r}):
            time.sleep(0.01)
        op.add_column("users", sa.Column("nickname", sa.Text()))
        """), header="import os, pathlib, time")
    holder = start_cli(project.ini, "upgrade", "head")
    newcomer = None
    try:
        wait_for(parked.exists, "the holder parking in 0009")
        lock_file(project).rename(tmp_path / "moved-away")
        lock_file(project).touch()
        newcomer = start_cli(project.ini, "upgrade", "head")
        wait_for(lambda: has_open(newcomer.pid, lock_file(project)),
                 "the newcomer taking the new lock file")
        assert newcomer.poll() is None
        assert project.version() == ["0008"]
        gate.touch()
        _out, err = holder.communicate(timeout=120)
        assert holder.returncode == 0, err
        _out, err = newcomer.communicate(timeout=120)
        assert newcomer.returncode == 0, err
        assert "Applying migration: 0009" not in err
        assert project.version() == ["0009"]
    finally:
        gate.touch()
        for proc in (holder, newcomer):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.mark.parametrize("commits_midway", ["autocommit_block", "transaction_per_migration"])
def test_a_holder_whose_lock_file_was_swapped_stops_at_its_next_commit_midway(
    project: Project, tmp_path: Path, commits_midway: str
) -> None:
    """Across a commit in the middle of a run, only the run lock keeps a newcomer out,
    and after a swap a newcomer takes the new file at once: the holder must stop there
    rather than go on side by side with it."""
    assert project.alembic("upgrade", "head").returncode == 0
    gate, parked, ran = tmp_path / "go", tmp_path / "parked", tmp_path / "ran-after-swap"
    park = textwrap.dedent(f"""\
        pathlib.Path({str(parked)!r}).touch()
        while not os.path.exists({str(gate)!r}):
            time.sleep(0.01)
        """)
    touch_ran = f"pathlib.Path({str(ran)!r}).touch()"
    header = "import os, pathlib, time"
    if commits_midway == "autocommit_block":
        # The block would commit 0009's transaction so far: the check comes first.
        project.add_revision("0009", "0008", park + "with op.get_context().autocommit_block():\n"
                             f"    {touch_ran}", header=header)
        stopped_at = ["0008"]
    else:
        # 0009 commits on its own; 0010 would start after that commit.
        env_with(project, "transaction_per_migration=True")
        project.add_revision("0009", "0008", park, header=header)
        project.add_revision("0010", "0009", touch_ran, header=header)
        stopped_at = ["0009"]
    holder = start_cli(project.ini, "upgrade", "head")
    try:
        wait_for(parked.exists, "the holder parking before its commit midway")
        lock_file(project).rename(tmp_path / "moved-away")
        lock_file(project).touch()
        gate.touch()
        _out, err = holder.communicate(timeout=120)
    finally:
        gate.touch()
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert holder.returncode != 0, err
    assert "Traceback" not in err
    assert f"the run lock file {lock_file(project)} was removed or replaced while this run " \
           "held it" in err, err
    assert not ran.exists()  # nothing ran after the commit the swap left unguarded
    assert project.version() == stopped_at


# (f) Any user who can read the lock file can hold it ----------------------------------

HOLDER = textwrap.dedent("""\
    import fcntl, os, sys
    fd = os.open(sys.argv[1], os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    print("holding", flush=True)
    sys.stdin.read()
    """)


def test_a_lock_held_by_another_user_times_out_naming_the_lock_file(
    shared_dir: Path, unprivileged: Unprivileged
) -> None:
    as_root()
    make_project(shared_dir / "proj")
    project = Project(shared_dir / "proj")
    assert project.alembic("upgrade", "0004").returncode == 0
    path = lock_file(project)
    assert stat.S_IMODE(path.stat().st_mode) & 0o004  # readable by all, as the database
    squatter = subprocess.Popen([*unprivileged.prefix, PYTHON, "-c", HOLDER, str(path)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert squatter.stdout is not None
        assert squatter.stdout.readline() == "holding\n"

        result = project.alembic("-x", "lock_deadline_s=2", "upgrade", "head")
    finally:
        squatter.kill()
        squatter.communicate()

    assert_clean_failure(
        result, "Could not take the migration lock on sqlite:///",
        f"another process held the run lock file {path} the whole time",
        f"`fuser -v {path}`", f"`lsof {path}`", "any user who can read that file",
    )
    assert project.version() == ["0004"]


def test_a_busy_database_keeps_the_sqlite_text(project: Project) -> None:
    assert project.alembic("upgrade", "0004").returncode == 0
    with write_lock_held(project.db):
        result = project.alembic("-x", "lock_deadline_s=1", "-x", "lock_busy_timeout_s=0.2",
                                 "upgrade", "head")
    assert_clean_failure(result, "another connection held a write lock on the database")
    assert "run lock file" not in result.stdout


# (g) An abandoned waiter's descriptor does not leak into a forked child ---------------

def test_a_forked_child_does_not_keep_an_abandoned_waiters_lock(tmp_path: Path) -> None:
    path = tmp_path / ("app.db" + SUFFIX)
    path.touch()
    # The holder is another process: a descriptor of this one would be forked too.
    holder = subprocess.Popen([PYTHON, "-c", HOLDER, str(path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "holding\n"
        waiter = RunLock(str(path))
        assert not waiter.acquire(timeout_s=0.2)  # LockTimeout in an app; its thread waits

        go_read, go_write = os.pipe()
        ready_read, ready_write = os.pipe()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork() with a thread
            pid = os.fork()
        if pid == 0:  # the child (a gunicorn worker, say) lives on with what it inherited
            try:
                os.close(go_write)
                os.close(ready_read)
                os.write(ready_write, b"r")  # the at-fork handlers have run by now
                os.read(go_read, 1)
            finally:
                os._exit(0)
        os.close(go_read)
        os.close(ready_write)
        try:
            assert os.read(ready_read, 1) == b"r"
            assert not has_open(pid, path)  # closed in the child at fork
            holder.kill()  # the parent's abandoned thread gets the lock, lets go of it
            holder.wait(timeout=30)
            late = RunLock(str(path))
            assert late.acquire(timeout_s=30)  # the child would keep it held otherwise
            late.release()
        finally:
            os.close(go_write)
            os.close(ready_read)
            os.waitpid(pid, 0)
    finally:
        holder.kill()
        holder.communicate()


# A folder others may change: checking the lock file at each commit is not enough ------

AUTOCOMMIT_ONCE = """\
with op.get_context().autocommit_block():
    pathlib.Path({marker!r}, f"0009.{{os.getpid()}}").touch()
"""


@pytest.mark.parametrize("folder_mode", [0o777, 0o2775, 0o1777],
                         ids=["0777", "2775", "1777 with their lock file"])
def test_a_run_that_commits_midway_is_refused_in_a_folder_others_may_change(
    project: Project, unprivileged: Unprivileged, tmp_path: Path, folder_mode: int
) -> None:
    """A second review swapped the lock file with a decoy 5000 times a second: each
    worker's check before and after its autocommit block passed, and two workers ran
    the block. In a folder others may rename files in, no check can exclude that, so a
    run that commits midway is refused there; a run in one transaction goes on."""
    as_root()
    assert project.alembic("upgrade", "head").returncode == 0
    markers = tmp_path / "markers"
    markers.mkdir()
    project.add_revision("0009", "0008", AUTOCOMMIT_ONCE.format(marker=str(markers)),
                         header="import os, pathlib")
    project.root.chmod(folder_mode)
    if folder_mode & 0o1000:  # sticky: their own lock file, which they may swap
        lock_file(project).touch()
        unprivileged.chown(lock_file(project))
    before = snapshot(project.root)

    result = project.alembic("upgrade", "head")

    assert_clean_failure(result, f"the run lock file {lock_file(project)}",
                         "autocommit_block()", "nothing was migrated")
    assert list(markers.iterdir()) == []
    assert project.version() == ["0008"]
    assert snapshot(project.root) == before
    # The fix the message names: a folder only trusted users change.
    project.root.chmod(0o755)
    if folder_mode & 0o1000:
        os.chown(lock_file(project), 0, 0)
    done = project.alembic("upgrade", "head")
    assert done.returncode == 0, done.stderr
    assert len(list(markers.iterdir())) == 1
    assert project.version() == ["0009"]


def test_a_one_transaction_run_goes_on_in_a_folder_others_may_write(project: Project) -> None:
    """SQLite's write lock keeps everyone else out until the COMMIT: no refusal, no
    warning, exactly one migration."""
    project.root.chmod(0o777)
    result = project.alembic("upgrade", "head")
    assert result.returncode == 0, result.stderr
    assert warnings_in(result.stderr) == []
    assert project.version() == ["0008"]
