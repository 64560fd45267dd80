"""PgBouncer for real: Debian's pgbouncer between N workers and the test PostgreSQL.

Each test starts a pgbouncer of its own (tests/pgbouncer.py installs the package when it
is missing) in front of a database of its own, with fewer server connections than
workers, so that the workers queue at the pooler:

* session pooling, the default lock_scope: every worker migrates or finds the work done,
  each revision applied once;
* transaction pooling, lock_scope = transaction: the same;
* transaction pooling with the default (session) scope: refused with the error that
  says to set lock_scope = transaction, and nothing is applied twice; also alone, on the
  one server session where another client holds the lock;
* the control: stock Alembic through the same pooler fails the race;
* psycopg 3's prepared statements across runs through PgBouncer 1.18 in transaction
  mode: never prepared by the library's engine (a control shows the clash).

Without PostgreSQL or pgbouncer the tests skip, except under CI=true, where they fail.
"""

from __future__ import annotations

import re
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import DEMO_REVISIONS, applied_lines, run_together
from pgbouncer import PgBouncer, ensure_pgbouncer, running_pgbouncer
from servers import (
    PG_ADMIN,
    ServerProject,
    admin_engine,
    postgresql_database,
    postgresql_url,
    server_project,
)
from workers import Finished

import alembic
import alembic_sqlite_lock
from alembic_sqlite_lock import MigrationError
from alembic_sqlite_lock._backends._postgresql import key_for

WORKERS = 8
POOL_SIZE = 4
"""Server connections per database: half the workers wait at the pooler for one."""
PASSWORD = "s3cret_pw"
"""In every URL; pgbouncer's trust auth never asks for it, and it must never show."""
HOLD_S = 1
"""Revision 0009 sleeps this long, so that every worker arrives while it runs."""
REVISIONS = [*DEMO_REVISIONS, "0009", "0010"]
TABLES = {"alembic_version", "users", "posts", "tags", "post_tags", "data_migrations",
          "post_summaries"}
STOCK_ENV_PY = Path(alembic.__file__).parent / "templates" / "generic" / "env.py"
POOLER_ERROR = (
    "the connection goes through a pooler in transaction-pooling mode (PgBouncer "
    "pool_mode = transaction), where a session-level lock is unsafe. Set lock_scope = "
    "transaction"
)


def _audit(rev: str) -> str:
    return ('op.execute(sa.text("INSERT INTO data_migrations (revision, note) '
            f"VALUES ('{rev}', 'audit')\"))")


@pytest.fixture(scope="session")
def pgbouncer_version() -> str:
    return ensure_pgbouncer()


@pytest.fixture
def admin() -> Iterator[sa.Engine]:
    engine = admin_engine(PG_ADMIN)
    yield engine
    engine.dispose()


@pytest.fixture
def database(admin: sa.Engine, pgbouncer_version: str) -> Iterator[str]:
    with postgresql_database(admin) as name:
        yield name


def racing_project(root: Path, bouncer: PgBouncer, database: str) -> ServerProject:
    """The demo chain plus 0009 (holds the run HOLD_S) and 0010, each of the three data
    revisions writing one audit row, migrating through ``bouncer``."""
    project = server_project(root, bouncer.url(database, password=PASSWORD))
    project.add_revision("0009", "0008",
                         f'op.execute(sa.text("SELECT pg_sleep({HOLD_S})"))\n{_audit("0009")}')
    project.add_revision("0010", "0009", _audit("0010"))
    return project


def race(project: ServerProject, *options: str, deadline_s: float = 60) -> list[Finished]:
    """WORKERS `alembic upgrade head` processes, released at one instant."""
    command = ["alembic", "-c", str(project.ini), "-x", f"lock_deadline_s={deadline_s}",
               *options, "upgrade", "head"]
    return run_together([command] * WORKERS, cwd=project.root, timeout_s=180)


def direct(project: ServerProject, database: str) -> ServerProject:
    """The same database read without the pooler."""
    return ServerProject(project.root, url=postgresql_url(database))


def advisory_locks(admin: sa.Engine, database: str) -> int:
    with admin.connect() as connection:
        return int(connection.execute(
            sa.text("SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
                    "WHERE l.locktype = 'advisory' AND d.datname = :db"), {"db": database},
        ).scalar_one())


def audit_rows(view: ServerProject) -> list[tuple[object, ...]]:
    return view.query("SELECT revision, count(*) FROM data_migrations GROUP BY revision "
                      "ORDER BY revision")


