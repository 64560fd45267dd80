"""MySQL / MariaDB only: GET_LOCK on a dedicated connection (a holder killed mid-migration
frees it at once; DDL committed revision by revision), a real user's password, against
the real server at 127.0.0.1:3306.

Each test migrates a database of its own (created and dropped here). Without a server
the tests skip, except under CI=true, where they fail. What every backend does,
including where a failing migration leaves MySQL, is in test_backend_contract.py.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from servers import (
    MY_ADMIN,
    ServerProject,
    add_sleeping_revision,
    admin_engine,
    alembic_popen,
    applied_lines,
    mysql_database,
    mysql_url,
    server_project,
    unique,
    wait_until,
)

from alembic_sqlite_lock._backends._mysql import lock_name


@pytest.fixture
def admin() -> Iterator[sa.Engine]:
    engine = admin_engine(MY_ADMIN)
    yield engine
    engine.dispose()


@pytest.fixture
def database(admin: sa.Engine) -> Iterator[str]:
    with mysql_database(admin) as name:
        yield name


@pytest.fixture
def my_project(tmp_path: Path, database: str) -> ServerProject:
    return server_project(tmp_path / "proj", mysql_url(database))


def _sessions(admin: sa.Engine, like: str) -> int:
    with admin.connect() as connection:
        return int(connection.execute(
            sa.text("SELECT count(*) FROM information_schema.PROCESSLIST WHERE INFO LIKE :q"),
            {"q": like},
        ).scalar_one())


def test_holder_killed_mid_migration_frees_the_lock_at_once(
    my_project: ServerProject, admin: sa.Engine, database: str
) -> None:
    add_sleeping_revision(my_project, "0009", "0008", "SELECT SLEEP(300)")
    name = lock_name(database, "alembic_version")
    holder = alembic_popen(my_project, "upgrade", "head", env={"ALP_HOLD": "1"})
    waiter = None
    try:
        wait_until(lambda: my_project.version() == ["0008"] and
                   _sessions(admin, "SELECT SLEEP(300)%") >= 1,
                   "the holder to sleep inside revision 0009")
        waiter = alembic_popen(my_project, "upgrade", "head")
        wait_until(lambda: _sessions(admin, f"SELECT GET_LOCK('{name}'%") == 1,
                   "the second worker to wait in GET_LOCK")
        holder.send_signal(signal.SIGKILL)
        holder.communicate(timeout=10)

        # The lock's own connection is idle: the server sees it close and frees the lock.
        _out, err = waiter.communicate(timeout=60)
    finally:
        for proc in (holder, waiter):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.communicate()

    assert waiter.returncode == 0, err
    # 0001-0008 had committed one by one before the holder died; only 0009 was left.
    assert applied_lines(err) == ["0009"]
    assert my_project.version() == ["0009"]
    assert my_project.count("data_migrations") == 1


def test_password_never_shows(tmp_path: Path, admin: sa.Engine, database: str) -> None:
    user, password = unique("alp_user"), unique("pw_secret")
    with admin.connect() as connection:
        # %% : PyMySQL formats every statement with its (empty) parameters.
        connection.exec_driver_sql(f"CREATE USER '{user}'@'%%' IDENTIFIED BY '{password}'")
        connection.exec_driver_sql(f"GRANT ALL ON `{database}`.* TO '{user}'@'%%'")
    try:
        project = server_project(tmp_path / "proj", mysql_url(database, user, password))
        outputs = [project.alembic("upgrade", "0008")]
        project.add_revision("0009", "0008", 'op.execute(sa.text("SELECT * FROM nothing"))')
        outputs.append(project.alembic("upgrade", "head"))
        with admin.connect() as hung:
            hung.execute(sa.text("SELECT GET_LOCK('alp-test-held', 0)"))
            outputs.append(project.alembic("-x", "lock_key=alp-test-held", "-x",
                                           "lock_deadline_s=1", "upgrade", "head"))
        assert [r.returncode for r in outputs] == [0, 255, 255], outputs[0].stderr
        for result in outputs:
            assert password not in result.stdout + result.stderr
        assert f"mysql://{user}:***@127.0.0.1:3306/{database}" in outputs[1].stdout
        assert f"mysql://{user}:***@" in outputs[2].stdout
    finally:
        with admin.connect() as connection:
            connection.exec_driver_sql(f"DROP USER IF EXISTS '{user}'@'%%'")
