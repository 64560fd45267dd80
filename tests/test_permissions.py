"""Read-only database file and read-only directory, as an unprivileged user.

Root ignores file modes, so when the suite runs as root these tests run the real `alembic`
CLI as a system user (the `unprivileged` fixture in conftest.py, setpriv), in a directory
outside pytest's 0700 temp root that the user can reach (`shared_dir`).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from conftest import Unprivileged, make_project
from faultkit import ALEMBIC, snapshot


def migrated_db(root: Path, data: Path, user: Unprivileged) -> tuple[Path, Path]:
    """A project in ``root`` whose database ``data/app.db`` is at 0004 (no lock file)."""
    ini = make_project(root)
    text = ini.read_text().replace("sqlite:///%(here)s/app.db", f"sqlite:///{data / 'app.db'}")
    ini.write_text(text)
    data.mkdir()
    done = subprocess.run([ALEMBIC, "-c", str(ini), "upgrade", "0004"], capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, done.stderr
    (data / "app.db.migration-lock").unlink()
    for path in [root, *root.rglob("*")]:
        if data not in (path, *path.parents):
            user.chown(path)
    return ini, data / "app.db"


def assert_clean_failure(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    """A non-zero exit with exactly one `FAILED:` line holding every needle, and no
    traceback; returns that line."""
    assert result.returncode != 0
    assert "Traceback" not in result.stdout + result.stderr
    failed = [line for line in result.stdout.splitlines() if line.startswith("FAILED: ")]
    assert len(failed) == 1, result.stdout + result.stderr
    for needle in needles:
        assert needle in failed[0], failed[0]
    return failed[0]


def test_read_only_database_file_fails_before_creating_anything(
    shared_dir: Path, unprivileged: Unprivileged
) -> None:
    data = shared_dir / "data"
    ini, db = migrated_db(shared_dir / "proj", data, unprivileged)
    unprivileged.chown(data)  # the directory is the user's; the file is not writable
    db.chmod(0o444)
    before = snapshot(data)

    result = unprivileged.alembic(ini, "upgrade", "head")

    assert_clean_failure(
        result, f"The database file {db} is read-only for user {unprivileged.name}",
        "write access", "Nothing was changed",
    )
    assert snapshot(data) == before  # no <db>.migration-lock, no journal, same bytes
    # A read-only database that is already at the target is fine: nothing to write.
    at_target = unprivileged.alembic(ini, "upgrade", "0004")
    assert at_target.returncode == 0, at_target.stdout + at_target.stderr
    assert "Database already at 0004, nothing to do" in at_target.stderr
    assert snapshot(data) == before


def test_read_only_directory_fails_clearly_and_changes_nothing(
    shared_dir: Path, unprivileged: Unprivileged
) -> None:
    data = shared_dir / "data"
    ini, db = migrated_db(shared_dir / "proj", data, unprivileged)
    unprivileged.chown(db)  # the file is the user's and writable; its directory is not
    data.chmod(0o555)
    before = snapshot(data)

    result = unprivileged.alembic(ini, "upgrade", "head")

    assert_clean_failure(
        result, f"The directory {data} is read-only for user {unprivileged.name}",
        "cannot create its journal", "app.db-journal", "Make the directory writable",
    )
    assert snapshot(data) == before

    # A database that does not exist yet cannot be created there either.
    ini.write_text(ini.read_text().replace(str(db), str(data / "new.db")))
    result = unprivileged.alembic(ini, "upgrade", "head")
    assert_clean_failure(
        result, f"The database {data / 'new.db'} does not exist and user "
        f"{unprivileged.name} may not create it", f"the directory {data} is not writable",
    )
    assert snapshot(data) == before
