"""The revision cache: a worker at its target imports no revision file, and anything that
could make the cache wrong sends it back to Alembic's own path, never to a wrong answer.

Every revision file of these projects appends its process id to a marker file when it
is imported (executed), so "imported or not" is read off the disk, per process.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import Project, Unprivileged, make_project, upgrade_in_processes

import alembic
import alembic_sqlite_lock
from alembic_sqlite_lock import MultipleHeadsError, UnknownDatabaseRevision, migration_lock
from alembic_sqlite_lock._revcache import DEFAULT_NAME, Known, answer

OURS_CLI = Path(sys.executable).with_name("alembic-sqlite-lock")


def marking(project: Project, marker: Path) -> None:
    """Make every revision file of ``project`` record each import in ``marker``."""
    line = (f"import os as _os\nwith open({str(marker)!r}, 'a') as _marker:\n"
            "    _marker.write(f'{_os.getpid()}\\n')\n")
    for path in project.versions.glob("*.py"):
        path.write_text(line + path.read_text())


def imports(marker: Path) -> int:
    """How many revision files were imported (by every process) since the last call."""
    if not marker.exists():
        return 0
    count = len(marker.read_text().splitlines())
    marker.unlink()
    return count


def cache_file(project: Project) -> Path:
    return project.versions.parent / "__pycache__" / DEFAULT_NAME


@pytest.fixture
def marked(project: Project, tmp_path: Path) -> tuple[Project, Path]:
    """The demo project at head, its revision cache written, imports counted from now."""
    marker = tmp_path / "imported"
    marking(project, marker)
    assert alembic_sqlite_lock.upgrade(project.ini) == [f"000{n}" for n in range(1, 9)]
    assert imports(marker) == 8  # the first run loads them all, as stock Alembic does
    return project, marker


def test_a_worker_at_head_imports_no_revision_file(marked: tuple[Project, Path]) -> None:
    project, marker = marked
    cache = cache_file(project)
    content = json.loads(cache.read_text())
    assert content["heads"] == ["0008"]
    assert sorted(content["revisions"]) == [f"000{n}" for n in range(1, 9)]
    # No wider than the script folder allows (0755 -> 0644), whatever the umask.
    assert stat.S_IMODE(cache.stat().st_mode) == 0o644
    assert alembic_sqlite_lock.upgrade(project.ini) == []
    assert alembic_sqlite_lock.upgrade(project.ini, "heads") == []
    assert alembic_sqlite_lock.upgrade(project.ini, "0008") == []
    for args in (["upgrade", "head"], ["downgrade", "0008"], ["stamp", "0008"]):
        done = project.alembic(*args)
        assert done.returncode == 0, done.stderr
    done = subprocess.run([str(OURS_CLI), "-c", str(project.ini), "upgrade"],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert "already at 0008" in done.stderr
    assert imports(marker) == 0
    assert project.version() == ["0008"]


def test_targets_the_cache_cannot_answer_go_to_alembic(marked: tuple[Project, Path]) -> None:
    project, marker = marked
    # A revision below the database's: Alembic's walk decides.
    assert alembic_sqlite_lock.upgrade(project.ini, "0005") == []
    assert imports(marker) == 8
    assert project.version() == ["0008"]


def test_a_new_revision_is_applied(marked: tuple[Project, Path]) -> None:
    project, marker = marked
    project.add_revision("0009", "0008", 'op.create_table("t9", sa.Column("id", sa.Integer))')
    assert alembic_sqlite_lock.upgrade(project.ini) == ["0009"]
    assert project.version() == ["0009"]
    assert "t9" in project.tables()
    assert imports(marker) == 8  # the key changed: Alembic's path, and a new cache
    assert json.loads(cache_file(project).read_text())["heads"] == ["0009"]
    assert alembic_sqlite_lock.upgrade(project.ini) == []
    assert imports(marker) == 0


def test_a_changed_revision_file_is_loaded_again(marked: tuple[Project, Path]) -> None:
    project, marker = marked
    # Same size, same mtime: only the content tells (a hash, not mtimes).
    path = next(project.versions.glob("0008_*.py"))
    info = path.stat()
    text = path.read_text()
    changed = re.sub(r'(down_revision[^=\n]*= )"0007"', r"\1'0007'", text)
    assert changed != text
    assert len(changed) == len(text)
    path.write_text(changed)
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))
    alembic_sqlite_lock.upgrade(project.ini)
    assert imports(marker) == 8


def test_a_removed_revision_file_is_not_answered_from_the_cache(
    marked: tuple[Project, Path],
) -> None:
    project, _marker = marked
    project.add_revision("0009", "0008", "pass")
    assert alembic_sqlite_lock.upgrade(project.ini) == ["0009"]
    next(project.versions.glob("0009_*.py")).unlink()
    # The database is ahead of the code again: the same error as without a cache.
    with pytest.raises(UnknownDatabaseRevision):
        alembic_sqlite_lock.upgrade(project.ini)


def test_a_second_head_gives_alembics_error(marked: tuple[Project, Path]) -> None:
    project, _marker = marked
    project.add_revision("0009", "0007", "pass")
    with pytest.raises(MultipleHeadsError):
        alembic_sqlite_lock.upgrade(project.ini)
    assert alembic_sqlite_lock.upgrade(project.ini, "heads") == ["0009"]
    assert sorted(project.version()) == ["0008", "0009"]
    assert alembic_sqlite_lock.upgrade(project.ini, "heads") == []


def test_a_new_branch_label_changes_the_key(marked: tuple[Project, Path]) -> None:
    project, marker = marked
    path = next(project.versions.glob("0008_*.py"))
    path.write_text(re.sub(r"(branch_labels[^=\n]*)= None", r"\1= ('x',)", path.read_text()))
    assert alembic_sqlite_lock.upgrade(project.ini) == []
    assert imports(marker) == 8
    assert json.loads(cache_file(project).read_text())["labels"] == ["x"]
    # A branch label names no revision exactly: Alembic resolves it.
    assert alembic_sqlite_lock.upgrade(project.ini, "x@head") == []
    assert imports(marker) == 8


def _alembic_version() -> tuple[int, ...]:
    return tuple(int(part) for part in alembic.__version__.split(".")[:2])


def _set_option(project: Project, line: str) -> None:
    text = project.ini.read_text()
    project.ini.write_text(text.replace("[alembic]\n", f"[alembic]\n{line}\n", 1))


def test_another_version_location_is_loaded(marked: tuple[Project, Path], tmp_path: Path) -> None:
    project, marker = marked
    more = tmp_path / "more_versions"
    more.mkdir()
    (more / "0009_more.py").write_text(
        "revision = '0009'\ndown_revision = '0008'\nbranch_labels = None\n"
        "depends_on = None\n\n\ndef upgrade():\n    from alembic import op\n"
        "    import sqlalchemy as sa\n    op.create_table('t9', sa.Column('id', sa.Integer))\n"
        "\n\ndef downgrade():\n    pass\n")
    # path_separator = os (alembic.ini) is Alembic 1.16's; before, a space separates.
    separator = os.pathsep if _alembic_version() >= (1, 16) else " "
    _set_option(project, f"version_locations = {project.versions}{separator}{more}")
    assert alembic_sqlite_lock.upgrade(project.ini) == ["0009"]
    assert imports(marker) == 8


def test_recursive_version_locations(marked: tuple[Project, Path]) -> None:
    project, marker = marked
    _set_option(project, "recursive_version_locations = true")
    assert alembic_sqlite_lock.upgrade(project.ini) == []
    assert imports(marker) == 8  # the setting is part of the key
    sub = project.versions / "2026"
    sub.mkdir()
    (sub / "0009_sub.py").write_text(
        "revision = '0009'\ndown_revision = '0008'\nbranch_labels = None\n"
        "depends_on = None\n\n\ndef upgrade():\n    pass\n\n\ndef downgrade():\n    pass\n")
    assert alembic_sqlite_lock.upgrade(project.ini) == ["0009"]
    assert alembic_sqlite_lock.upgrade(project.ini) == []


@pytest.mark.parametrize("content", [b"", b"{not json", b"[]", b'{"key": 1}', b"\0" * 100,
                                     b'{"key": "x", "heads": 1}'])
def test_a_corrupt_cache_is_rewritten(marked: tuple[Project, Path], content: bytes) -> None:
    project, _marker = marked
    cache_file(project).write_bytes(content)
    project.add_revision("0009", "0008", "pass")
    assert alembic_sqlite_lock.upgrade(project.ini) == ["0009"]
    assert json.loads(cache_file(project).read_text())["heads"] == ["0009"]


def _lying_cache(project: Project) -> bytes:
    """A cache with the right key that says the head is 0008 while 0009 exists."""
    data = json.loads(cache_file(project).read_text())
    project.add_revision("0009", "0008", 'op.create_table("t9", sa.Column("id", sa.Integer))',
                         'op.drop_table("t9")')
    assert alembic_sqlite_lock.upgrade(project.ini) == ["0009"]
    data["key"] = json.loads(cache_file(project).read_text())["key"]
    assert alembic_sqlite_lock.downgrade(project.ini, "0008") == ["0009"]
    return json.dumps(data).encode()


def test_a_cache_written_by_another_user_is_not_trusted(
    marked: tuple[Project, Path], unprivileged: Unprivileged,
    caplog: pytest.LogCaptureFixture,
) -> None:
    project, _marker = marked
    lie = _lying_cache(project)
    # Control: the same lie from a trusted owner is believed (the test can fail).
    cache_file(project).write_bytes(lie)
    assert alembic_sqlite_lock.upgrade(project.ini) == []
    cache_file(project).unlink()
    cache_file(project).write_bytes(lie)
    if os.geteuid() != 0:
        pytest.skip("needs root to plant a file as another user")
    os.chown(cache_file(project), unprivileged.uid, unprivileged.gid)
    with caplog.at_level(logging.WARNING, logger="alembic_sqlite_lock"):
        assert alembic_sqlite_lock.upgrade(project.ini) == ["0009"]
    assert f"belongs to uid {unprivileged.uid}" in caplog.text
    assert project.version() == ["0009"]


@pytest.mark.parametrize("how", ["world-writable file", "world-writable folder"])
def test_a_cache_others_can_write_is_not_trusted(
    marked: tuple[Project, Path], how: str, caplog: pytest.LogCaptureFixture,
) -> None:
    project, _marker = marked
    lie = _lying_cache(project)
    cache_file(project).write_bytes(lie)
    target = cache_file(project) if how == "world-writable file" else cache_file(project).parent
    target.chmod(0o666 if target.is_file() else 0o777)
    with caplog.at_level(logging.WARNING, logger="alembic_sqlite_lock"):
        assert alembic_sqlite_lock.upgrade(project.ini) == ["0009"]
    assert "writable by every user" in caplog.text


def test_a_planted_symlink_is_not_followed(marked: tuple[Project, Path], tmp_path: Path) -> None:
    project, _marker = marked
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    cache = cache_file(project)
    cache.unlink()
    cache.symlink_to(victim)
    project.add_revision("0009", "0008", "pass")
    assert alembic_sqlite_lock.upgrade(project.ini) == ["0009"]
    assert victim.read_text() == "keep me"
    assert not cache.is_symlink()  # replaced by a rename, never written through
    assert json.loads(cache.read_text())["heads"] == ["0009"]


def test_a_planted_fifo_does_not_block(marked: tuple[Project, Path]) -> None:
    project, _marker = marked
    cache = cache_file(project)
    cache.unlink()
    os.mkfifo(cache)
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(
        alembic_sqlite_lock.upgrade(project.ini)), daemon=True)
    thread.start()
    thread.join(timeout=60)
    assert result == [[]]


def test_turned_off_or_elsewhere(marked: tuple[Project, Path], tmp_path: Path) -> None:
    project, marker = marked
    cache_file(project).unlink()
    assert alembic_sqlite_lock.upgrade(project.ini, revision_cache="off") == []
    assert imports(marker) == 8
    assert not cache_file(project).exists()
    elsewhere = tmp_path / "cache" / "revisions.json"
    for _ in range(2):
        assert alembic_sqlite_lock.upgrade(project.ini, revision_cache=str(elsewhere)) == []
    assert imports(marker) == 8  # the first loads and writes, the second reads
    assert json.loads(elsewhere.read_text())["heads"] == ["0008"]
    done = project.alembic("-x", "lock_revision_cache=off", "upgrade", "head")
    assert done.returncode == 0, done.stderr
    assert imports(marker) == 8


def test_unwritable_and_unreadable_caches_fall_back(
    unprivileged: Unprivileged, shared_dir: Path,
) -> None:
    """As another user: a script folder it cannot write (no cache: every start loads the
    revisions, and works), and a cache file it cannot read."""
    make_project(shared_dir / "proj")
    project = Project(shared_dir / "proj")
    marker = shared_dir / "imported"
    marking(project, marker)
    for path in (shared_dir / "proj", project.versions.parent, project.versions):
        path.chmod(0o755)
    for path in project.versions.glob("*.py"):
        path.chmod(0o644)
    project.ini.chmod(0o644)
    data = shared_dir / "data"
    data.mkdir()
    unprivileged.chown(data)
    text = project.ini.read_text()
    project.ini.write_text(text.replace("%(here)s/app.db", f"{data}/app.db"))
    marker.touch()
    marker.chmod(0o666)
    for _ in range(2):
        done = unprivileged.alembic(project.ini, "upgrade", "head")
        assert done.returncode == 0, done.stderr
        assert len(marker.read_text().splitlines()) == 8
        marker.write_text("")
    assert not cache_file(project).exists()
    # Root writes the cache, then makes it unreadable for the other user.
    done = project.alembic("upgrade", "head")
    assert done.returncode == 0, done.stderr
    if os.geteuid() == 0:
        cache_file(project).chmod(0o600)
        marker.write_text("")
        done = unprivileged.alembic(project.ini, "upgrade", "head")
        assert done.returncode == 0, done.stderr
        assert len(marker.read_text().splitlines()) == 8


def test_files_changed_while_alembic_loads_them_are_not_cached(
    marked: tuple[Project, Path], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Rare path, forced: the fingerprint after loading differs from the one before."""
    from alembic_sqlite_lock import _revcache

    project, _marker = marked
    cache_file(project).unlink()
    real = _revcache.fingerprint
    calls = iter(range(100))
    monkeypatch.setattr(_revcache, "fingerprint",
                        lambda *a, **k: f"{real(*a, **k)}{next(calls)}")
    assert alembic_sqlite_lock.upgrade(project.ini) == []
    assert not cache_file(project).exists()


