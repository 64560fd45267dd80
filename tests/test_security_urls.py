"""No password ever shown: in the userinfo, in a secret query parameter, in a URL that
does not parse. ``describe_url`` over tricky URLs, then the real commands against the
real servers (a wrong password either is ignored, under trust auth, or fails the
connection: both paths must keep it out of stdout, stderr, JSON and the errors).
"""

from __future__ import annotations

import json
import logging
import pickle
import subprocess
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import REPO, Project, make_project, set_url
from servers import (
    MY_ADMIN,
    PG_ADMIN,
    admin_engine,
    mysql_database,
    postgresql_database,
    server_project,
    unique,
)

import alembic_sqlite_lock
from alembic_sqlite_lock import LockTimeout, MigrationError, MigrationLockError
from alembic_sqlite_lock._errors import lock_timeout
from alembic_sqlite_lock._urls import describe_url

CLI = str(Path(sys.executable).with_name("alembic-sqlite-lock"))
ALEMBIC = str(Path(sys.executable).with_name("alembic"))

SECRET = "Zq7uXvW3kP"
"""Distinctive enough that finding it anywhere in an output can only be a leak."""


# describe_url -----------------------------------------------------------------------------
TRICKY = [
    # (url, the secret that must not appear)
    (f"postgresql://app:{SECRET}@db/app", SECRET),
    (f"postgresql+psycopg://app:{SECRET}@db:5432/app?sslmode=require", SECRET),
    (f"postgresql://app:pa@{SECRET}@db/app", SECRET),  # a bare "@" in the password
    (f"postgresql://app:pa@{SECRET}@db:5432/app", SECRET),
    (f"postgresql://app:a@b/{SECRET}@db/app", SECRET),  # "@" and "/"
    (f"postgresql://app:a:{SECRET}@db/app", SECRET),  # ":"
    (f"postgresql://app:a?{SECRET}@db/app", SECRET),  # "?"
    (f"postgresql://app:a#{SECRET}@db/app", SECRET),  # "#"
    (f"postgresql://app:a%40{SECRET}@db/app", SECRET),  # %-encoded "@"
    (f"postgresql://user@server:{SECRET}@db/app", SECRET),  # Azure-style user name
    (f"postgresql://app@db/app?password={SECRET}", SECRET),
    (f"postgresql://app@db/app?PASSWORD={SECRET}&sslmode=require", SECRET),
    (f"postgresql://app@db/app?sslmode=require&SslPassword={SECRET}", SECRET),
    (f"postgresql://app@db/app?password=one&password={SECRET}", SECRET),
    (f"postgresql://app@db/app?password={SECRET}&password=two", SECRET),
    (f"postgresql://app@db/app?sslpassword=a&{SECRET}&sslmode=require", SECRET),  # bare "&"
    (f"postgresql://app@db/app?application_name=a@b&password={SECRET}", SECRET),
    (f"postgresql://app@db/app?password=a:b@{SECRET}", SECRET),
    (f"postgresql://app@db/app?pass%77ord={SECRET}", SECRET),  # an encoded name
    (f"mysql+pymysql://root@db/app?passwd={SECRET}", SECRET),
    (f"mysql+mysqldb://root@db/app?ssl_key=/k.pem&ssl_password={SECRET}", SECRET),
    (f"mysql://root@db/app?auth_token={SECRET}", SECRET),
    (f"mysql://root@db/app?client_secret={SECRET}", SECRET),
    (f"mssql+pyodbc://sa@dsn?PWD={SECRET}", SECRET),
    (f"postgresql://app:{SECRET}@db:54x2/app", SECRET),  # a port that does not parse
    (f"postgresql://app:a/{SECRET}@db:54x2/app?password={SECRET}", SECRET),
    (f"postgresql://app:a@{SECRET}@[::1/app", SECRET),
    (f"app:{SECRET}@db/app", SECRET),  # no scheme
    (f"postgresql://app:{SECRET}", SECRET),  # "@host" forgotten
    (f"postgresql://app:{SECRET}/db?sslmode=require", SECRET),
    (f"app:a@{SECRET}@db/app", SECRET),
    (f"host=db user=app password={SECRET} dbname=app", SECRET),  # libpq keyword form
    (f"host=db password='a b {SECRET}' dbname=app", SECRET),
    (f"sqlite://app:{SECRET}@//srv/app.db", SECRET),
]


@pytest.mark.parametrize(("url", "secret"), TRICKY)
def test_describe_url_never_shows_a_secret(url: str, secret: str) -> None:
    shown = describe_url(url)
    assert secret not in shown
    assert "***" in shown


