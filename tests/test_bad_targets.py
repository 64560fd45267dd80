"""Bad targets: one clear paragraph naming the path and the fix, a non-zero exit, no
traceback, and nothing created or changed on disk by mistake."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import pytest
from alembic.config import Config
from conftest import Project
from faultkit import integrity, schema, snapshot

import alembic_sqlite_lock
from alembic_sqlite_lock import DatabaseUnusable, UnknownDatabaseRevision


def set_url(project: Project, url: str) -> None:
    text = project.ini.read_text()
    start = text.index("sqlalchemy.url = ")
    end = text.index("\n", start)
    project.ini.write_text(text[:start] + f"sqlalchemy.url = {url}" + text[end:])


def assert_failed_cleanly(result: object, *needles: str) -> str:
    """FAILED: <one paragraph> on stdout, non-zero exit, no traceback anywhere."""
    out, err = result.stdout, result.stderr  # type: ignore[attr-defined]
    assert result.returncode != 0  # type: ignore[attr-defined]
    assert "Traceback" not in out + err
    failed = [line for line in out.splitlines() if line.startswith("FAILED: ")]
    assert len(failed) == 1, out
    message = failed[0]
    for needle in needles:
        assert needle in message, message
    return message


def test_missing_directory(project: Project) -> None:
    target = project.root / "no-such-dir" / "app.db"
    set_url(project, f"sqlite:///{target}")
    before = snapshot(project.root)

    message = assert_failed_cleanly(
        project.alembic("upgrade", "head"),
        "does not exist", str(target.parent), "mkdir -p",
    )
    assert "Nothing was migrated" in message
    assert not target.parent.exists()
    assert snapshot(project.root) == before


def test_path_is_a_directory(project: Project) -> None:
    target = project.root / "data"
    target.mkdir()
    set_url(project, f"sqlite:///{target}")
    before = snapshot(project.root)

    assert_failed_cleanly(
        project.alembic("upgrade", "head"),
        f"{target} is a directory", f"sqlite:///{target / 'app.db'}",
    )
    assert list(target.iterdir()) == []
    assert snapshot(project.root) == before


def test_file_that_is_not_a_database(project: Project) -> None:
    target = project.root / "notes.db"
    target.write_bytes(b"these are my notes, not a database\n" * 200)
    set_url(project, f"sqlite:///{target}")
    before = snapshot(project.root)

    assert_failed_cleanly(
        project.alembic("upgrade", "head"), str(target), "is not a SQLite database",
        "sqlalchemy.url",
    )
    assert snapshot(project.root) == before  # byte for byte, and no lock file beside it


@pytest.mark.parametrize("url", ["sqlite://user:pw@//srv/app.db", "not a url at all"])
def test_invalid_url_is_a_configuration_error(project: Project, url: str) -> None:
    set_url(project, url)
    message = assert_failed_cleanly(
        project.alembic("upgrade", "head"), f"sqlalchemy.url in {project.ini} is not a "
        "valid SQLite URL", "sqlite:///"
    )
    assert "pw" not in message


def test_a_server_url_with_a_bad_port_is_a_configuration_error(project: Project) -> None:
    set_url(project, "postgresql://u:s3cret@127.0.0.1:54x2/db")
    message = assert_failed_cleanly(
        project.alembic("upgrade", "head"),
        f"sqlalchemy.url in {project.ini} is not a valid database URL "
        "(postgresql://u:***@127.0.0.1:54x2/db)",
        "a port is a number",
    )
    assert "s3cret" not in message


def test_unknown_revision(project: Project) -> None:
    assert project.alembic("upgrade", "0004").returncode == 0
    before = snapshot(project.root)

    assert_failed_cleanly(
        project.alembic("upgrade", "9999"),
        "Revision '9999' does not exist", str(project.versions), str(project.db),
        "newest revision is 0008",
    )
    assert snapshot(project.root) == before
    assert project.version() == ["0004"]


@pytest.mark.parametrize("command", ["upgrade", "stamp"])
def test_unknown_revision_creates_no_database(project: Project, command: str) -> None:
    """A database file that does not exist yet is at no revision: the target is checked
    against that before the first connection would create an empty file."""
    assert not project.db.exists()
    before = snapshot(project.root)

    assert_failed_cleanly(
        project.alembic(command, "9999"),
        "Revision '9999' does not exist", str(project.versions), str(project.db),
    )
    assert not project.db.exists()
    assert snapshot(project.root) == before  # no database, lock or holder file either
    # The same project still migrates once the revision is right.
    assert project.alembic("upgrade", "head").returncode == 0
    assert project.version() == ["0008"]


def add_two_heads(project: Project) -> None:
    project.add_revision("0009a", "0008", "op.create_table('a', sa.Column('id', sa.Integer))")
    project.add_revision("0009b", "0008", "op.create_table('b', sa.Column('id', sa.Integer))")


def test_multiple_heads_with_upgrade_head(project: Project) -> None:
    assert project.alembic("upgrade", "0008").returncode == 0
    add_two_heads(project)
    before = snapshot(project.root)

    assert_failed_cleanly(
        project.alembic("upgrade", "head"),
        "2 head revisions (0009a, 0009b)", "alembic merge heads", "alembic upgrade heads",
        str(project.db),
    )
    assert snapshot(project.root) == before
    assert project.version() == ["0008"]
    # The way out the message names works.
    assert project.alembic("upgrade", "heads").returncode == 0
    assert project.version() == ["0009a", "0009b"]


def test_raiseerr_still_shows_the_traceback(project: Project) -> None:
    result = project.alembic("--raiseerr", "upgrade", "9999")
    assert result.returncode != 0
    assert "Traceback" in result.stderr
    assert "UnknownRevision" in result.stderr


# A database ahead of the code -----------------------------------------------------------
def database_from_the_future(project: Project) -> None:
    """Migrated by a newer release (0009), then that release's code is rolled back."""
    project.add_revision("0009", "0008", "op.create_table('future', sa.Column('id', sa.Integer))")
    assert project.alembic("upgrade", "head").returncode == 0
    (project.versions / "0009_test.py").unlink()


