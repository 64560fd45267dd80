"""The timed cases: cold start, warm start, a long chain, the command line, a
framework's set-up in ``migration_lock(ready=...)`` on a database set up already, and
warm and cold starts on long chains whose revision files import an application (a
generated 150-revision one, and MLflow's).

Repeats are interleaved (every variant and N once per repeat, then the next repeat), so
that drift in the machine's speed spreads over all variants alike. One unmeasured
round per project comes first: it compiles the revision files' bytecode.
"""

from __future__ import annotations

import importlib
import os
import random
import resource
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import closing
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

import alembic.command
import alembic.config

from alembic_sqlite_lock._revcache import DEFAULT_NAME as DEFAULT_CACHE_NAME

from . import projects
from .forked import Round, Work, run_together
from .projects import Project
from .stats import Results, Series
from .variants import CLI, OURS, READY, SETUP, STOCK, Variant, project_url

BIN = Path(sys.executable).parent
"""The venv's console scripts (``alembic``, ``alembic-sqlite-lock``)."""


@dataclass
class Bench:
    """What every case needs: where to work, how often, and where results go."""

    tmp: Path
    repeats: int
    results: Results
    say: Callable[[str], None]

    @property
    def log_path(self) -> Path:
        return self.tmp / "workers.log"

    def project(self, name: str, make: Callable[..., Project], **options: Any) -> Project:
        """``make(<tmp>/name, **options)``: a new project in this run's directory."""
        return make(self.tmp / name, **options)


def demo_state_ok(project: Project) -> bool:
    """At head, the data migration ran once, the view exists: nothing lost or doubled."""
    if not project.db.exists():
        return False
    try:
        with closing(sqlite3.connect(project.db)) as conn:
            version = conn.execute("SELECT version_num FROM alembic_version").fetchall()
            audit = conn.execute("SELECT count(*) FROM data_migrations").fetchone()[0]
            tags = conn.execute("SELECT count(*) FROM tags").fetchone()[0]
            view = conn.execute(
                "SELECT count(*) FROM sqlite_master WHERE name = 'post_summaries'"
            ).fetchone()[0]
    except sqlite3.Error:
        return False
    return version == [(projects.HEAD,)] and audit == 1 and tags == 3 and view == 1


def record(series: Series, rnd: Round, *, state_ok: bool) -> None:
    series.seconds.append(rnd.elapsed_s)
    series.failed.append(rnd.failed)
    series.cpu_s.append(rnd.cpu_s / len(rnd.outcomes))
    series.errors.update(_error_kind(o.error) for o in rnd.outcomes if not o.ok)
    if not state_ok:
        series.broken += 1


def _error_kind(error: str) -> str:
    """Group errors by kind: the message without table names and numbers."""
    kind, _, message = error.partition(": ")
    for marker in ("already exists", "no such table", "UNIQUE constraint failed",
                   "database is locked", "Can't locate revision", "duplicate column"):
        if marker in message:
            return f"{kind}: ...{marker}..."
    return error[:120]


def cold_and_warm(bench: Bench, variants: Sequence[Variant], cold_ns: Sequence[int],
                  warm: dict[str, Sequence[int]]) -> None:
    """Cold: a fresh file, the whole demo chain. Warm: the database already at head.

    ``warm`` maps a variant's name to the N it is measured at warm.
    """
    cold = {v.name: bench.project(f"cold-{v.name}", projects.demo_project, stock=v.stock_env)
            for v in variants}
    hot = {v.name: bench.project(f"warm-{v.name}", projects.demo_project, stock=v.stock_env)
           for v in variants}
    for v in variants:  # unmeasured: compiles bytecode, and migrates the warm projects
        for project in (cold[v.name], hot[v.name]):
            rnd = run_together(v.work(project.ini), 1, log_path=bench.log_path)
            if rnd.failed or not demo_state_ok(project):
                msg = f"{v.name}: a lone worker failed on {project.root}: {rnd.outcomes}"
                raise RuntimeError(msg)
    shuffler = random.Random(6)
    all_ns = sorted(set(cold_ns).union(*warm.values()))
    for repeat in range(1, bench.repeats + 1):
        started = time.monotonic()
        for n in all_ns:
            # Every variant's cold and warm rounds at one N back to back, in a new order
            # each repeat: the floor (stock solo + stock warm N) and ours are measured
            # under the same conditions, and no variant always follows the same one.
            rounds = [("cold", v) for v in variants if n in cold_ns]
            rounds += [("warm", v) for v in variants if n in warm.get(v.name, ())]
            shuffler.shuffle(rounds)
            for case, v in rounds:
                project = cold[v.name] if case == "cold" else hot[v.name]
                if case == "cold":
                    project.reset()
                rnd = run_together(v.work(project.ini), n, log_path=bench.log_path)
                record(bench.results.series(case, v.name, n), rnd,
                       state_ok=demo_state_ok(project))
        bench.say(f"  cold+warm repeat {repeat}/{bench.repeats}: "
                  f"{time.monotonic() - started:.1f} s")


