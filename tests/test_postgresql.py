"""PostgreSQL only: the advisory lock's key, lock_scope = transaction, lock_key, a
holder killed mid-statement, autocommit blocks, a real role's password, against the
real server at 127.0.0.1:5432.

Each test migrates a database of its own (created and dropped here). Without a server
the tests skip, except under CI=true, where they fail. What every backend does is in
test_backend_contract.py.
"""

from __future__ import annotations

import signal
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import DEMO_REVISIONS, assert_migrated_once, make_project, run_together
from servers import (
    PG_ADMIN,
    ServerProject,
    add_sleeping_revision,
    admin_engine,
    alembic_popen,
    applied_lines,
    postgresql_database,
    postgresql_url,
    server_project,
    unique,
    wait_until,
)

import alembic_sqlite_lock
from alembic_sqlite_lock import LockTimeout
from alembic_sqlite_lock._backends._postgresql import key_for


@pytest.fixture
def admin() -> Iterator[sa.Engine]:
    engine = admin_engine(PG_ADMIN)
    yield engine
    engine.dispose()


@pytest.fixture
def database(admin: sa.Engine) -> Iterator[str]:
    with postgresql_database(admin) as name:
        yield name


@pytest.fixture
def pg_project(tmp_path: Path, database: str) -> ServerProject:
    return server_project(tmp_path / "proj", postgresql_url(database))


def test_ten_cli_workers_with_a_transaction_scoped_lock_apply_each_migration_once(
    pg_project: ServerProject,
) -> None:
    """The session-scoped default is in the contract suite; the transaction-scoped lock
    (pg_advisory_xact_lock) must serialize the same race."""
    results = run_together(
        [["alembic", "-c", str(pg_project.ini), "-x", "lock_scope=transaction",
          "upgrade", "head"]] * 10,
        cwd=pg_project.root,
    )

    for result in results:
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr
    applied = Counter(rev for r in results for rev in applied_lines(r.stderr))
    assert applied == Counter(DEMO_REVISIONS)
    assert len([r for r in results if applied_lines(r.stderr)]) == 1
    assert_migrated_once(pg_project)


def test_the_key_is_logged_and_stable(pg_project: ServerProject, database: str,
                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="alembic_sqlite_lock")
    alembic_sqlite_lock.upgrade(pg_project.ini)

    key = key_for(database, "public", "alembic_version")
    assert f"PostgreSQL advisory lock key {key} (database {database}, schema public, "\
        "version table alembic_version, session scope)" in caplog.text


def _backend_pids(admin: sa.Engine, database: str, query_like: str) -> list[int]:
    with admin.connect() as connection:
        return list(connection.execute(
            sa.text("SELECT pid FROM pg_stat_activity WHERE datname = :db "
                    "AND query LIKE :q AND state = 'active'"),
            {"db": database, "q": query_like},
        ).scalars())


def _advisory_waiters(admin: sa.Engine, database: str) -> int:
    with admin.connect() as connection:
        return int(connection.execute(
            sa.text("SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
                    "WHERE l.locktype = 'advisory' AND NOT l.granted AND d.datname = :db"),
            {"db": database},
        ).scalar_one())


def test_holder_killed_mid_statement_frees_the_lock_at_once(
    pg_project: ServerProject, admin: sa.Engine, database: str
) -> None:
    """The holder dies inside a 300 s statement; the waiter finishes long before that."""
    add_sleeping_revision(pg_project, "0009", "0008", "SELECT pg_sleep(300)")
    holder = alembic_popen(pg_project, "upgrade", "head", env={"ALP_HOLD": "1"})
    waiter = None
    try:
        wait_until(lambda: bool(_backend_pids(admin, database, "SELECT pg_sleep(300)%")),
                   "the holder to sleep inside revision 0009")
        waiter = alembic_popen(pg_project, "upgrade", "head")
        wait_until(lambda: _advisory_waiters(admin, database) == 1,
                   "the second worker to wait for the advisory lock")
        holder.send_signal(signal.SIGKILL)
        holder.communicate(timeout=10)

        # client_connection_check_interval ends the dead holder's backend within a
        # second; without it the lock would stay held until pg_sleep(300) returned.
        _out, err = waiter.communicate(timeout=60)
    finally:
        for proc in (holder, waiter):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.communicate()

    assert waiter.returncode == 0, err
    assert applied_lines(err) == [*DEMO_REVISIONS, "0009"]  # the holder's run rolled back
    assert pg_project.version() == ["0009"]
    assert pg_project.count("data_migrations") == 1
    assert _backend_pids(admin, database, "SELECT pg_sleep(300)%") == []


