"""Where the SQLite database lives: in memory (works, with a warning) or on a network
filesystem (detected from mountinfo, and warned about)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from alembic.config import Config
from conftest import Project, set_url
from sqlalchemy import create_engine

import alembic_sqlite_lock
from alembic_sqlite_lock._backends._sqlite._diagnose import filesystem_type, is_network_filesystem


def test_memory_url_works_and_warns(project: Project) -> None:
    set_url(project, "sqlite://")
    result = project.alembic("upgrade", "head")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("WARN")]
    assert any("in-memory" in w and "lock is meaningless" in w for w in warnings), warnings
    assert not list(project.root.glob("*" + ".migration-lock"))


def test_handed_in_memory_connection_is_migrated_with_a_warning(
    project: Project, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="alembic_sqlite_lock")
    engine = create_engine("sqlite://")
    with engine.connect() as connection:
        config = Config(str(project.ini))
        config.attributes["connection"] = connection
        applied = alembic_sqlite_lock.upgrade(config)
        tables = {r[0] for r in connection.exec_driver_sql(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert applied[-1] == "0008"
    assert {"users", "posts", "tags", "alembic_version"} <= tables
    assert any("lock is meaningless" in r.getMessage() for r in caplog.records)


MOUNTINFO = r"""22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw
40 22 0:35 / /srv/nfs rw,relatime shared:20 - nfs4 server:/export rw,vers=4.2
41 22 0:36 / /mnt/smb\040share rw,relatime - cifs //host/share rw
42 22 0:37 / /mnt/fuse rw,nosuid - fuse.sshfs user@host:/ rw
43 40 8:2 / /srv/nfs/local rw - xfs /dev/vdb1 rw
44 22 0:38 / /mnt/9p rw - 9p hostshare rw
45 22 0:39 / /srv/nfs2 rw - tmpfs tmpfs rw
"""


@pytest.mark.parametrize(
    ("path", "fstype", "network"),
    [
        ("/var/lib/app", "ext4", False),
        ("/srv/nfs/app", "nfs4", True),
        ("/srv/nfs", "nfs4", True),
        ("/srv/nfs/local/app", "xfs", False),  # a local disk mounted inside the NFS tree
        ("/srv/nfs2/app", "tmpfs", False),  # a prefix of the name is not a parent
        ("/mnt/smb share/app", "cifs", True),  # mountinfo escapes the space as \040
        ("/mnt/fuse/x", "fuse.sshfs", True),
        ("/mnt/9p/x", "9p", True),
    ],
)
def test_filesystem_type_from_mountinfo(path: str, fstype: str, network: bool) -> None:
    assert filesystem_type(path, MOUNTINFO) == fstype
    assert is_network_filesystem(fstype) is network


def test_network_filesystem_warning(caplog: pytest.LogCaptureFixture) -> None:
    from alembic_sqlite_lock._backends._sqlite._diagnose import warn_about_setup

    caplog.set_level(logging.WARNING, logger="alembic_sqlite_lock")
    warn_about_setup("sqlite:////srv/nfs/app/app.db", "/srv/nfs/app/app.db", MOUNTINFO)
    warn_about_setup("sqlite:////var/lib/app.db", "/var/lib/app.db", MOUNTINFO)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1
    assert "on a nfs4 filesystem" in messages[0]
    assert "server database" in messages[0]


def test_this_machines_temp_dir_is_not_reported_as_network(tmp_path: Path) -> None:
    fstype = filesystem_type(str(tmp_path))
    assert fstype is not None
    assert not is_network_filesystem(fstype)