@pytest.mark.parametrize(
    "url",
    [
        sa.make_url(f"postgresql://app:pa@{SECRET}@db/app"),
        sa.URL.create("postgresql", "app", f"a@b/{SECRET}:?#", "db", 5432, "app",
                      {"password": SECRET, "sslpassword": ("x", SECRET)}),
    ],
)
def test_describe_url_of_a_url_object(url: sa.URL) -> None:
    shown = describe_url(url)
    assert SECRET not in shown
    assert "***" in shown


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("sqlite:///app.db", "sqlite:///app.db"),
        ("sqlite:////srv/a@b/app.db", "sqlite:////srv/a@b/app.db"),
        ("postgresql://app:pw@db:5432/app", "postgresql://app:***@db:5432/app"),
        ("postgresql://app:p@w@db/app", "postgresql://app:***@db/app"),
        ("postgresql://app@db/app?passfile=/p&sslkey=/k&sslmode=require",
         "postgresql://app@db/app?passfile=/p&sslkey=/k&sslmode=require"),
        ("postgresql://app@db/app?password=pw&sslmode=require",
         "postgresql://app@db/app?password=***&sslmode=require"),
        ("postgresql://app:pw@db:54x/app", "postgresql://app:***@db:54x/app"),
        ("postgresql://db:5432/app", "postgresql://db:5432/app"),
        ("postgresql://[::1]:5432/app", "postgresql://[::1]:5432/app"),
        ("", "<empty URL>"),
    ],
)
def test_describe_url_keeps_the_rest(url: str, shown: str) -> None:
    assert describe_url(url) == shown


# The real commands -------------------------------------------------------------------------
def _commands(project_root: Path, ini: Path) -> list[subprocess.CompletedProcess[str]]:
    runs = []
    for argv in (
        [CLI, "-c", str(ini), "status", "--json"],
        [CLI, "-c", str(ini), "status"],
        [CLI, "-c", str(ini), "upgrade", "head"],
        [CLI, "-c", str(ini), "--verbose", "upgrade", "head"],
        [CLI, "-c", str(ini), "upgrade", "nosuchrevision"],
        [ALEMBIC, "-c", str(ini), "upgrade", "head"],
    ):
        runs.append(subprocess.run(argv, cwd=project_root, capture_output=True, text=True,
                                   timeout=120, check=False))
    return runs


def _assert_never_shown(runs: list[subprocess.CompletedProcess[str]], *secrets: str) -> None:
    for run in runs:
        for secret in secrets:
            assert secret not in run.stdout + run.stderr, (run.args, run.stdout, run.stderr)
        if run.args[-2:] == ["status", "--json"] and run.returncode == 0:
            assert "***" in json.loads(run.stdout)["database"]


def _assert_api_never_shows(ini: Path, caplog: pytest.LogCaptureFixture, *secrets: str) -> None:
    caplog.set_level(logging.DEBUG)
    try:
        alembic_sqlite_lock.upgrade(ini)
    except MigrationLockError as error:
        texts = [str(error), repr(error), str(getattr(error, "url", "")),
                 "".join(traceback.format_exception(error))]
    else:
        texts = []
    texts.append(caplog.text)
    for secret in secrets:
        for text in texts:
            assert secret not in text


@pytest.fixture
def pg_database() -> Iterator[str]:
    admin = admin_engine(PG_ADMIN)
    with postgresql_database(admin) as name:
        yield name
    admin.dispose()


@pytest.fixture
def my_database() -> Iterator[str]:
    admin = admin_engine(MY_ADMIN)
    with mysql_database(admin) as name:
        yield name
    admin.dispose()


def _pg(database: str, userinfo: str = "postgres", query: str = "") -> str:
    base = sa.make_url(PG_ADMIN)
    return (f"postgresql+psycopg://{userinfo}@{base.host}:{base.port}/{database}"
            + (f"?{query}" if query else ""))


def _my(database: str, userinfo: str = "root", query: str = "") -> str:
    base = sa.make_url(MY_ADMIN)
    return (f"mysql+pymysql://{userinfo}@{base.host}:{base.port}/{database}"
            + (f"?{query}" if query else ""))


