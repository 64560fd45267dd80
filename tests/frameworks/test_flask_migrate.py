"""Flask-Migrate's ``flask db upgrade``, 8 at once on one fresh SQLite file.

The app's migrations folder is made the way Flask-Migrate's users make it: ``flask db
init``, then ``flask db migrate`` after each change of the models. Its env.py is
Flask-Migrate's, with no lock: started together, upgrades die of ``table user already
exists`` or ``duplicate column name``. Under ``alembic-sqlite-lock exec`` each migration
runs exactly once.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from frameworkkit import (
    FLASK_APP_SOURCE,
    GENERATED,
    PATIENT,
    REPETITIONS,
    WORKERS,
    assert_healthy,
    environment,
    failures,
    health,
    require,
    run_together,
)

require("flask_migrate", "flask_sqlalchemy")

# One xdist worker runs both tests (make test-frameworks: --dist loadgroup), so that the
# module's migrations folder is made once.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("flask-migrate")]



def flask(project: Path, *args: str, db: Path, schema: int = 3) -> str:
    result = subprocess.run(
        ["flask", *args], cwd=project, capture_output=True, text=True, timeout=120,
        env=app_environment(db, schema), check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def app_environment(db: Path, schema: int = 3) -> dict[str, str]:
    return environment(FLASK_APP="app:create_app", DATABASE_URL=f"sqlite:///{db}",
                       APP_SCHEMA=str(schema))


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """An app with three migrations made by Flask-Migrate, and their revisions in order."""
    root = tmp_path_factory.mktemp("flask-app")
    (root / "app.py").write_text(FLASK_APP_SOURCE)
    scratch = root / "scratch.db"  # what `flask db migrate` compares the models with
    flask(root, "db", "init", db=scratch)
    revisions = []
    for schema, message in ((1, "users"), (2, "email"), (3, "posts")):
        printed = flask(root, "db", "migrate", "-m", message, db=scratch, schema=schema)
        match = GENERATED.search(printed)
        assert match, printed
        revisions.append(match.group("rev"))
        if schema < 3:  # the next `migrate` compares the models with this revision
            flask(root, "db", "upgrade", db=scratch, schema=schema)
    return root, revisions


BARE_REPETITIONS = 6
"""Three migrations are over quickly: 8 upgrades without the lock went wrong in 4
repetitions of 5 (1 to 7 of them failing), on a loaded 2-core machine; 6 make a silent
control unlikely."""


def upgrades(db: Path, *, wrapped: bool) -> list[list[str]]:
    command = ["flask", "db", "upgrade"]
    if wrapped:
        command = ["alembic-sqlite-lock", "exec", "--url", f"sqlite:///{db}", *PATIENT,
                   "--", *command]
    return [command] * WORKERS


def test_flask_db_upgrades_under_exec_run_each_migration_once(
    project: tuple[Path, list[str]], tmp_path: Path,
) -> None:
    root, revisions = project
    for repetition in range(REPETITIONS):
        db = tmp_path / f"app-{repetition}.db"
        done = run_together(upgrades(db, wrapped=True), cwd=root,
                            env=app_environment(db), preload="alembic_sqlite_lock._lock")
        assert failures(done) == [], repetition
        steps = [f"Running upgrade {before} -> {after}"
                 for before, after in zip(["", *revisions], revisions, strict=False)]
        for step in steps:  # "Running upgrade  -> abc" for the first one: two spaces
            assert sum(step in finished.log for finished in done) == 1, step
        assert_healthy(db, [revisions[-1]])
        # Flask-Migrate opens it again: at head (or `check` fails), matching the models.
        assert "No new upgrade operations detected" in flask(root, "db", "check", db=db)


def test_control_flask_db_upgrades_without_exec_go_wrong(
    project: tuple[Path, list[str]], tmp_path: Path,
) -> None:
    root, revisions = project
    shown = []
    for repetition in range(BARE_REPETITIONS):
        db = tmp_path / f"app-{repetition}.db"
        done = run_together(upgrades(db, wrapped=False), cwd=root,
                            env=app_environment(db),
                            preload="flask.cli,flask_migrate,flask_sqlalchemy,alembic.command")
        wrong = failures(done) + health(db).problems([revisions[-1]])
        shown.append(wrong)
        if wrong:
            break
    assert any(shown), "no repetition went wrong without exec"


def test_a_folder_from_init_flask_migrate_needs_no_exec(
    project: tuple[Path, list[str]], tmp_path: Path,
) -> None:
    """`alembic-sqlite-lock init --flask-migrate`: Flask-Migrate's files with the
    one-call env.py; the same revisions copied in; 8 bare `flask db upgrade` at once run
    each migration once, and Flask-Migrate's `check` finds the models matched."""
    root, revisions = project
    app = tmp_path / "app"
    app.mkdir()
    (app / "app.py").write_text((root / "app.py").read_text())
    done = subprocess.run(["alembic-sqlite-lock", "init", "--flask-migrate", "migrations"],
                          cwd=app, capture_output=True, text=True, timeout=60,
                          env=environment(), check=False)
    assert done.returncode == 0, done.stderr
    for revision in (root / "migrations" / "versions").glob("*.py"):
        (app / "migrations" / "versions" / revision.name).write_text(revision.read_text())
    for repetition in range(REPETITIONS):
        db = tmp_path / f"app-{repetition}.db"
        finished = run_together(upgrades(db, wrapped=False), cwd=app,
                                env=app_environment(db), preload="alembic_sqlite_lock")
        assert failures(finished) == [], repetition
        steps = [f"Running upgrade {before} -> {after}"
                 for before, after in zip(["", *revisions], revisions, strict=False)]
        for step in steps:
            assert sum(step in worker.log for worker in finished) == 1, step
        assert_healthy(db, [revisions[-1]])
        assert "No new upgrade operations detected" in flask(app, "db", "check", db=db)
