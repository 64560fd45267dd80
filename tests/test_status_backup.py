"""`status` (text and JSON) and opt-in backups made inside the lock before migrating."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import Project

import alembic_sqlite_lock
from alembic_sqlite_lock._backends._sqlite import _backup
from alembic_sqlite_lock._backends._sqlite._runlock import SUFFIX, run_lock_held
from alembic_sqlite_lock._cli import _main as _cli

CLI = str(Path(sys.executable).with_name("alembic-sqlite-lock"))


def cli(project: Project, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, *args], cwd=project.root, capture_output=True, text=True,
                          timeout=120, check=False)


def status_json(project: Project, *args: str) -> dict[str, Any]:
    result = cli(project, "status", "--json", *args)
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def test_status_of_a_new_database_creates_nothing(project: Project) -> None:
    report = status_json(project)
    assert report["database_exists"] is False
    assert report["current"] == []
    assert report["heads"] == ["0008"]
    assert report["pending"] == [f"000{n}" for n in range(1, 9)]
    assert report["up_to_date"] is False
    assert report["migration_running"] is False
    assert report["holder"] is None
    assert not project.db.exists()
    assert not Path(str(project.db) + SUFFIX).exists()


def test_status_text_after_a_partial_upgrade(project: Project) -> None:
    assert cli(project, "upgrade", "0006").returncode == 0
    text = cli(project, "status").stdout
    assert f"Database:   sqlite:///{project.db}\n" in text
    assert "Current:    0006\n" in text
    assert "Head:       0008\n" in text
    assert "Pending:    2: 0007, 0008\n" in text
    assert "Migration:  none running\n" in text
    assert "Backups:    off" in text
    assert cli(project, "upgrade").returncode == 0
    assert status_json(project)["up_to_date"] is True
    assert "Pending:    none, up to date" in cli(project, "status").stdout


def test_status_reports_an_unknown_current_revision(project: Project) -> None:
    assert cli(project, "upgrade").returncode == 0
    conn = sqlite3.connect(project.db)
    with conn:
        conn.execute("UPDATE alembic_version SET version_num = 'gone'")
    conn.close()
    report = status_json(project)
    assert report["current"] == ["gone"]
    assert report["pending"] is None
    assert "gone" in report["problem"]


def test_the_probe_leaves_the_run_lock_free(project: Project) -> None:
    lock = str(project.db) + SUFFIX
    assert run_lock_held(lock) is False  # no file: not created
    assert not os.path.exists(lock)
    assert cli(project, "upgrade").returncode == 0
    for _ in range(3):
        assert run_lock_held(lock) is False
    # Free right after the probe: a worker's non-blocking attempt succeeds.
    assert alembic_sqlite_lock.upgrade(project.ini, max_attempts=1) == []


# Backups ----------------------------------------------------------------------------

def backups(project: Project) -> list[Path]:
    folder = project.root / "backups"
    return sorted(folder.iterdir()) if folder.exists() else []


def test_backups_are_made_only_when_there_is_something_to_migrate(project: Project) -> None:
    assert alembic_sqlite_lock.upgrade(project.ini, "0004", backup_dir="backups")
    assert alembic_sqlite_lock.upgrade(project.ini, backup_dir="backups")
    assert alembic_sqlite_lock.upgrade(project.ini, backup_dir="backups") == []  # nothing
    names = [p.name for p in backups(project)]
    assert sorted(n.split(".")[2] for n in names) == ["0004-to-0008", "base-to-0004"]
    assert all(n.startswith("app.db.") and n.endswith(".bak") for n in names)

    before_0008 = next(p for p in backups(project) if ".0004-to-0008." in p.name)
    copy = sqlite3.connect(before_0008)
    try:
        assert copy.execute("SELECT version_num FROM alembic_version").fetchall() == [("0004",)]
        assert copy.execute("SELECT count(*) FROM tags").fetchone() == (0,)
    finally:
        copy.close()

    report = status_json(project, "-x", "lock_backup_dir=backups")
    assert report["backup_dir"] == str(project.root / "backups")
    assert sorted(b["path"] for b in report["backups"]) == [str(p) for p in backups(project)]
    text = cli(project, "status", "--backup_dir", "backups").stdout
    assert f"Backups:    2 in {project.root / 'backups'}" in text
    assert before_0008.name in text


def test_restoring_a_backup_puts_the_database_back(project: Project) -> None:
    ini = project.ini.read_text().replace("# backup_dir = ", "backup_dir = backups")
    ini = ini.replace("[alembic_sqlite_lock]\n", "[alembic_sqlite_lock]\nbackup_dir = backups\n")
    project.ini.write_text(ini)
    assert cli(project, "upgrade", "0007").returncode == 0
    assert cli(project, "upgrade").returncode == 0
    backup = next(p for p in backups(project) if ".0007-to-0008." in p.name)
    # The README's restore: stop every worker, then copy the backup over the database.
    backup_copy = project.db.with_suffix(".restoring")
    backup_copy.write_bytes(backup.read_bytes())
    os.replace(backup_copy, project.db)
    assert project.version() == ["0007"]
    assert "display_name" not in str(project.query("PRAGMA table_info(users)"))


def test_a_failed_backup_stops_the_run_before_any_migration(project: Project) -> None:
    (project.root / "backups").write_text("a file, not a folder")
    result = cli(project, "upgrade", "--backup_dir", "backups")
    assert result.returncode == _cli.EXIT_OTHER
    assert "Could not back up" in result.stderr
    assert "Nothing was migrated" in result.stderr
    assert "Traceback" not in result.stderr
    assert project.version() == []
    assert "users" not in project.tables()
    assert not Path(str(project.db) + ".migration-holder").exists()


@pytest.mark.parametrize("revision", ["0008"])
def test_sql_mode_makes_no_backup(project: Project, revision: str) -> None:
    assert cli(project, "upgrade", revision, "--sql", "--backup_dir", "backups").returncode == 0
    assert backups(project) == []


def test_the_listing_holds_only_this_databases_backups_oldest_by_the_time_in_the_name(
    tmp_path: Path,
) -> None:
    """What `status` lists and backup_keep counts: names make() writes for this database
    only, ordered by the UTC time in the name (modification times may have been reset by
    a copy), then by modification time within one second, then by the -<n> suffix."""
    db = str(tmp_path / "app.db")
    noon = 1_764_072_000.0  # 2025-11-25 12:00:00 UTC
    ours = [
        _backup.file_name(db, [], ["0001"], now=noon),
        _backup.file_name(db, ["0001"], ["0002"], now=noon + 60),
        _backup.file_name(db, ["0002"], ["0003"], now=noon + 60),  # same second
        _backup.file_name(db, ["0002"], ["0003"], now=noon + 60)[:-4] + "-2.bak",
        _backup.file_name(db, ["0003"], ["a_1", "b2"], now=noon + 120),  # two heads
        _backup.file_name(db, ["a_1", "b2"], ["0004"], now=noon + 180),
    ]
    assert ours[4].startswith("app.db.0003-to-a_1+b2.20251125T")
    strangers = [
        _backup.file_name(str(tmp_path / "app.db.old"), [], ["0001"], now=noon - 60),
        _backup.file_name(str(tmp_path / "app2.db"), [], ["0001"], now=noon - 60),
        "app.db.copy.bak", "app.db.0001-to-0002.bak", ours[0] + ".gz", "app.db",
    ]
    for age, name in enumerate(reversed(ours + strangers)):  # the newest name is oldest
        (tmp_path / name).write_text(name)
        os.utime(tmp_path / name, (noon + age, noon + age))
    (tmp_path / _backup.file_name(db, [], ["0000"], now=noon - 60)).mkdir()  # not a file
    # Within the same second the modification time decides, whatever the name says.
    os.utime(tmp_path / ours[3], (noon + 100, noon + 100))
    os.utime(tmp_path / ours[2], (noon + 200, noon + 200))

    listed = [os.path.basename(b.path) for b in _backup.listing(str(tmp_path), db)]

    assert listed == [ours[0], ours[1], ours[3], ours[2], ours[4], ours[5]]
    assert _backup.listing(str(tmp_path / "missing"), db) == []


def test_status_says_when_the_backup_folder_does_not_exist_yet(project: Project) -> None:
    text = cli(project, "status", "--backup_dir", "nothere").stdout
    assert f"Backups:    0 in {project.root / 'nothere'} (no such folder yet)\n" in text
    assert not (project.root / "nothere").exists()