@pytest.mark.parametrize(
    ("userinfo", "query"),
    [
        (f"postgres:{SECRET}", ""),
        ("postgres", f"password={SECRET}"),
        ("postgres", f"sslmode=prefer&sslpassword={SECRET}"),
    ],
    ids=["userinfo", "password", "sslpassword"],
)
def test_postgresql_never_shows_the_password(
    tmp_path: Path, pg_database: str, userinfo: str, query: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    project = server_project(tmp_path / "p", _pg(pg_database, userinfo, query))
    runs = _commands(project.root, project.ini)
    _assert_never_shown(runs, SECRET)
    # Trust auth ignores the password: the upgrade ran (or failed without showing it).
    _assert_api_never_shows(project.ini, caplog, SECRET)


def test_postgresql_missing_database_never_shows_the_password(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    admin_engine(PG_ADMIN).dispose()  # skip (or fail under CI=true) without a server
    project = server_project(tmp_path / "p", _pg(unique("alp_none"), f"postgres:{SECRET}",
                                                 f"password={SECRET}"))
    runs = _commands(project.root, project.ini)
    assert all(run.returncode != 0 for run in runs)
    _assert_never_shown(runs, SECRET)
    _assert_api_never_shows(project.ini, caplog, SECRET)


def test_postgresql_bare_at_in_the_password_is_never_half_shown(
    tmp_path: Path, pg_database: str, caplog: pytest.LogCaptureFixture,
) -> None:
    # SQLAlchemy ends the password at its first "@" and takes the rest for the host:
    # the connection error would name that host.
    project = server_project(tmp_path / "p", _pg(pg_database, f"postgres:pa@{SECRET}"))
    runs = _commands(project.root, project.ini)
    assert all(run.returncode != 0 for run in runs)
    _assert_never_shown(runs, SECRET)
    assert "%40" in runs[2].stderr  # the error says how to write it
    _assert_api_never_shows(project.ini, caplog, SECRET)


@pytest.mark.parametrize(
    ("userinfo", "query"),
    [
        (f"root:{SECRET}", ""),
        ("root", f"password={SECRET}"),
        (f"root:x{SECRET}", f"charset=utf8mb4&password={SECRET}"),
    ],
    ids=["userinfo", "password", "both"],
)
def test_mariadb_wrong_password_is_never_shown(
    tmp_path: Path, my_database: str, userinfo: str, query: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    project = server_project(tmp_path / "p", _my(my_database, userinfo, query))
    runs = _commands(project.root, project.ini)
    assert all(run.returncode != 0 for run in runs), [r.stderr for r in runs]
    assert any("Access denied" in run.stderr for run in runs)
    _assert_never_shown(runs, SECRET)
    _assert_api_never_shows(project.ini, caplog, SECRET)


@pytest.mark.parametrize(
    "url",
    [  # and one that parses but names no file SQLite can have
        f"postgresql+psycopg://postgres:{SECRET}@127.0.0.1:54x2/test",
        f"postgresql+psycopg://postgres:a/b@{SECRET}@127.0.0.1:5432x/test",
        f"mysql+pymysql://root@127.0.0.1:33o6/test?password={SECRET}",
        f"postgres:{SECRET}@127.0.0.1/test",
        f"postgresql+psycopg://postgres:{SECRET}",  # "@host" forgotten: a port, to SQLAlchemy
        f"sqlite://app:{SECRET}@//srv/app.db",
    ],
)
def test_unparseable_url_never_shows_the_password(
    tmp_path: Path, url: str, caplog: pytest.LogCaptureFixture,
) -> None:
    ini = (REPO / "alembic.ini").read_text()
    root = tmp_path / "p"
    make_project(root, ini_text=ini.replace("sqlite:///%(here)s/app.db", url.replace("%", "%%")))
    runs = _commands(root, root / "alembic.ini")
    assert all(run.returncode != 0 for run in runs[2:])  # status may report a missing file
    _assert_never_shown(runs, SECRET, "a/b")
    _assert_api_never_shows(root / "alembic.ini", caplog, SECRET)


# Through the demo project's ini ------------------------------------------------------------


def test_a_password_in_a_non_sqlite_url_is_never_shown(project: Project) -> None:
    set_url(project, f"postgresql://app:{SECRET}@db.internal:5432/app")
    result = project.alembic("upgrade", "head")
    assert result.returncode != 0
    # PostgreSQL is supported; this host does not exist, and the error must not leak.
    assert "FAILED: Could not read the migration state of" in result.stdout
    assert "postgresql://app:***@db.internal:5432/app" in result.stdout
    assert SECRET not in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_a_password_in_a_sqlite_url_is_never_shown(project: Project) -> None:
    set_url(project, f"sqlite://app:{SECRET}@//srv/app.db")
    result = project.alembic("upgrade", "head")
    assert result.returncode != 0
    assert SECRET not in result.stdout + result.stderr


def test_errors_never_carry_a_password() -> None:
    shown = describe_url(f"postgresql://app:{SECRET}@db/app")
    timeout = lock_timeout(shown, attempts=3, waited_s=1.5)
    failed = MigrationError(f"Migration 0001 failed on {shown}", url=shown, revision="0001")
    for error in (timeout, failed):
        assert isinstance(error, (LockTimeout, MigrationError))
        for text in (str(error), repr(error), repr(error.__dict__),
                     repr(pickle.loads(pickle.dumps(error)).__dict__)):
            assert SECRET not in text
            assert "***" in text
