"""What the framework tests run in processes of their own (never imported by pytest).

    python scenario.py race FRAMEWORK MODE DB WORKERS OUT [--deadline S] [--no-wait]
    python scenario.py fork-script SCRIPT WORKERS OUT [--preload M,M]
    python scenario.py check FRAMEWORK [DB...]
    python scenario.py hold DB HELD RELEASE
    python scenario.py hold-mid-setup DB PAUSED
    python scenario.py old-optuna DB REVISION
    python scenario.py gate READY_DIR START [--preload M,M] [--script FILE] -- PROGRAM [ARGS]

``race``: imports FRAMEWORK (mlflow or optuna), then forks WORKERS processes, as a
gunicorn master with --preload would, and releases them at one instant (a barrier).
Each runs the framework's own start-up on DB: MODE ``bare`` as the framework ships it,
``lock`` inside ``migration_lock(url)``, ``ready`` inside ``migration_lock(url,
ready=<the framework's migration scripts folder>)``. Worker i writes its output to
OUT/i.log and, when it got that far, OUT/i.json: ``fresh`` (inside the block, the
database had no version row yet: this worker set it up) and ``locked`` (the block held
the migration lock). The exit codes are printed as JSON.

``fork-script``: the same for a Python file (a recipe of the docs), run in its folder.

``check``: what the framework itself reports of each database (experiments, studies,
trials) and the heads of its migration scripts, as JSON.

``hold``: a process inside ``migration_lock(url)`` until RELEASE exists (HELD tells it
is inside). ``hold-mid-setup``: MLflow's start-up inside ``migration_lock(url)``, paused
for good in its 10th migration (PAUSED tells it is there), to be killed.

``old-optuna``: an Optuna storage at an old schema revision, built by Optuna's own
migration scripts, as an older Optuna would have left it.

``gate``: starts a command at the same instant as its siblings: imports the --preload
modules, writes READY_DIR/<pid>, waits for START to exist, then runs --script (a Python
file, in this process) or execs PROGRAM.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import multiprocessing
import os
import sqlite3
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# MLflow sends usage data unless told not to: nothing here may leave the machine.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

STUDY = "s"
EXPERIMENT = "x"
PAUSE_AT_MIGRATION = 10


def url_of(db: str) -> str:
    return f"sqlite:///{db}"


def versions(db: str) -> list[str]:
    """The version rows, read without the framework: [] for a new file or no table."""
    if not os.path.exists(db):
        return []
    connection = sqlite3.connect(f"file:{db}?mode=rw", uri=True, timeout=60)
    try:
        table = connection.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'alembic_version'"
        ).fetchone()
        if table is None:
            return []
        return [row[0] for row in connection.execute("SELECT version_num FROM alembic_version")]
    finally:
        connection.close()


def scripts_folder(framework: str) -> str:
    """The framework's own Alembic scripts folder, as ``ready=`` takes it."""
    if framework == "mlflow":
        import mlflow

        return os.path.join(os.path.dirname(mlflow.__file__), "store", "db_migrations")
    import optuna

    return os.path.join(os.path.dirname(optuna.__file__), "storages", "_rdb", "alembic")


def script_heads(framework: str) -> list[str]:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", scripts_folder(framework))
    return sorted(ScriptDirectory.from_config(config).get_heads())


# The frameworks' start-up, as an app or a job runs it ---------------------------------
Block = Callable[[], contextlib.AbstractContextManager[Any]]


def mlflow_start(url: str, block: Block, seen: dict[str, Any]) -> None:
    """MLflow's documented start of a job: the whole of it in the block."""
    import mlflow

    with block():
        seen["fresh"] = versions(url.removeprefix("sqlite:///")) == []
        mlflow.set_tracking_uri(url)
        mlflow.set_experiment(EXPERIMENT)


def optuna_start(url: str, block: Block, seen: dict[str, Any]) -> None:
    """An Optuna worker: the storage (which creates and stamps the schema) in the block,
    then the study, shared by every worker, and one trial."""
    import optuna

    with block():
        seen["fresh"] = versions(url.removeprefix("sqlite:///")) == []
        storage = optuna.storages.RDBStorage(url)
    study = optuna.create_study(storage=storage, study_name=STUDY, load_if_exists=True)
    study.optimize(lambda trial: trial.suggest_float("x", 0.0, 1.0), n_trials=1)


STARTS = {"mlflow": mlflow_start, "optuna": optuna_start}
PRELOAD = {
    # What a job's start-up imports lazily (MLflow's SQLAlchemy store, about 2 s of it):
    # imported before the fork, as an app preloaded by its server would have it.
    "mlflow": ["mlflow", "mlflow.store.tracking.sqlalchemy_store", "alembic.command"],
    "optuna": ["optuna", "optuna.storages._rdb.storage", "alembic.command"],
}