def assert_migrated_exactly_once(results: list[Finished], view: ServerProject) -> None:
    for result in results:
        assert result.returncode == 0, result.stdout + result.stderr
        assert "Traceback" not in result.stdout + result.stderr
        assert PASSWORD not in result.stdout + result.stderr
    applied = Counter(rev for r in results for rev in applied_lines(r.stderr))
    assert applied == Counter(REVISIONS)
    assert len([r for r in results if applied_lines(r.stderr)]) == 1
    assert view.version() == ["0010"]
    assert audit_rows(view) == [("0005", 1), ("0009", 1), ("0010", 1)]
    assert view.count("tags") == 3
    assert view.tables() == TABLES
    engine = view.engine()
    try:
        assert "display_name" in {c["name"] for c in sa.inspect(engine).get_columns("users")}
    finally:
        engine.dispose()


def assert_queued_at_the_pooler(bouncer: PgBouncer) -> None:
    """At most POOL_SIZE server connections served all WORKERS workers."""
    servers = bouncer.log().count("new connection to server")
    assert 1 <= servers <= POOL_SIZE, bouncer.log()


@pytest.mark.slow
def test_session_pooling_migrates_once(
    tmp_path: Path, admin: sa.Engine, database: str
) -> None:
    with running_pgbouncer("session", POOL_SIZE) as bouncer:
        project = racing_project(tmp_path / "proj", bouncer, database)
        results = race(project)
        assert_queued_at_the_pooler(bouncer)
        # pgbouncer's DISCARD ALL and our unlock: no lock stays on a pooled connection.
        assert advisory_locks(admin, database) == 0
    assert_migrated_exactly_once(results, direct(project, database))


@pytest.mark.slow
def test_transaction_pooling_with_lock_scope_transaction_migrates_once(
    tmp_path: Path, admin: sa.Engine, database: str
) -> None:
    with running_pgbouncer("transaction", POOL_SIZE) as bouncer:
        project = racing_project(tmp_path / "proj", bouncer, database)
        results = race(project, "-x", "lock_scope=transaction")
        assert_queued_at_the_pooler(bouncer)
        assert advisory_locks(admin, database) == 0
    assert_migrated_exactly_once(results, direct(project, database))


@pytest.mark.slow
def test_transaction_pooling_with_a_session_lock_is_refused_under_contention(
    tmp_path: Path, database: str
) -> None:
    """Workers handed the server session on which another worker holds the lock (when
    the others' sessions wait in pg_advisory_lock, the pooler's only free one) refuse
    before taking it; a worker whose next transaction lands on another session refuses
    after. The lock of a worker refused after stays on its pooled server connection, and
    workers waiting for it on other connections time out, with the same advice.

    Now and then the pooler happens to hand no worker such a session: then each ran on
    one server session as under session pooling, and the work was done once. The race is
    run again (with a revision more: at its head a look takes no lock) up to three times."""
    with running_pgbouncer("transaction", POOL_SIZE) as bouncer:
        project = racing_project(tmp_path / "proj", bouncer, database)
        done: list[str] = []
        pending = REVISIONS
        for extra in ("0011", "0012", None):
            results = race(project, deadline_s=10)
            # A refusal, or a timeout behind a lock that stayed on a pooled server
            # session (its unlock ran on another one): either says what to do.
            if extra is None or any(r.returncode != 0 for r in results):
                break
            for result in results:
                assert result.returncode == 0, result.stdout + result.stderr
            assert Counter(rev for r in results for rev in applied_lines(r.stderr)) \
                == Counter(pending)
            done += pending
            project.add_revision(extra, done[-1], f'op.execute(sa.text("SELECT pg_sleep('
                                 f'{HOLD_S})"))\n{_audit(extra)}')
            pending = [extra]
    shown = f"postgresql://postgres:***@127.0.0.1:{bouncer.port}/{database}"

    failed = [r for r in results if r.returncode != 0]
    refused = [r for r in failed if POOLER_ERROR in r.stdout]
    assert failed, [r.stdout for r in results]
    for result in refused:
        assert "FAILED: The advisory lock " in result.stdout
        assert re.search(rf"lock (taken )?on {re.escape(shown)} ", result.stdout), result.stdout
        assert "or -x lock_scope=transaction" in result.stdout
    for result in failed:
        assert result.returncode == 255, result.stderr
        assert "Traceback" not in result.stdout + result.stderr
        assert result in refused or (
            f"FAILED: Could not take the migration lock on {shown}" in result.stdout
            and "use lock_scope = transaction behind PgBouncer in transaction mode"
            in result.stdout), result.stdout
    for result in results:
        assert PASSWORD not in result.stdout + result.stderr

    # Nothing applied twice, and never half a run: one worker ran all of it, or none.
    appliers = [applied_lines(r.stderr) for r in results if applied_lines(r.stderr)]
    assert appliers in ([], [pending])
    applied = done + (pending if appliers else [])
    view = direct(project, database)
    if applied:
        assert view.version() == [applied[-1]]
        assert audit_rows(view) == [(rev, 1) for rev in ("0005", "0009", "0010", "0011", "0012")
                                    if rev in applied]
    else:
        assert view.tables() == set()


