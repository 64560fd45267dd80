"""backup_keep: after a backup, the oldest backups of this database beyond N are deleted.

Real SQLite files and real migrations of the demo chain, one revision per run, through
upgrade(), the stock `alembic` CLI and ours. Only this database's backups (by their exact
name pattern) are ever deleted; a backup that cannot be deleted is a WARNING.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import Project, Unprivileged, make_project
from faultkit import integrity, snapshot

import alembic_sqlite_lock
from alembic_sqlite_lock import ConfigurationError
from alembic_sqlite_lock._cli import _main as _cli

CLI = str(Path(sys.executable).with_name("alembic-sqlite-lock"))
ONE_AT_A_TIME = ["0001", "0002", "0003", "0004"]


def cli(project: Project, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, *args], cwd=project.root, capture_output=True, text=True,
                          timeout=120, check=False)


def set_in_ini(ini: Path, *lines: str) -> None:
    header = "[alembic_sqlite_lock]\n"
    text = ini.read_text()
    assert header in text
    ini.write_text(text.replace(header, header + "".join(f"{line}\n" for line in lines)))


def ours(folder: Path) -> list[str]:
    """The steps of this database's backups in ``folder``, e.g. ``0002-to-0003``."""
    return sorted(p.name.split(".")[2] for p in folder.iterdir()
                  if p.is_file() and p.name.startswith("app.db.") and p.name.count(".") == 4)


def revision_in(backup: Path) -> list[str]:
    """The revision a backup file is at, read with plain sqlite3 (checked whole first)."""
    assert integrity(backup) == "ok"
    conn = sqlite3.connect(backup)
    try:
        return [str(v) for (v,) in conn.execute("SELECT version_num FROM alembic_version")]
    finally:
        conn.close()


def status_json(project: Project, *args: str) -> dict[str, Any]:
    result = cli(project, "status", "--json", *args)
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def test_keep_2_leaves_the_two_newest_backups_each_at_its_revision(
    project: Project, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="alembic_sqlite_lock")
    folder = project.root / "backups"
    for revision in ONE_AT_A_TIME:
        applied = alembic_sqlite_lock.upgrade(project.ini, revision, backup_dir="backups",
                                              backup_keep=2)
        assert applied == [revision]
        assert len(ours(folder)) == min(2, ONE_AT_A_TIME.index(revision) + 1)

    assert ours(folder) == ["0002-to-0003", "0003-to-0004"]
    for backup in folder.iterdir():  # each a whole database at its "from" revision
        assert revision_in(backup) == [backup.name.split(".")[2].split("-to-")[0]]
    assert project.version() == ["0004"]
    deleted = [r.getMessage() for r in caplog.records if "Deleted old backup" in r.getMessage()]
    assert len(deleted) == 2
    assert ".base-to-0001." in deleted[0]
    assert ".0001-to-0002." in deleted[1]

    # status lists what remains, oldest first, in JSON and in text.
    report = status_json(project, "--backup_dir", "backups")
    assert [Path(b["path"]).name.split(".")[2] for b in report["backups"]] == [
        "0002-to-0003", "0003-to-0004"]
    text = cli(project, "status", "--backup_dir", "backups").stdout
    assert f"Backups:    2 in {folder}\n" in text
    assert ".0001-to-0002." not in text


def test_only_this_databases_backups_are_deleted(project: Project) -> None:
    """Files of other databases and of people are left alone, even when they look old."""
    folder = project.root / "backups"
    folder.mkdir()
    strangers = [
        "app.db.old.0001-to-0002.20000101T000000Z.bak",  # a backup of app.db.old
        "app2.db.base-to-0001.20000101T000000Z.bak",  # a backup of app2.db
        "other.db.base-to-0001.20000101T000000Z.bak",
        "app.db.before-the-big-change.bak",  # made by hand
        "app.db.0001-to-0002.bak",  # no time in the name
        "app.db.base-to-0001.20000101T000000Z.bak.gz",
        "notes.txt",
    ]
    year_2000 = time.mktime((2000, 1, 1, 0, 0, 0, 0, 0, -1))
    for name in strangers:
        (folder / name).write_text(f"not ours: {name}")
        os.utime(folder / name, (year_2000, year_2000))
    lookalike = folder / "app.db.base-to-0000.20000101T000000Z.bak"  # a folder
    lookalike.mkdir()
    (lookalike / "inside").write_text("keep")
    before = snapshot(folder)
    set_in_ini(project.ini, "backup_dir = backups", "backup_keep = 1")

    for revision in ONE_AT_A_TIME[:3]:
        result = project.alembic("upgrade", revision)
        assert result.returncode == 0, result.stderr
    assert project.version() == ["0003"]

    assert ours(folder) == ["0002-to-0003"]
    after = snapshot(folder)
    assert {name: after[name] for name in before} == before
    assert (lookalike / "inside").read_text() == "keep"
    assert revision_in(next(folder.glob("app.db.0002-to-0003.*"))) == ["0002"]
    assert "Deleted old backup" in result.stderr