@pytest.mark.slow
def test_cold_start_only_the_migrating_worker_imports_revisions(
    marked: tuple[Project, Path],
) -> None:
    """8 workers on a fresh file: one migrates, the others wait and see the work done
    from the version table and the cache, without importing a revision file."""
    project, marker = marked
    for suffix in ("", "-journal", "-wal", "-shm"):
        Path(f"{project.db}{suffix}").unlink(missing_ok=True)
    codes, applied = upgrade_in_processes(project.ini, 8)
    assert codes == [0] * 8
    assert sorted(len(a) for a in applied) == [0] * 7 + [8]
    assert project.count("data_migrations") == 1
    pids = set(marker.read_text().splitlines())
    assert len(pids) == 1, f"revision files imported by {len(pids)} workers"


def test_ready_with_an_environment_reads_the_cache(marked: tuple[Project, Path]) -> None:
    project, marker = marked
    ran = []
    with migration_lock(f"sqlite:///{project.db}", ready=str(project.ini)):
        ran.append(True)
    assert ran == [True]
    assert imports(marker) == 0


KNOWN = Known(("c",), frozenset({"a", "b", "c"}), frozenset({"lbl"}))


@pytest.mark.parametrize(("destination", "heads", "upgrade", "expected"), [
    ("head", ("c",), True, True),
    ("heads", ("c",), True, True),
    ("c", ("c",), True, True),
    (("c",), ("c",), False, True),  # stamp's tuple
    ("head", ("b",), True, False),
    ("head", (), True, False),
    ("head", ("b",), False, None),  # downgrade head from below: Alembic's error
    ("b", ("c",), True, None),  # below the database: only Alembic's walk tells
    ("head", ("zzz",), True, None),  # a revision the code does not know
    ("+1", ("b",), True, None),
    ("lbl@head", ("c",), True, None),
    ("lbl", ("c",), True, None),
    ("c3", ("c",), True, None),  # not exact (a prefix match is Alembic's to make)
    (("b", "c"), ("b", "c"), False, None),
])
def test_answer(destination: object, heads: tuple[str, ...], upgrade: bool,
                expected: bool | None) -> None:
    assert answer(KNOWN, destination, heads, upgrade=upgrade) is expected


def test_answer_with_several_heads() -> None:
    known = Known(("b", "c"), frozenset({"a", "b", "c"}), frozenset())
    assert answer(known, "head", ("b", "c"), upgrade=True) is None
    assert answer(known, "heads", ("c", "b"), upgrade=True) is True
    assert answer(known, "heads", ("b",), upgrade=True) is False
