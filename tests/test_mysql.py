"""MySQL / MariaDB: GET_LOCK on a dedicated connection, against the real server at
127.0.0.1:3306.

Each test migrates a database of its own (created and dropped here). Without a server
the tests skip, except under CI=true, where they fail.
"""

from __future__ import annotations

import contextlib
import signal
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import DEMO_REVISIONS, run_together, upgrade_in_processes
from servers import (
    MY_ADMIN,
    ServerProject,
    add_sleeping_revision,
    admin_engine,
    alembic_popen,
    applied_lines,
    check_status_and_current,
    server_project,
    unique,
    wait_until,
)

import alembic_sqlite_lock
from alembic_sqlite_lock import LockTimeout, MigrationError
from alembic_sqlite_lock._backends._mysql import lock_name


@pytest.fixture
def admin() -> Iterator[sa.Engine]:
    engine = admin_engine(MY_ADMIN)
    yield engine
    engine.dispose()


def _kill_sessions(admin: sa.Engine, database: str) -> None:
    """A killed worker's statement may still run on the server (SLEEP): end it."""
    with admin.connect() as connection:
        ids = connection.execute(
            sa.text("SELECT ID FROM information_schema.PROCESSLIST WHERE DB = :db "
                    "AND ID <> CONNECTION_ID()"), {"db": database}
        ).scalars().all()
        for session in ids:
            with contextlib.suppress(sa.exc.DBAPIError):  # it may have ended in between
                connection.exec_driver_sql(f"KILL {int(session)}")


@pytest.fixture
def database(admin: sa.Engine) -> Iterator[str]:
    name = unique("alp")
    with admin.connect() as connection:
        connection.exec_driver_sql(f"CREATE DATABASE `{name}`")
    yield name
    _kill_sessions(admin, name)
    with admin.connect() as connection:
        connection.exec_driver_sql(f"DROP DATABASE IF EXISTS `{name}`")


def _url(database: str, user: str = "", password: str = "") -> str:
    url = sa.make_url(MY_ADMIN).set(drivername="mysql", database=database)
    if user:
        url = url.set(username=user, password=password)
    return url.render_as_string(hide_password=False)


@pytest.fixture
def my_project(tmp_path: Path, database: str) -> ServerProject:
    return server_project(tmp_path / "proj", _url(database))


def assert_migrated_once(project: ServerProject) -> None:
    assert project.version() == ["0008"]
    assert project.count("data_migrations") == 1
    assert project.count("tags") == 3
    assert "post_summaries" in project.tables()


def lock_is_free(admin: sa.Engine, database: str) -> bool:
    with admin.connect() as connection:
        return bool(connection.execute(
            sa.text("SELECT IS_FREE_LOCK(:n)"), {"n": lock_name(database, "alembic_version")}
        ).scalar())


def test_ten_cli_workers_apply_each_migration_once(
    my_project: ServerProject, admin: sa.Engine, database: str
) -> None:
    results = run_together(
        [["alembic", "-c", str(my_project.ini), "upgrade", "head"]] * 10, cwd=my_project.root
    )

    for result in results:
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr
    applied = Counter(rev for r in results for rev in applied_lines(r.stderr))
    assert applied == Counter(DEMO_REVISIONS)
    assert len([r for r in results if applied_lines(r.stderr)]) == 1
    assert_migrated_once(my_project)
    assert lock_is_free(admin, database)


def test_ten_upgrade_processes_apply_each_migration_once(my_project: ServerProject) -> None:
    exit_codes, applied = upgrade_in_processes(my_project.ini, 10)

    assert exit_codes == [0] * 10
    assert sorted(len(revs) for revs in applied) == [0] * 9 + [8]
    assert_migrated_once(my_project)


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


def test_failing_migration_leaves_the_last_fully_applied_revision(
    my_project: ServerProject, admin: sa.Engine, database: str
) -> None:
    my_project.add_revision(
        "0009", "0008",
        'op.create_table("t0009", sa.Column("id", sa.Integer, primary_key=True))\n'
        'op.execute(sa.text("SELECT * FROM no_such_table"))',
    )
    my_project.add_revision(
        "0010", "0009", 'op.create_table("t0010", sa.Column("id", sa.Integer, primary_key=True))'
    )

    with pytest.raises(MigrationError) as caught:
        alembic_sqlite_lock.upgrade(my_project.ini)

    assert caught.value.revision == "0009"
    assert "the version table says 0008" in str(caught.value)
    assert my_project.version() == ["0008"]
    # MySQL committed the failing revision's CREATE TABLE on its own: documented.
    assert "t0009" in my_project.tables()
    assert "t0010" not in my_project.tables()
    assert my_project.count("data_migrations") == 1
    assert lock_is_free(admin, database)

    result = my_project.alembic("upgrade", "head")
    assert result.returncode == 255
    assert "FAILED: Migration 0009 (test revision 0009) failed on" in result.stdout
    assert "Applied migration" not in result.stderr  # nothing new was applied


def test_hung_holder_gives_lock_timeout_at_the_deadline(
    my_project: ServerProject, admin: sa.Engine, database: str
) -> None:
    name = lock_name(database, "alembic_version")
    with admin.connect() as hung:
        assert hung.execute(sa.text("SELECT GET_LOCK(:n, 0)"), {"n": name}).scalar() == 1
        with pytest.raises(LockTimeout) as caught:
            alembic_sqlite_lock.upgrade(
                my_project.ini, deadline_s=2, busy_timeout_s=0.5, max_attempts=100
            )
    error = caught.value
    assert error.waited_s >= 2.0
    assert error.attempts > 1
    assert f"GET_LOCK('{name}')" in str(error)
    assert my_project.tables() == set()
    assert lock_is_free(admin, database)
    assert alembic_sqlite_lock.upgrade(my_project.ini) == DEMO_REVISIONS


def test_password_never_shows(tmp_path: Path, admin: sa.Engine, database: str) -> None:
    user, password = unique("alp_user"), unique("pw_secret")
    with admin.connect() as connection:
        # %% : PyMySQL formats every statement with its (empty) parameters.
        connection.exec_driver_sql(f"CREATE USER '{user}'@'%%' IDENTIFIED BY '{password}'")
        connection.exec_driver_sql(f"GRANT ALL ON `{database}`.* TO '{user}'@'%%'")
    try:
        project = server_project(tmp_path / "proj", _url(database, user, password))
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


def test_status_and_current_of_our_cli(my_project: ServerProject) -> None:
    check_status_and_current(my_project)
