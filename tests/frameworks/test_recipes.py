"""The framework recipes of docs/how-to.md, run as a reader would run them: each block
in 8 processes at once, in a folder of its own, with the real frameworks.

tests/test_docs.py runs every other block of the docs in the main virtualenv, which has
no frameworks; it skips these as ``not run``, and the reason names the recipe:
``<!-- docs: not run: ...; tests/frameworks/test_recipes.py runs it ... (recipe: NAME) -->``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from frameworkkit import (
    FLASK_APP_SOURCE,
    GENERATED,
    REPO,
    WORKERS,
    Finished,
    Worker,
    assert_healthy,
    check,
    count_lines,
    environment,
    failures,
    fork_script,
    health,
    require,
    run_together,
    scenario,
)

sys.path.insert(0, str(REPO / "tests"))
from docblocks import Block, parse

require("mlflow", "optuna", "flask_migrate", "flask_sqlalchemy")

pytestmark = pytest.mark.slow

HOW_TO = REPO / "docs" / "how-to.md"
RECIPE = re.compile(r"\(recipe: (?P<name>[\w-]+)\)$")


def recipes() -> dict[str, Block]:
    found: dict[str, Block] = {}
    for block in parse(HOW_TO)[0]:
        match = RECIPE.search(block.argument) if block.kind == "not run" else None
        if match:
            assert match.group("name") not in found, f"two blocks are {match.group('name')}"
            found[match.group("name")] = block
    return found


def run_recipe(block: Block, sandbox: Path, *, preload: str = "",
               **env: str) -> list[Worker] | list[Finished]:
    """The block in WORKERS processes released at one instant, in ``sandbox``: a Python
    block in processes forked after ``preload``'s imports (as a server's preload would),
    a shell block as commands of their own."""
    if block.lang == "python":
        (sandbox / "recipe.py").write_text(block.text)
        return fork_script(sandbox / "recipe.py", preload)
    assert block.lang == "sh", block.where
    command = ["bash", "-c", "set -euo pipefail\n" + block.text]
    return run_together([command] * WORKERS, cwd=sandbox, env=environment(**env))


# What each recipe must leave behind ---------------------------------------------------------
def mlflow_jobs(block: Block, sandbox: Path) -> None:
    done = run_recipe(block, sandbox,
                      preload="mlflow,mlflow.store.tracking.sqlalchemy_store,alembic_sqlite_lock")
    assert failures(done) == []
    assert count_lines(done, "Creating initial MLflow database tables") == 1
    heads, (report,) = check("mlflow", sandbox / "mlflow.db")
    assert_healthy(sandbox / "mlflow.db", heads)
    assert report["experiments"] == ["Default", "x"]
    assert report["runs"] == [{"status": "FINISHED", "metrics": ["loss"]}] * WORKERS


def mlflow_upgrade(block: Block, sandbox: Path) -> None:
    done = run_recipe(block, sandbox)
    assert failures(done) == []
    assert count_lines(done, "Creating initial MLflow database tables") == 1
    heads, (report,) = check("mlflow", sandbox / "mlflow.db")
    assert_healthy(sandbox / "mlflow.db", heads)
    assert report == {"experiments": ["Default"], "runs": []}


def optuna_workers(block: Block, sandbox: Path) -> None:
    done = run_recipe(block, sandbox,
                      preload="optuna,optuna.storages._rdb.storage,alembic_sqlite_lock")
    assert failures(done) == []
    assert count_lines(done, "A new study created in RDB with name: s") == 1
    heads, (report,) = check("optuna", sandbox / "optuna.db")
    assert_healthy(sandbox / "optuna.db", heads)
    assert report == {"studies": ["s"], "trials": ["COMPLETE"] * (3 * WORKERS)}


def optuna_upgrade(block: Block, sandbox: Path) -> None:
    scenario("old-optuna", sandbox / "optuna.db", "v2.4.0.a")
    done = run_recipe(block, sandbox)
    assert failures(done) == []
    assert count_lines(done, "Upgrading the storage schema to the latest version.") == 1
    heads, (report,) = check("optuna", sandbox / "optuna.db")
    assert_healthy(sandbox / "optuna.db", heads)
    assert report == {"studies": [], "trials": []}


def flask_upgrade(block: Block, sandbox: Path) -> None:
    """The app of test_flask_migrate.py, its migrations made by `flask db init` and
    `flask db migrate`, and no instance folder yet: a fresh deployment."""
    (sandbox / "app.py").write_text(FLASK_APP_SOURCE)

    def flask(*args: str, **env: str) -> str:
        result = subprocess.run(["flask", *args], cwd=sandbox, capture_output=True,
                                text=True, timeout=120, check=False,
                                env=environment(FLASK_APP="app:create_app", **env))
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout + result.stderr

    scratch = f"sqlite:///{sandbox / 'scratch.db'}"
    flask("db", "init", DATABASE_URL=scratch)
    match = GENERATED.search(flask("db", "migrate", "-m", "all", DATABASE_URL=scratch))
    assert match
    shutil.rmtree(sandbox / "instance", ignore_errors=True)
    # The app's own setting: the relative URL the recipe's --url mirrors.
    done = run_recipe(block, sandbox, FLASK_APP="app:create_app",
                      DATABASE_URL="sqlite:///app.db")
    assert failures(done) == []
    assert count_lines(done, f"Running upgrade  -> {match.group('rev')}") == 1
    db = sandbox / "instance" / "app.db"
    assert_healthy(db, [match.group("rev")])
    assert health(db).versions == [match.group("rev")]
    assert "No new upgrade operations detected" in flask("db", "check",
                                                         DATABASE_URL="sqlite:///app.db")


CHECKS: dict[str, Callable[[Block, Path], None]] = {
    "mlflow-jobs": mlflow_jobs,
    "mlflow-upgrade": mlflow_upgrade,
    "optuna-workers": optuna_workers,
    "optuna-upgrade": optuna_upgrade,
    "flask-upgrade": flask_upgrade,
}


def test_the_how_to_has_exactly_these_recipes() -> None:
    assert sorted(recipes()) == sorted(CHECKS)


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_the_recipe_in_8_processes_at_once(name: str, tmp_path: Path) -> None:
    block = recipes()[name]
    sandbox = tmp_path / "reader"
    sandbox.mkdir()
    CHECKS[name](block, sandbox)