def test_keep_0_and_the_default_keep_every_backup(project: Project) -> None:
    folder = project.root / "backups"
    for revision in ONE_AT_A_TIME[:3]:
        result = project.alembic("-x", "lock_backup_dir=backups", "-x", "lock_backup_keep=0",
                                 "upgrade", revision)
        assert result.returncode == 0, result.stderr
    for revision in ONE_AT_A_TIME[3:]:  # backup_keep not set anywhere: its default, 0
        assert alembic_sqlite_lock.upgrade(project.ini, revision, backup_dir="backups")

    assert ours(folder) == ["0001-to-0002", "0002-to-0003", "0003-to-0004", "base-to-0001"]
    assert len(status_json(project, "-x", "lock_backup_dir=backups")["backups"]) == 4


def test_the_time_in_the_name_orders_backups_not_the_modification_time(
    project: Project,
) -> None:
    """Backups copied back from an archive get new modification times, in any order; the
    UTC time in the name still tells which is the oldest."""
    folder = project.root / "backups"
    for revision in ONE_AT_A_TIME[:3]:
        result = cli(project, "upgrade", revision, "--backup_dir", "backups")
        assert result.returncode == 0, result.stderr
    restored = {}
    for second, step in enumerate(["base-to-0001", "0001-to-0002", "0002-to-0003"], 1):
        made = next(folder.glob(f"app.db.{step}.*.bak"))
        renamed = folder / f"app.db.{step}.20200101T00000{second}Z.bak"
        made.rename(renamed)
        mtime = time.time() - 3600 * second  # the newest name gets the oldest mtime
        os.utime(renamed, (mtime, mtime))
        restored[step] = renamed

    result = cli(project, "upgrade", "0004", "--backup_dir", "backups", "--backup_keep", "2")
    assert result.returncode == 0, result.stderr

    assert ours(folder) == ["0002-to-0003", "0003-to-0004"]
    assert restored["0002-to-0003"].exists()
    assert [Path(b["path"]).name.split(".")[2]
            for b in status_json(project, "--backup_dir", "backups")["backups"]] == [
        "0002-to-0003", "0003-to-0004"]


def test_the_backup_just_written_is_kept_when_the_clock_went_back(project: Project) -> None:
    folder = project.root / "backups"
    for revision in ONE_AT_A_TIME[:2]:
        assert alembic_sqlite_lock.upgrade(project.ini, revision, backup_dir="backups")
    for made in list(folder.iterdir()):  # made "in the future" by a clock that was ahead
        step = made.name.split(".")[2]
        made.rename(folder / f"app.db.{step}.20991231T235959Z.bak")

    assert alembic_sqlite_lock.upgrade(project.ini, "0003", backup_dir="backups",
                                       backup_keep=1)

    assert ours(folder) == ["0002-to-0003"]
    assert revision_in(next(folder.iterdir())) == ["0002"]


# Bad values ---------------------------------------------------------------------------

@pytest.mark.parametrize(("how", "where", "got"), [
    (["--backup_keep", "-1"], "Setting --backup_keep must be", "got -1."),
    (["--backup_keep", "two"], "Setting --backup_keep must be a whole number", "got 'two'."),
    (["-x", "lock_backup_keep=2.5"], "Setting lock_backup_keep (-x option) must be",
     "got '2.5'."),
    (["ini: backup_keep = -3"], "Setting backup_keep ([alembic_sqlite_lock] in ", "got -3."),
])
def test_a_bad_backup_keep_is_a_configuration_error(
    project: Project, how: list[str], where: str, got: str
) -> None:
    args = how
    if how[0].startswith("ini: "):
        set_in_ini(project.ini, how[0].removeprefix("ini: "))
        args = []

    result = cli(project, "upgrade", "--backup_dir", "backups", *args)

    assert result.returncode == _cli.EXIT_USAGE, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"alembic-sqlite-lock: error: {where}"), lines[0]
    assert got in lines[0]
    assert not project.db.exists()
    assert not (project.root / "backups").exists()


