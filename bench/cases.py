"""The timed cases: cold start, warm start, a long chain, the command line, and a
framework's set-up in ``migration_lock(ready=...)`` on a database set up already.

Repeats are interleaved (every variant and N once per repeat, then the next repeat), so
that drift in the machine's speed spreads over all variants alike. One unmeasured
round per project comes first: it compiles the revision files' bytecode.
"""

from __future__ import annotations

import random
import resource
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import closing
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from . import projects
from .forked import Round, run_together
from .projects import Project
from .stats import Results, Series
from .variants import OURS, READY, SETUP, STOCK, Variant, project_url

ALEMBIC_CLI = Path(sys.executable).with_name("alembic")


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


def command_line(bench: Bench) -> None:
    """`alembic upgrade head` as a new process, timed from its start: cold, then warm."""
    clis = {v.name: bench.project(f"cli-{v.name}", projects.demo_project, stock=v.stock_env)
            for v in (STOCK, OURS)}
    for repeat in range(bench.repeats + 1):
        for name, project in clis.items():
            project.reset()
            for case in ("cli-cold", "cli-warm"):
                seconds, cpu_s, ok = _run_cli(project)
                if repeat:
                    series = bench.results.series(case, name, 1)
                    series.seconds.append(seconds)
                    series.cpu_s.append(cpu_s)
                    series.failed.append(0 if ok else 1)
                    if not demo_state_ok(project):
                        series.broken += 1
                elif not ok:
                    raise RuntimeError(f"{name}: `alembic upgrade head` failed in {project}")
    bench.say("  command line done")


def _run_cli(project: Project) -> tuple[float, float, bool]:
    """Wall time from the process's start to its exit, its CPU time, and success."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(
        [str(ALEMBIC_CLI), "-c", str(project.ini), "upgrade", "head"],
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