def make_block(framework: str, mode: str, url: str, settings: dict[str, Any],
               seen: dict[str, Any]) -> Block:
    from alembic_sqlite_lock import migration_lock

    @contextlib.contextmanager
    def block() -> Iterator[None]:
        if mode == "bare":
            seen["locked"] = False
            yield
            return
        ready = scripts_folder(framework) if mode == "ready" else None
        with migration_lock(url, ready=ready, **settings):
            # The run lock file beside the database, held by this process or not.
            seen["locked"] = holds_run_lock(url.removeprefix("sqlite:///"))
            yield

    return block


def holds_run_lock(db: str) -> bool:
    """This process holds an flock on the run lock file (proof from /proc/locks)."""
    lock_file = f"{db}.migration-lock"
    with contextlib.suppress(FileNotFoundError):
        inode = os.stat(lock_file).st_ino
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF" (or "->" for a waiter)
            if "->" in fields or len(fields) < 6 or fields[1] != "FLOCK":
                continue
            mine = int(fields[4]) == os.getpid() and fields[3] == "WRITE"
            if mine and int(fields[5].split(":")[2]) == inode:
                return True
    return False


def fork_together(workers: int, out: Path, job: Callable[[dict[str, Any]], None]) -> None:
    """Fork ``workers`` processes that run ``job`` at one instant (a barrier); worker i
    writes its output to OUT/i.log and what ``job`` noted to OUT/i.json. Prints the exit
    codes as JSON."""
    out.mkdir(parents=True, exist_ok=True)
    fork = multiprocessing.get_context("fork")
    barrier = fork.Barrier(workers, timeout=120)

    def worker(index: int) -> None:
        log = os.open(out / f"{index}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        code = 0
        seen: dict[str, Any] = {}
        try:
            barrier.wait()
            job(seen)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
        except BaseException:
            traceback.print_exc()
            code = 1
        (out / f"{index}.json").write_text(json.dumps(seen))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    procs = [fork.Process(target=worker, args=(index,)) for index in range(workers)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=300)
        if proc.is_alive():
            proc.kill()
            proc.join()
    print(json.dumps([proc.exitcode for proc in procs]))


def race(args: argparse.Namespace) -> None:
    for module in PRELOAD[args.framework]:
        importlib.import_module(module)
    import alembic_sqlite_lock  # noqa: F401  (imported before the fork, as a preload would)

    os.chdir(os.path.dirname(os.path.abspath(args.db)))  # MLflow's ./mlruns goes here
    url = url_of(os.path.abspath(args.db))
    settings: dict[str, Any] = {"deadline_s": args.deadline}
    if args.no_wait:
        settings.update(max_attempts=1, busy_timeout_s=0)

    def job(seen: dict[str, Any]) -> None:
        block = make_block(args.framework, args.mode, url, settings, seen)
        STARTS[args.framework](url, block, seen)

    fork_together(args.workers, Path(args.out), job)


def fork_script(args: argparse.Namespace) -> None:
    """A Python file (a recipe of the docs) run by WORKERS forked processes at once, in
    the file's folder, after the --preload imports."""
    import runpy

    for module in filter(None, args.preload.split(",")):
        importlib.import_module(module)
    script = os.path.abspath(args.script)
    os.chdir(os.path.dirname(script))
    def job(_seen: dict[str, Any]) -> None:
        runpy.run_path(script, run_name="__main__")

    fork_together(args.workers, Path(args.out), job)


def check(args: argparse.Namespace) -> None:
    facts: dict[str, Any] = {"heads": script_heads(args.framework), "databases": []}
    for db in args.dbs:
        url = url_of(os.path.abspath(db))
        if args.framework == "mlflow":
            from mlflow import MlflowClient

            client = MlflowClient(tracking_uri=url)
            experiments = client.search_experiments()
            runs = [
                {"status": run.info.status, "metrics": sorted(run.data.metrics)}
                for experiment in experiments if experiment.name == EXPERIMENT
                for run in client.search_runs([experiment.experiment_id])
            ]
            facts["databases"].append(
                {"experiments": sorted(e.name for e in experiments), "runs": runs})
        else:
            import optuna

            names = optuna.get_all_study_names(storage=url)
            trials = []
            if STUDY in names:
                study = optuna.load_study(study_name=STUDY, storage=url)
                trials = [trial.state.name for trial in study.trials]
            facts["databases"].append({"studies": sorted(names), "trials": trials})
    print(json.dumps(facts))


def hold(args: argparse.Namespace) -> None:
    from alembic_sqlite_lock import migration_lock

    with migration_lock(url_of(os.path.abspath(args.db)), deadline_s=60):
        Path(args.held).touch()
        while not os.path.exists(args.release):
            time.sleep(0.01)


class _PauseAt(logging.Handler):
    """Stops the process for good when Alembic starts the Nth migration."""

    def __init__(self, paused: str) -> None:
        super().__init__()
        self.paused = paused
        self.started = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("Running upgrade"):
            self.started += 1
            if self.started == PAUSE_AT_MIGRATION:
                Path(self.paused).write_text(json.dumps({"pid": os.getpid()}))
                while True:
                    time.sleep(60)


def hold_mid_setup(args: argparse.Namespace) -> None:
    import mlflow

    from alembic_sqlite_lock import migration_lock

    os.chdir(os.path.dirname(os.path.abspath(args.db)))
    url = url_of(os.path.abspath(args.db))
    migrations = logging.getLogger("alembic.runtime.migration")
    migrations.setLevel(logging.INFO)
    migrations.addHandler(_PauseAt(args.paused))
    with migration_lock(url, deadline_s=60):
        mlflow.set_tracking_uri(url)
        mlflow.set_experiment(EXPERIMENT)
    sys.exit("the setup was never paused: fewer migrations than expected")


def old_optuna(args: argparse.Namespace) -> None:
    """Optuna's migrations up to REVISION, and the version row Optuna keeps beside them."""
    logging.basicConfig(level=logging.WARNING)  # Optuna's env.py reads alembic.ini's logging
    import alembic.command
    import sqlalchemy as sa
    from alembic.config import Config
    from sqlalchemy.pool import NullPool

    url = url_of(os.path.abspath(args.db))
    config = Config()
    config.set_main_option("script_location", scripts_folder("optuna"))
    config.set_main_option("sqlalchemy.url", url)
    alembic.command.upgrade(config, args.revision)
    engine = sa.create_engine(url, poolclass=NullPool)
    with engine.begin() as connection:  # schema 12 is what Optuna 2.x wrote
        connection.exec_driver_sql(
            "INSERT INTO version_info (version_info_id, schema_version, library_version) "
            "VALUES (1, 12, '2.4.0')")
    engine.dispose()


def gate(args: argparse.Namespace) -> None:
    for module in filter(None, args.preload.split(",")):
        importlib.import_module(module)
    Path(args.ready_dir, str(os.getpid())).touch()
    while not os.path.exists(args.start):
        time.sleep(0.001)
    command = args.command
    if args.script:
        import runpy

        sys.argv = [args.script, *command]
        runpy.run_path(args.script, run_name="__main__")
        return
    os.execvp(command[0], command)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="name", required=True)
    p = commands.add_parser("race")
    p.add_argument("framework", choices=sorted(STARTS))
    p.add_argument("mode", choices=["bare", "lock", "ready"])
    p.add_argument("db")
    p.add_argument("workers", type=int)
    p.add_argument("out")
    p.add_argument("--deadline", type=float, default=240)
    p.add_argument("--no-wait", action="store_true")
    p.set_defaults(run=race)
    p = commands.add_parser("fork-script")
    p.add_argument("script")
    p.add_argument("workers", type=int)
    p.add_argument("out")
    p.add_argument("--preload", default="")
    p.set_defaults(run=fork_script)
    p = commands.add_parser("check")
    p.add_argument("framework", choices=sorted(STARTS))
    p.add_argument("dbs", nargs="*")
    p.set_defaults(run=check)
    p = commands.add_parser("hold")
    p.add_argument("db")
    p.add_argument("held")
    p.add_argument("release")
    p.set_defaults(run=hold)
    p = commands.add_parser("hold-mid-setup")
    p.add_argument("db")
    p.add_argument("paused")
    p.set_defaults(run=hold_mid_setup)
    p = commands.add_parser("old-optuna")
    p.add_argument("db")
    p.add_argument("revision")
    p.set_defaults(run=old_optuna)
    p = commands.add_parser("gate")
    p.add_argument("ready_dir")
    p.add_argument("start")
    p.add_argument("--preload", default="")
    p.add_argument("--script", default="")
    p.set_defaults(run=gate)
    argv = sys.argv[1:]
    # The gate's command is everything after the first "--", whatever it looks like.
    cut = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:cut])
    args.command = argv[cut + 1:]
    args.run(args)


if __name__ == "__main__":
    main()