def test_lock_key_setting_replaces_the_key(pg_project: ServerProject) -> None:
    with pg_project.engine().connect() as hung:
        hung.execute(sa.text("SELECT pg_advisory_lock(4242)"))
        with pytest.raises(LockTimeout):
            alembic_sqlite_lock.upgrade(pg_project.ini, lock_key=4242, deadline_s=1)
        result = pg_project.alembic("-x", "lock_key=4242", "-x", "lock_deadline_s=1",
                                    "upgrade", "head")
        assert result.returncode == 255
        assert "FAILED: Could not take the migration lock" in result.stdout
        # Another key is not blocked by it.
        assert alembic_sqlite_lock.upgrade(pg_project.ini, lock_key="other app") \
            == DEMO_REVISIONS


def test_password_never_shows(tmp_path: Path, admin: sa.Engine) -> None:
    role, password = unique("alp_user"), unique("pw_secret")
    with admin.connect() as connection:
        connection.exec_driver_sql(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
    try:
        with postgresql_database(admin, owner=role) as database:
            project = server_project(tmp_path / "proj", postgresql_url(database, role, password))
            outputs = [project.alembic("upgrade", "0008")]
            project.add_revision("0009", "0008", 'op.execute(sa.text("SELECT 1 / 0"))')
            outputs.append(project.alembic("upgrade", "head"))
            with project.engine().connect() as hung:
                hung.execute(sa.text("SELECT pg_advisory_lock(77)"))
                outputs.append(project.alembic("-x", "lock_key=77", "-x",
                                               "lock_deadline_s=1", "upgrade", "head"))
            assert [r.returncode for r in outputs] == [0, 255, 255]
            for result in outputs:
                assert password not in result.stdout + result.stderr
            assert f"postgresql://{role}:***@127.0.0.1:5432/{database}" in outputs[1].stdout
            assert f"postgresql://{role}:***@" in outputs[2].stdout
    finally:
        with admin.connect() as connection:
            connection.exec_driver_sql(f"DROP ROLE IF EXISTS {role}")


AUTOCOMMIT_INDEX = """\
with op.get_context().autocommit_block():
    op.execute("CREATE INDEX CONCURRENTLY ix_users_email_9 ON users (email)")
"""


@pytest.mark.parametrize("scope", ["session", "transaction"])
def test_autocommit_block_needs_a_session_scoped_lock(
    pg_project: ServerProject, scope: str
) -> None:
    """CREATE INDEX CONCURRENTLY cannot run in a transaction: autocommit_block() commits
    midway. A session-scoped lock outlives that commit; a transaction-scoped one would not,
    so that run is refused with the way out, and rolled back."""
    assert pg_project.alembic("upgrade", "0008").returncode == 0
    pg_project.add_revision("0009", "0008", AUTOCOMMIT_INDEX)
    result = pg_project.alembic("-x", f"lock_scope={scope}", "upgrade", "head")
    if scope == "session":
        assert result.returncode == 0, result.stdout + result.stderr
        assert pg_project.version() == ["0009"]
        return
    assert result.returncode != 0
    assert "Traceback" not in result.stdout + result.stderr
    assert "uses autocommit_block()" in result.stdout, result.stdout
    assert "Use lock_scope = session" in result.stdout
    assert pg_project.version() == ["0008"]


@pytest.mark.parametrize(("driver", "extra"), [("postgresql+pg8000", "postgresql"),
                                               ("mysql+mariadbconnector", "mysql")])
def test_a_driver_that_is_not_installed_names_the_package(
    tmp_path: Path, driver: str, extra: str
) -> None:
    """Every backend builds its engine in one place; a missing driver is a clear error
    naming our extra, not an ImportError traceback, and nothing is run."""
    ini = make_project(tmp_path / "proj")
    ini.write_text(ini.read_text().replace("sqlite:///%(here)s/app.db",
                                           f"{driver}://u:s3cret@127.0.0.1/test"))
    with pytest.raises(alembic_sqlite_lock.ConfigurationError) as caught:
        alembic_sqlite_lock.upgrade(ini)
    message = str(caught.value)
    assert "is not installed" in message
    assert f"pip install 'alembic-sqlite-lock[{extra}]'" in message
    assert "s3cret" not in message