@pytest.mark.slow
def test_a_server_session_holding_the_lock_already_is_refused(
    tmp_path: Path, database: str
) -> None:
    """One server connection: another client's session lock sits on the very session
    this run is given. pg_advisory_lock would succeed there at once (re-entrant), and
    the run would migrate while the other client holds the lock."""
    with running_pgbouncer("transaction", 1) as bouncer:
        project = racing_project(tmp_path / "proj", bouncer, database)
        engine = project.engine()
        try:
            with engine.connect() as other:
                other.execute(sa.text("SELECT pg_advisory_lock(:key)"),
                              {"key": key_for(database, "public", "alembic_version")})
                other.commit()  # idle: the pooler gives its server session to the next
                with pytest.raises(alembic_sqlite_lock.ConfigurationError) as caught:
                    alembic_sqlite_lock.upgrade(project.ini, deadline_s=10)
        finally:
            engine.dispose()
    assert "is already held by the server session this run was given" in str(caught.value)
    assert POOLER_ERROR in str(caught.value)
    assert direct(project, database).tables() == set()


@pytest.mark.slow
def test_control_stock_alembic_through_the_pooler_fails_the_race(
    tmp_path: Path, database: str
) -> None:
    """Alembic's stock env.py, the same race through the same session pooler: workers
    create the version table at once, and all but one fail."""
    with running_pgbouncer("session", POOL_SIZE) as bouncer:
        project = racing_project(tmp_path / "proj", bouncer, database)
        shutil.copyfile(STOCK_ENV_PY, project.env_py)
        # The stock env.py takes the URL as it is: name the driver that is installed.
        ini = project.ini.read_text().replace("postgresql://", "postgresql+psycopg://")
        project.ini.write_text(ini)
        results = race(project)
    failed = [r for r in results if r.returncode != 0]
    assert failed, [r.stderr for r in results]
    for result in failed:
        assert re.search(r"UniqueViolation|DuplicateTable|already exists", result.stderr), \
            result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("prepared", [False, True], ids=["library", "control-prepared"])
def test_statements_prepared_by_successive_runs_through_transaction_pooling(
    tmp_path: Path, database: str, prepared: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """psycopg 3 prepares a statement it runs 5 times on a connection (_pg3_0, ...);
    behind PgBouncer < 1.21 in transaction mode that prepared statement stays on the
    pooled server session, and the next run preparing one under that name there gets
    DuplicatePreparedStatement. The library's engine never prepares; the control puts
    psycopg's default back and fails."""
    from alembic_sqlite_lock._backends import _postgresql

    if prepared:
        real = _postgresql.server_engine

        def preparing(*args: object, **kwargs: object) -> sa.Engine:
            kwargs.pop("connect_args", None)
            return real(*args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(_postgresql, "server_engine", preparing)
    loop = ("for i in range(10):\n    op.execute(sa.text(\"INSERT INTO data_migrations "
            "(revision, note) VALUES (:r, :n)\").bindparams(r=REV, n=str(i)))")
    with running_pgbouncer("transaction", 1) as bouncer:
        project = server_project(tmp_path / "proj", bouncer.url(database))
        project.add_revision("0009", "0008", loop.replace("REV", "'0009'"))
        project.add_revision("0010", "0009", loop.replace("REV", "'0010'"))
        # One server session for the three runs. psycopg sends DEALLOCATE ALL after DDL
        # (0006 alters a column), so the demo chain leaves no prepared statement there;
        # 0009 leaves _pg3_0, and 0010 prepares _pg3_0 again.
        for target in ("0008", "0009"):
            alembic_sqlite_lock.upgrade(project.ini, target, lock_scope="transaction")
        if prepared:
            with pytest.raises(MigrationError, match="DuplicatePreparedStatement"):
                alembic_sqlite_lock.upgrade(project.ini, "head", lock_scope="transaction")
            return
        assert alembic_sqlite_lock.upgrade(project.ini, "head",
                                           lock_scope="transaction") == ["0010"]