def test_a_bad_backup_keep_fails_the_stock_cli_and_upgrade(project: Project) -> None:
    result = project.alembic("-x", "lock_backup_keep=-1", "upgrade", "head")
    assert result.returncode != 0
    assert "FAILED: Setting lock_backup_keep (-x option) must be a whole number >= 0" in (
        result.stdout), result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr

    for bad in (-1, True, 2.0, "many"):
        with pytest.raises(ConfigurationError, match=r"backup_keep \(keyword argument\)"):
            alembic_sqlite_lock.upgrade(project.ini, backup_dir="backups", backup_keep=bad)
    assert not project.db.exists()


# A backup that cannot be deleted ------------------------------------------------------

def test_an_undeletable_old_backup_is_a_warning_and_the_migration_goes_on(
    shared_dir: Path, unprivileged: Unprivileged
) -> None:
    """A backup folder shared by several deploy users, sticky like /tmp: the user who
    migrates now may write a new backup there but not delete root's old ones."""
    if os.geteuid() != 0:
        pytest.skip("needs root to leave backups that another user cannot delete")
    root = shared_dir / "proj"
    ini = make_project(root)
    set_in_ini(ini, "backup_dir = backups", "backup_keep = 1")
    for revision in ONE_AT_A_TIME[:2]:  # root's backups, all kept
        done = subprocess.run([str(Path(sys.executable).with_name("alembic")), "-c", str(ini),
                               "-x", "lock_backup_keep=0", "upgrade", revision],
                              cwd=root, capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr
    folder = root / "backups"
    old = sorted(folder.iterdir())
    assert len(old) == 2
    for path in [root, *root.rglob("*")]:
        if folder not in (path, *path.parents):
            unprivileged.chown(path)
    folder.chmod(0o1777)

    result = unprivileged.alembic(ini, "upgrade", "0003")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    for path in old:
        assert path.exists()
        assert f"Could not delete old backup {path} (backup_keep = 1): " in result.stderr
    assert result.stderr.count("Operation not permitted") == 2, result.stderr
    assert ours(folder) == ["0001-to-0002", "0002-to-0003", "base-to-0001"]
    new = next(folder.glob("app.db.0002-to-0003.*.bak"))
    assert new.stat().st_uid == unprivileged.uid
    assert revision_in(new) == ["0002"]
    conn = sqlite3.connect(root / "app.db")
    try:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [("0003",)]
    finally:
        conn.close()


@pytest.mark.parametrize("keep", [0, 3])
def test_a_failing_step_retried_keeps_one_backup_of_it_when_backups_are_bounded(
    project: Project, keep: int
) -> None:
    """Eight workers against a revision that fails, twice over (a crash-looping deploy):
    every run of the step backs up first. With backup_keep each newer backup of that step
    replaces the older ones, so the retries do not push the other steps' backups out;
    backup_keep = 0 deletes nothing, ever."""
    from conftest import run_together

    assert alembic_sqlite_lock.upgrade(project.ini, "0007", backup_dir="backups")
    project.add_revision("0009", "0008", 'raise RuntimeError("0009 is broken")')
    folder = project.root / "backups"
    for _ in range(2):
        results = run_together(
            [["alembic", "-c", str(project.ini), "-x", "lock_backup_dir=backups",
              "-x", f"lock_backup_keep={keep}", "upgrade", "head"]] * 8, cwd=project.root)
        assert all(r.returncode != 0 for r in results)
        assert all("0009 is broken" in r.stdout for r in results)
    retries = 16 if keep == 0 else 1
    assert ours(folder) == ["0007-to-0009"] * retries + ["base-to-0007"]
    for backup in (p for p in folder.iterdir() if ".0007-to-0009." in p.name):
        assert revision_in(backup) == ["0007"]
    assert project.version() == ["0007"]