def test_database_ahead_of_the_code_fails_with_both_revisions_and_the_cause(
    project: Project,
) -> None:
    database_from_the_future(project)
    before = snapshot(project.root)

    message = assert_failed_cleanly(
        project.alembic("upgrade", "head"),
        str(project.db), "is at revision 0009", "newest revision is 0008",
        "older release", "allow_unknown_revision",
    )
    assert "Can't locate revision" not in message
    assert snapshot(project.root) == before
    # `alembic current` explains it the same way instead of "Can't locate revision".
    assert_failed_cleanly(project.alembic("current"), "is at revision 0009")


@pytest.mark.parametrize("where", ["-x", "ini"])
def test_database_ahead_starts_anyway_with_a_warning_when_allowed(
    project: Project, where: str
) -> None:
    database_from_the_future(project)
    before = snapshot(project.root)
    if where == "ini":
        project.ini.write_text(project.ini.read_text().replace(
            "[alembic_sqlite_lock]\n", "[alembic_sqlite_lock]\nallow_unknown_revision = true\n"
        ))
        result = project.alembic("upgrade", "head")
    else:
        result = project.alembic("-x", "lock_allow_unknown_revision=true", "upgrade", "head")

    assert result.returncode == 0, result.stdout + result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("WARN")]
    assert len(warnings) == 1
    assert "is at revision 0009, which this code does not know" in warnings[0]
    assert project.version() == ["0009"]
    assert {n: h for n, h in snapshot(project.root).items() if n != "alembic.ini"} == {
        n: h for n, h in before.items() if n != "alembic.ini"
    }


def test_database_ahead_programmatic(project: Project, caplog: pytest.LogCaptureFixture) -> None:
    database_from_the_future(project)
    with pytest.raises(UnknownDatabaseRevision) as failed:
        alembic_sqlite_lock.upgrade(project.ini)
    assert failed.value.database_revisions == ("0009",)
    assert failed.value.code_heads == ("0008",)

    caplog.set_level(logging.WARNING, logger="alembic_sqlite_lock")
    assert alembic_sqlite_lock.upgrade(Config(str(project.ini)), allow_unknown_revision=True) == []
    assert any("which this code does not know" in r.getMessage() for r in caplog.records)
    with pytest.raises(alembic_sqlite_lock.ConfigurationError, match="true or false"):
        alembic_sqlite_lock.upgrade(project.ini, allow_unknown_revision="maybe")


# Disk full ----------------------------------------------------------------------------------
FILL_BODY = """
op.create_table("blobs", sa.Column("id", sa.Integer, primary_key=True), sa.Column("b", sa.Text))
{limit}
for _ in range(400):
    op.execute("INSERT INTO blobs (b) VALUES (hex(randomblob(4000)))")
"""


def test_disk_full_via_max_page_count(project: Project) -> None:
    assert project.alembic("upgrade", "0008").returncode == 0
    pages = project.query("PRAGMA page_count")[0][0]
    limit = f'op.execute("PRAGMA max_page_count = {int(pages) + 20}")'  # type: ignore[call-overload]
    project.add_revision("0009", "0008", FILL_BODY.format(limit=limit))
    schema_before, db_before = schema(project.db), project.db.read_bytes()

    assert_failed_cleanly(
        project.alembic("upgrade", "head"),
        "database or disk is full", f"The disk holding {project.db} is full",
        "rolled back", "still at 0008",
    )
    assert project.version() == ["0008"]
    assert schema(project.db) == schema_before
    assert project.db.read_bytes() == db_before
    assert integrity(project.db) == "ok"


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> object:
    """A 1 MiB tmpfs (needs root with CAP_SYS_ADMIN; skipped otherwise)."""
    import os
    import subprocess

    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
                          capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr!r}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_disk_full_on_a_real_full_filesystem(project: Project, small_tmpfs: Path) -> None:
    db = small_tmpfs / "app.db"
    set_url(project, f"sqlite:///{db}")
    assert project.alembic("upgrade", "0008").returncode == 0
    project.add_revision("0009", "0008", FILL_BODY.format(limit=""))
    schema_before = schema(db)

    assert_failed_cleanly(
        project.alembic("upgrade", "head"),
        "database or disk is full", f"The disk holding {db} is full", "still at 0008",
    )
    # Pages past the old end may stay allocated; the content is what it was.
    assert schema(db) == schema_before
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [("0008",)]
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()
    assert not Path(str(db) + "-journal").exists()


def test_errors_carry_their_facts_and_pickle() -> None:
    import pickle

    error = DatabaseUnusable("m", url="sqlite:////x/app.db", path="/x/app.db")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.url, copy.path, str(copy)) == ("sqlite:////x/app.db", "/x/app.db", "m")
    ahead = UnknownDatabaseRevision("m", url="u", database_revisions=("9",), code_heads=("8",))
    assert pickle.loads(pickle.dumps(ahead)).database_revisions == ("9",)
