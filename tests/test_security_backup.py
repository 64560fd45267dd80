"""Backups in a folder that others can write to, with the library running as root.

Each attack is staged for real against the real `alembic` CLI (or upgrade()): a link
planted at the name the next backup will get, a backup folder made first by another
user, a secret database, a worker killed in the middle of its backup, a full disk, and
names dated in the future planted to make backup_keep delete the real backups.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Project, Unprivileged, make_project
from faultkit import ALEMBIC, integrity
from test_permissions import assert_clean_failure

import alembic_sqlite_lock
from alembic_sqlite_lock import BackupFailed
from alembic_sqlite_lock._backends._sqlite import _backup

CLI = str(Path(sys.executable).with_name("alembic-sqlite-lock"))


def needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: the attacks are against a root process")


def alembic(ini: Path, *args: str, umask: int | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [ALEMBIC, "-c", str(ini), *args], cwd=ini.parent, capture_output=True, text=True,
        timeout=120, check=False,
        preexec_fn=None if umask is None else (lambda: os.umask(umask)),
    )


def status_json(ini: Path, *args: str) -> dict[str, Any]:
    done = subprocess.run([CLI, "status", "--json", *args], cwd=ini.parent,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    data: dict[str, Any] = json.loads(done.stdout)
    return data


def bak_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.endswith(".bak"))


def version_in(db: Path) -> list[str]:
    assert integrity(db) == "ok"
    conn = sqlite3.connect(db)
    try:
        return [str(v) for (v,) in conn.execute("SELECT version_num FROM alembic_version")]
    finally:
        conn.close()


# (a) a dangling link at the predicted name --------------------------------------------

def test_links_planted_at_the_next_names_are_not_followed(project: Project,
                                                          tmp_path: Path) -> None:
    """A link is planted at every name the next backup can get in the coming minute (and
    at its -2 .. -5 suffixes), each pointing at a victim file that does not exist yet.
    The backup is written, under a name that was free; no victim file is created."""
    assert project.alembic("upgrade", "0001").returncode == 0
    folder = project.root / "backups"
    folder.mkdir()
    victims = tmp_path / "victims"
    victims.mkdir()
    now = int(time.time())
    planted = []
    for second in range(now - 1, now + 60):
        name = _backup.file_name(str(project.db), ["0001"], ["0002"], now=second)
        for suffix in ["", "-2", "-3", "-4", "-5"]:
            link = folder / (name[:-4] + suffix + ".bak")
            link.symlink_to(victims / f"{len(planted)}.db")
            planted.append(link)

    result = project.alembic("-x", "lock_backup_dir=backups", "upgrade", "0002")

    assert result.returncode == 0, result.stderr
    assert list(victims.iterdir()) == []
    assert all(p.is_symlink() and not p.exists() for p in planted)
    written = [p for p in bak_files(folder) if not p.is_symlink()]
    assert len(written) == 1
    assert written[0] not in planted
    assert stat.S_ISREG(written[0].lstat().st_mode)
    assert version_in(written[0]) == ["0001"]
    assert project.version() == ["0002"]
    # status lists the backup and none of the links.
    listed = status_json(project.ini, "--backup_dir", "backups")["backups"]
    assert [b["path"] for b in listed] == [str(written[0])]


# (b) a backup folder made first by someone else ---------------------------------------

@pytest.mark.parametrize("planted", ["another user's folder", "a symbolic link"])
def test_a_backup_folder_made_by_someone_else_is_refused(
    shared_dir: Path, unprivileged: Unprivileged, planted: str
) -> None:
    needs_root()
    root = shared_dir / "proj"
    ini = make_project(root)
    assert alembic(ini, "upgrade", "0001").returncode == 0
    folder = root / "backups"
    theirs = shared_dir / "theirs"
    theirs.mkdir()
    if planted == "a symbolic link":
        folder.symlink_to(theirs)
        expected = f"the backup folder {folder} is a symbolic link."
    else:
        folder.mkdir()
        unprivileged.chown(folder)
        theirs = folder
        expected = f"the backup folder {folder} belongs to uid {unprivileged.uid}, a user"
    database = (root / "app.db").read_bytes()

    result = alembic(ini, "-x", "lock_backup_dir=backups", "upgrade", "head")

    line = assert_clean_failure(result, "Could not back up", expected,
                                  "Nothing was migrated")
    assert "point backup_dir" in line.lower()
    assert list(theirs.iterdir()) == []
    assert (root / "app.db").read_bytes() == database
    assert version_in(root / "app.db") == ["0001"]
    with pytest.raises(BackupFailed, match="Nothing was migrated") as caught:
        alembic_sqlite_lock.upgrade(ini, backup_dir="backups")
    assert caught.value.backup_dir == str(folder)
    # status does not list what is in such a folder.
    text = subprocess.run([CLI, "status", "--backup_dir", "backups"], cwd=root,
                          capture_output=True, text=True, check=False).stdout
    assert f"Backups:    0 in {folder} (not listed: it " in text


# (c) modes and owner ------------------------------------------------------------------

@pytest.mark.parametrize("umask", [0o022, 0o000], ids=["umask 022", "umask 000"])
def test_a_secret_database_gets_secret_backups(project: Project, umask: int) -> None:
    assert project.alembic("upgrade", "0001").returncode == 0
    project.db.chmod(0o600)

    result = alembic(project.ini, "-x", "lock_backup_dir=backups/nested", "upgrade", "0002",
                     umask=umask)

    assert result.returncode == 0, result.stderr
    for folder in (project.root / "backups", project.root / "backups" / "nested"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    (backup,) = bak_files(project.root / "backups" / "nested")
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600
    assert version_in(backup) == ["0001"]


def test_root_gives_the_backups_to_the_databases_owner(
    shared_dir: Path, unprivileged: Unprivileged
) -> None:
    needs_root()
    root = shared_dir / "proj"
    ini = make_project(root)
    assert alembic(ini, "upgrade", "0001").returncode == 0
    unprivileged.chown(root / "app.db")
    (root / "app.db").chmod(0o640)

    result = alembic(ini, "-x", "lock_backup_dir=backups", "upgrade", "0002")

    assert result.returncode == 0, result.stderr
    folder = root / "backups"
    (backup,) = bak_files(folder)
    for path, mode in ((folder, 0o750), (backup, 0o640)):
        info = path.stat()
        assert (info.st_uid, info.st_gid) == (unprivileged.uid, unprivileged.gid), path
        assert stat.S_IMODE(info.st_mode) == mode, path
    assert [p.name for p in folder.iterdir()] == [backup.name]  # no temporary folder left


# (d) a backup interrupted ---------------------------------------------------------------

def fill(db: Path, megabytes: int) -> None:
    conn = sqlite3.connect(db)
    try:
        conn.execute("CREATE TABLE ballast (blob BLOB)")
        conn.executemany("INSERT INTO ballast VALUES (randomblob(1000000))",
                         [()] * megabytes)
        conn.commit()
    finally:
        conn.close()


def test_a_worker_killed_during_its_backup_leaves_no_bak(project: Project) -> None:
    """SIGKILL while VACUUM INTO is writing the copy: no `.bak` appears, status lists
    none, and the next run removes what the killed one left."""
    assert project.alembic("upgrade", "0001").returncode == 0
    fill(project.db, 300)  # a copy takes long enough to be caught in the middle
    folder = project.root / "backups"
    worker = subprocess.Popen(
        [ALEMBIC, "-c", str(project.ini), "-x", "lock_backup_dir=backups", "upgrade", "0002"],
        cwd=project.root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        copy = None
        give_up_at = time.monotonic() + 60
        while copy is None and worker.poll() is None and time.monotonic() < give_up_at:
            work = list(folder.glob(".app.db.backup.*.tmp/copy.db")) if folder.exists() else []
            if work and work[0].stat().st_size > 0:
                copy = work[0]
            else:
                time.sleep(0.0005)
        assert copy is not None, "the worker finished its backup before it was caught"
        worker.send_signal(signal.SIGKILL)
    finally:
        if worker.poll() is None:
            worker.kill()
        worker.wait(timeout=30)
    assert worker.returncode == -signal.SIGKILL

    assert copy.parent.exists()  # killed in the middle of the copy, not after it
    assert bak_files(folder) == []
    assert status_json(project.ini, "--backup_dir", "backups")["backups"] == []
    assert project.version() == ["0001"]

    again = project.alembic("-x", "lock_backup_dir=backups", "upgrade", "0002")

    assert again.returncode == 0, again.stderr
    assert "left by a backup that did not finish" in again.stderr
    (backup,) = bak_files(folder)
    assert [p.name for p in folder.iterdir()] == [backup.name]  # no orphan, no -journal
    assert version_in(backup) == ["0001"]
    assert project.version() == ["0002"]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    needs_root()
    mount = tmp_path / "small-disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0755", "tmpfs",
                           str(mount)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"cannot mount a tmpfs: {done.stderr.strip()}")
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_a_full_disk_fails_the_backup_and_migrates_nothing(
    project: Project, small_disk: Path
) -> None:
    assert project.alembic("upgrade", "0001").returncode == 0
    fill(project.db, 2)
    database = project.db.read_bytes()

    with pytest.raises(BackupFailed, match="Nothing was migrated") as caught:
        alembic_sqlite_lock.upgrade(project.ini, "0002", backup_dir=str(small_disk))

    assert "full" in str(caught.value)
    assert os.listdir(small_disk) == []  # no partial .bak, no temporary folder
    assert project.db.read_bytes() == database
    assert project.version() == ["0001"]
    result = alembic(project.ini, "-x", f"lock_backup_dir={small_disk}", "upgrade", "0002")
    assert_clean_failure(result, "Could not back up", "Nothing was migrated")
    assert os.listdir(small_disk) == []


# (e) names dated in the future --------------------------------------------------------

@pytest.mark.parametrize("planter", ["another user", "root"])
def test_future_dated_names_do_not_push_the_real_backups_out(
    shared_dir: Path, unprivileged: Unprivileged, planter: str
) -> None:
    needs_root()
    root = shared_dir / "proj"
    ini = make_project(root)
    assert alembic(ini, "-x", "lock_backup_dir=backups", "upgrade", "0001").returncode == 0
    folder = root / "backups"
    (real,) = bak_files(folder)
    fakes = [folder / f"app.db.0007-to-0008.2099123{n}T235959Z.bak" for n in (0, 1)]
    for fake in fakes:
        fake.write_bytes(real.read_bytes())
        if planter == "another user":
            unprivileged.chown(fake)

    result = alembic(ini, "-x", "lock_backup_dir=backups", "-x", "lock_backup_keep=2",
                     "upgrade", "0002")

    assert result.returncode == 0, result.stderr
    assert real.exists()
    new = [p for p in bak_files(folder) if p != real and p not in fakes]
    assert len(new) == 1
    assert ".0001-to-0002." in new[0].name
    assert version_in(new[0]) == ["0001"]
    assert integrity(real) == "ok"
    listed = [b["path"] for b in status_json(ini, "--backup_dir", "backups")["backups"]]
    if planter == "another user":  # not ours: never counted, listed or deleted
        assert all(fake.exists() for fake in fakes)
        assert listed == [str(real), str(new[0])]
    else:  # root's, but their dates are not believed: they count as the oldest
        assert not any(fake.exists() for fake in fakes)
        assert listed == [str(real), str(new[0])]


# A second review: what a user who may write the folders could still do ----------------

def test_a_database_swapped_under_the_lock_gets_no_backup(
    tmp_path: Path, unprivileged: Unprivileged
) -> None:
    """Someone who may write the database's folder swaps a file of theirs in at its path
    for an instant (renameat2 RENAME_EXCHANGE in a loop). Caught at that instant, a plain
    stat made them the owner: the backup of the real, root-only database went to them.
    The owner now comes from the file SQLite holds its lock on."""
    needs_root()
    real = tmp_path / "app.db"
    conn = sqlite3.connect(real, isolation_level=None)
    conn.execute("CREATE TABLE secret (x TEXT)")
    conn.execute("INSERT INTO secret VALUES ('TOPSECRET')")
    real.chmod(0o600)
    theirs = tmp_path / "theirs.db"
    sqlite3.connect(theirs).close()
    unprivileged.chown(theirs)
    theirs.chmod(0o666)
    backups = tmp_path / "backups"
    try:
        conn.execute("BEGIN IMMEDIATE")  # what a locked run holds when it backs up
        # Control: the real file at its path is backed up, root-only.
        written = Path(_backup.make(str(real), str(backups), ["0007"], ["0008"]))
        assert stat.S_IMODE(written.stat().st_mode) == 0o600
        assert written.stat().st_uid == 0
        # The state the swap leaves for an instant: their file at the path.
        real.rename(tmp_path / "moved")
        theirs.rename(real)
        with pytest.raises(BackupFailed, match="is not the file this run holds SQLite's "
                                               "lock on") as caught:
            _backup.make(str(real), str(backups), ["0007"], ["0008"])
        assert "Nothing was migrated" in str(caught.value)
    finally:
        conn.close()
    assert bak_files(backups) == [written]  # nothing handed to them
    assert all(p.stat().st_uid == 0 for p in backups.iterdir())


@pytest.mark.parametrize("mode", [0o777, 0o2775], ids=["0777", "2775 of another group"])
def test_a_backup_folder_others_may_write_is_refused(
    project: Project, unprivileged: Unprivileged, mode: int
) -> None:
    """A folder owned by root but writable by others (backup_dir = . in a shared data
    folder): they could rename the private folder VACUUM INTO writes in and put theirs in
    its place, and get a copy of the database."""
    needs_root()
    assert project.alembic("upgrade", "0001").returncode == 0
    folder = project.root / "shared"
    folder.mkdir()
    folder.chmod(mode)
    if mode & 0o020:
        os.chown(folder, 0, unprivileged.gid)
    before = project.db.read_bytes()

    result = project.alembic("-x", "lock_backup_dir=shared", "upgrade", "head")

    who = "every user" if mode & 0o002 else f"group {unprivileged.gid}"
    assert_clean_failure(result, f"the backup folder {folder} is writable by {who}",
                           "Nothing was migrated")
    assert list(folder.iterdir()) == []
    assert project.db.read_bytes() == before
    # Sticky, like /tmp: only an entry's owner may rename it, so the backup is safe.
    folder.chmod(mode | stat.S_ISVTX)
    assert project.alembic("-x", "lock_backup_dir=shared", "upgrade", "head").returncode == 0
    assert len(bak_files(folder)) == 1


def test_a_folder_renamed_to_look_like_a_leftover_is_not_emptied(project: Project) -> None:
    """A backup killed midway leaves its private folder, which the next backup removes;
    a folder of root's renamed to that pattern (its files root's) is not such a leftover."""
    assert project.alembic("upgrade", "0001").returncode == 0
    backups = project.root / "backups"
    backups.mkdir()
    lookalike = backups / f".{project.db.name}.backup.0123456789abcdef.tmp"
    lookalike.mkdir()
    lookalike.chmod(0o755)
    (lookalike / "precious.txt").write_text("keep me")

    result = project.alembic("-x", "lock_backup_dir=backups", "upgrade", "head")

    assert result.returncode == 0, result.stderr
    assert (lookalike / "precious.txt").read_text() == "keep me"
    assert len(bak_files(backups)) == 1