def lock_ready(bench: Bench, ns: Sequence[int],
               variants: Sequence[Variant] = READY) -> None:
    """A warm start of a framework that sets itself up: N workers find the database at
    head, and each runs the set-up without a lock (``setup``, the floor) or inside
    ``migration_lock(url, ready=...)``, which must find it ready and not take the lock."""
    project = bench.project("lock-ready", projects.demo_project, stock=False)
    rnd = run_together(OURS.work(project.ini), 1, log_path=bench.log_path)
    if rnd.failed or not demo_state_ok(project):
        raise RuntimeError(f"could not migrate {project.root}: {rnd.outcomes}")
    for v in variants:  # unmeasured: compiles bytecode; each ready= must answer yes
        checks = [v.work(project.ini)]
        if v is not SETUP:
            checks.append(partial(_assert_ready, v, project.ini))
        for check in checks:
            rnd = run_together(check, 1, log_path=bench.log_path)
            if rnd.failed:
                raise RuntimeError(f"{v.name}: {rnd.outcomes[0].error}")
    shuffler = random.Random(7)
    for repeat in range(1, bench.repeats + 1):
        started = time.monotonic()
        for n in sorted(ns):
            order = list(variants)
            shuffler.shuffle(order)  # no variant always follows the same one
            for v in order:
                rnd = run_together(v.work(project.ini), n, log_path=bench.log_path)
                record(bench.results.series("lock-ready", v.name, n), rnd,
                       state_ok=demo_state_ok(project))
        bench.say(f"  lock-ready repeat {repeat}/{bench.repeats}: "
                  f"{time.monotonic() - started:.1f} s")


def _assert_ready(variant: Variant, ini: Path) -> None:
    """In a worker: the variant's ready= answers yes, so its block skips the lock."""
    from alembic_sqlite_lock._lock import BlockLock  # private: the answer is not exposed

    assert variant.ready_for is not None
    ready = variant.ready_for(ini)
    lock = BlockLock(project_url(ini), {})
    try:
        if not lock.is_ready(ready):
            raise RuntimeError(f"ready={ready!r} answered no on a database at head")
    finally:
        lock.close()


def long_chain(bench: Bench, lengths: Sequence[int]) -> None:
    """One worker, a fresh file, ``length`` trivial revisions: the cost per revision."""
    chains = {(v.name, length): bench.project(f"chain{length}-{v.name}",
                                              projects.chain_project,
                                              stock=v.stock_env, length=length)
              for v in (STOCK, OURS) for length in lengths}
    for repeat in range(bench.repeats + 1):  # repeat 0 is the unmeasured one
        for (name, length), project in chains.items():
            project.reset()
            variant = STOCK if name == STOCK.name else OURS
            rnd = run_together(variant.work(project.ini), 1, log_path=bench.log_path)
            ok = _version(project) == f"r{length:03d}"
            if repeat:
                record(bench.results.series(f"chain{length}", name, 1), rnd, state_ok=ok)
            elif rnd.failed or not ok:
                raise RuntimeError(f"{name}: the {length}-revision chain failed: {rnd}")
    bench.say("  long chain done")


def command_line(bench: Bench, variants: Sequence[Variant] = CLI) -> None:
    """``upgrade head`` as a new process, timed from its start: cold, then warm. Each
    variant runs its console script (``Variant.script``) on its own project: stock
    ``alembic`` with Alembic's env.py, ``alembic`` with the repository's env.py, and
    ``alembic-sqlite-lock``. The unmeasured first round writes bytecode (and the
    library's revision cache, which the cold rounds keep: it belongs to the code)."""
    clis = {v.name: bench.project(f"cli-{v.name}", projects.demo_project, stock=v.stock_env)
            for v in variants}
    shuffler = random.Random(8)
    for repeat in range(bench.repeats + 1):
        order = list(variants)
        shuffler.shuffle(order)  # no variant always follows the same one
        for variant in order:
            project = clis[variant.name]
            project.reset()
            for case in ("cli-cold", "cli-warm"):
                seconds, cpu_s, ok = _run_cli(project, variant)
                if repeat:
                    series = bench.results.series(case, variant.name, 1)
                    series.seconds.append(seconds)
                    series.cpu_s.append(cpu_s)
                    series.failed.append(0 if ok else 1)
                    if not demo_state_ok(project):
                        series.broken += 1
                elif not ok:
                    raise RuntimeError(f"{variant.name}: `{variant.script} upgrade head` "
                                       f"failed in {project.root}")
    bench.say("  command line done")


def _run_cli(project: Project, variant: Variant) -> tuple[float, float, bool]:
    """Wall time from the process's start to its exit, its CPU time, and success."""
    if variant.script is None:
        raise ValueError(f"{variant.name} has no console script")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(
        [str(BIN / variant.script), "-c", str(project.ini), "upgrade", "head"],
        cwd=project.root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
    )
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return seconds, cpu_s, done.returncode == 0


def _version(project: Project) -> str | None:
    try:
        with closing(sqlite3.connect(project.db)) as conn:
            row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
    except sqlite3.Error:
        return None
    return None if row is None else str(row[0])
# Long chains whose revision files import an application -----------------------------------

LONG_LENGTH = 150
"""The generated heavy chain's length (``long-cold``, ``long-warm``)."""
MLFLOW_MODELS = ("mlflow.store.tracking.dbmodels.models",
                 "mlflow.store.model_registry.dbmodels.models")
"""What MLflow has imported when it migrates (its SQLAlchemy store imports its models
before it upgrades the database): the driver imports them before the MLflow rounds."""


def heavy_state_ok(project: Project, length: int) -> bool:
    """At the chain's head, with every table of the chain (t001...): nothing lost."""
    if not project.db.exists():
        return False
    try:
        with closing(sqlite3.connect(project.db)) as conn:
            version = conn.execute("SELECT version_num FROM alembic_version").fetchall()
            tables = {row[0] for row in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.Error:
        return False
    expected = {f"t{number:03d}" for number in range(1, length + 1)}
    return version == [(f"r{length:03d}",)] and expected <= tables


def revision_cache_file(project: Project) -> Path:
    """Where the library keeps the project's revision cache (the default place)."""
    return project.root / "alembic" / "__pycache__" / DEFAULT_CACHE_NAME


def heavy_chain(bench: Bench, ns: Sequence[int], *, length: int = LONG_LENGTH,
                repeats: int | None = None) -> None:
    """A generated chain of ``length`` revisions whose files import an application
    (``projects.heavy_chain_project``), stock vs ours. Warm (``long-warm``): the database
    already at head, N workers. Cold (``long-cold``): a fresh file, stock alone (the
    floor's first half) and ours with N workers; the revision cache stays (it belongs to
    the code, not the database), so ours's waiters answer from it after the wait.

    The driver never imports the application: each worker pays for it, as a worker
    whose migration step loads the revision files does.
    """
    repeats = bench.repeats if repeats is None else repeats
    _assert_not_imported(projects.APP_PACKAGE)
    variants = (STOCK, OURS)
    cold = {v.name: bench.project(f"long-cold-{v.name}", projects.heavy_chain_project,
                                  stock=v.stock_env, length=length) for v in variants}
    hot = {v.name: bench.project(f"long-warm-{v.name}", projects.heavy_chain_project,
                                 stock=v.stock_env, length=length) for v in variants}
    state_ok = partial(heavy_state_ok, length=length)
    # Unmeasured: each project's first run compiles its bytecode; ours's first run on
    # each of its projects migrates it and writes the revision cache. The stock warm
    # project gets a copy of the database ours migrated.
    for v in (OURS, STOCK):
        for project in (cold[v.name], hot[v.name]):
            if project is hot[STOCK.name]:
                shutil.copyfile(hot[OURS.name].db, project.db)
            rnd = run_together(v.work(project.ini), 1, log_path=bench.log_path)
            if rnd.failed or not state_ok(project):
                raise RuntimeError(f"{v.name}: the {length}-revision chain failed in "
                                   f"{project.root}: {rnd.outcomes}")
    for project in (cold[OURS.name], hot[OURS.name]):
        if not revision_cache_file(project).is_file():
            bench.say(f"  NOTE: no revision cache in {project.root} after its first run: "
                      "ours's rows measure Alembic's path")
    _check_answers_from_cache(bench, hot[OURS.name])
    cold_ns = {STOCK.name: [1], OURS.name: list(ns)}
    shuffler = random.Random(9)
    for repeat in range(1, repeats + 1):
        started = time.monotonic()
        for n in sorted(set(ns)):
            # As in cold_and_warm: every round at one N back to back, in a new order each
            # repeat, so the floor and ours are measured under the same conditions.
            rounds = [("long-cold", v) for v in variants if n in cold_ns[v.name]]
            rounds += [("long-warm", v) for v in variants]
            shuffler.shuffle(rounds)
            for case, v in rounds:
                project = cold[v.name] if case == "long-cold" else hot[v.name]
                if case == "long-cold":
                    project.reset()
                rnd = run_together(v.work(project.ini), n, log_path=bench.log_path)
                record(bench.results.series(case, v.name, n), rnd, state_ok=state_ok(project))
        bench.say(f"  {length}-revision chain repeat {repeat}/{repeats}: "
                  f"{time.monotonic() - started:.1f} s")
    _assert_not_imported(projects.APP_PACKAGE)


def mlflow_chain(bench: Bench, ns: Sequence[int], *, repeats: int | None = None) -> None:
    """MLflow's own revision files (mlflow-skinny's), stock vs ours, N workers finding
    the database at head (``mlflow-warm``). Skipped, with a note, when mlflow-skinny is
    not installed or its chain cannot be set up.

    MLflow's chain starts from tables MLflow creates itself before its first revision,
    so it cannot be upgraded from an empty file: the database is stamped at the head
    (the rounds only read the version). The driver imports MLflow's models first, as
    MLflow has when it migrates: what remains for stock Alembic is executing its
    revision files.
    """
    repeats = bench.repeats if repeats is None else repeats
    versions = projects.mlflow_versions()
    if versions is None:
        bench.say("  NOTE: MLflow chain skipped: mlflow-skinny is not installed "
                  "(.venv/bin/pip install -e '.[bench]')")
        return
    try:
        for name in MLFLOW_MODELS:
            importlib.import_module(name)
    except Exception as error:
        bench.say(f"  NOTE: MLflow chain skipped: importing MLflow failed: {error!r}")
        return
    variants = (STOCK, OURS)
    made = {v.name: bench.project(f"mlflow-{v.name}", projects.mlflow_project,
                                  stock=v.stock_env, versions=versions) for v in variants}
    stock, ours = made[STOCK.name], made[OURS.name]
    rnd = run_together(partial(_stamp_head, stock.ini), 1, log_path=bench.log_path)
    head = _version(stock)
    if rnd.failed or head is None:
        bench.say(f"  NOTE: MLflow chain skipped: `stamp head` failed: {rnd.outcomes}")
        return
    shutil.copyfile(stock.db, ours.db)
    for v in variants:  # unmeasured: compiles bytecode; ours writes its revision cache
        rnd = run_together(v.work(made[v.name].ini), 1, log_path=bench.log_path)
        if rnd.failed or _version(made[v.name]) != head:
            bench.say(f"  NOTE: MLflow chain skipped: {v.name} failed at head: "
                      f"{rnd.outcomes[0].error}")
            return
    if not revision_cache_file(ours).is_file():
        bench.say(f"  NOTE: no revision cache in {ours.root}: ours's rows measure "
                  "Alembic's path")
    _check_answers_from_cache(bench, ours)
    shuffler = random.Random(10)
    for repeat in range(1, repeats + 1):
        started = time.monotonic()
        for n in sorted(set(ns)):
            order = list(variants)
            shuffler.shuffle(order)
            for v in order:
                project = made[v.name]
                rnd = run_together(v.work(project.ini), n, log_path=bench.log_path)
                record(bench.results.series("mlflow-warm", v.name, n), rnd,
                       state_ok=_version(project) == head)
        bench.say(f"  MLflow chain repeat {repeat}/{repeats}: "
                  f"{time.monotonic() - started:.1f} s")


def _stamp_head(ini: Path) -> None:
    alembic.command.stamp(alembic.config.Config(str(ini)), "head")


def _assert_not_imported(package: str) -> None:
    if any(name == package or name.startswith(f"{package}.") for name in sys.modules):
        raise RuntimeError(f"the driver imported {package}: its workers would not pay for it")


def _check_answers_from_cache(bench: Bench, project: Project) -> None:
    """One unmeasured ours worker at head: it must execute no revision file (it answers
    from the revision cache). Says so when it did: ours's rows then measure Alembic's
    path, which the table's ratios will show."""
    rnd = run_together(partial(_loading_no_revision_file, OURS.work(project.ini),
                               project.versions), 1, log_path=bench.log_path)
    if rnd.failed:
        bench.say(f"  NOTE: ours at head in {project.root}: {rnd.outcomes[0].error}")


def _loading_no_revision_file(work: Work, versions: Path) -> None:
    """In a worker: ``work``, then fail if it executed a file in ``versions``."""
    from alembic.util import pyfiles

    loaded: list[str] = []
    original = pyfiles.load_module_py

    def spy(module_id: str, path: str | os.PathLike[str]) -> ModuleType:
        loaded.append(str(path))
        return original(module_id, path)

    pyfiles.load_module_py = spy  # load_python_file looks it up in its module
    try:
        work()
    finally:
        pyfiles.load_module_py = original
    inside = [path for path in loaded if Path(path).is_relative_to(versions)]
    if inside:
        raise RuntimeError(f"executed {len(inside)} revision files: the revision cache "
                           "was not used")
