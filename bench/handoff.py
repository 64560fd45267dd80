"""Lock hand-off latency: from the holder's COMMIT to the next waiting worker running.

Two forked workers on a fresh file whose chain is ``a`` -> ``b``. The holder upgrades
to ``a``, whose migration signals "I hold the lock" and sleeps; only then is the waiter
released, to upgrade to ``b``. It gets ready, finds work, and blocks on the lock. When
the holder commits ``a``, the waiter gets the lock, reads the version again and runs
``b``, whose first statement records the time.

Two latencies are reported, both from the moment the holder's COMMIT returned:

* ``handoff-lock``: until the waiter holds the lock. For the library that is when its
  ``BEGIN IMMEDIATE`` returned; for ``FileLock`` when ``acquire()`` returned.
* ``handoff``: until the waiter's next revision (``b``) starts running: the above plus
  re-reading the version, deciding what to run, and Alembic's per-run set-up.

And its floor, ``handoff-solo``: one worker alone on a fresh file whose only revision
is ``b``, from taking the lock to ``b`` running. That is the set-up every worker that
migrates pays, hand-off or not (in a new process most of it is SQLAlchemy compiling its
first statement); ``handoff`` minus it is what the hand-off itself costs.

The holder's commit is timed in the holder process by wrapping SQLAlchemy's pysqlite
``do_commit`` (and, should the library ever commit with a plain ``COMMIT`` statement,
an ``after_cursor_execute`` listener). All timestamps are on the system-wide monotonic
clock, so they compare across processes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import filelock
from sqlalchemy import event
from sqlalchemy.dialects.sqlite.pysqlite import SQLiteDialect_pysqlite
from sqlalchemy.engine import Engine

from . import projects
from .cases import Bench
from .forked import Crew, Outcome
from .variants import FILELOCK, OURS, Variant

_marks: dict[str, float] = {}


def _instrument() -> None:
    """In a child: remember when this process last committed and last took the lock."""
    original_commit: Callable[..., None] = SQLiteDialect_pysqlite.do_commit
    original_acquire = filelock.BaseFileLock.acquire

    def timed_commit(self: Any, dbapi_connection: Any) -> None:
        original_commit(self, dbapi_connection)
        _marks["last_commit"] = time.monotonic()

    def timed_acquire(self: filelock.BaseFileLock, *args: Any, **kwargs: Any) -> Any:
        result = original_acquire(self, *args, **kwargs)
        _marks["lock_acquired"] = time.monotonic()
        return result

    def after_execute(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        words = statement.split()[:2]
        if words and words[0].upper() in ("COMMIT", "END"):
            _marks["last_commit"] = time.monotonic()
        elif [w.upper() for w in words] == ["BEGIN", "IMMEDIATE"]:
            _marks["lock_acquired"] = time.monotonic()

    SQLiteDialect_pysqlite.do_commit = timed_commit  # type: ignore[method-assign]
    filelock.BaseFileLock.acquire = timed_acquire  # type: ignore[method-assign]
    event.listen(Engine, "after_cursor_execute", after_execute)


def _probe() -> dict[str, float]:
    return dict(_marks)


def measure(bench: Bench, variants: tuple[Variant, ...] = (FILELOCK, OURS)) -> None:
    for variant in variants:
        project = bench.project(f"handoff-{variant.name}", projects.handoff_project,
                                stock=variant.stock_env)
        marks = bench.tmp / f"handoff-{variant.name}-marks"
        marks.mkdir()
        os.environ[projects.HANDOFF_DIR_ENV] = str(marks)
        solo = bench.project(f"handoff-solo-{variant.name}", projects.handoff_solo_project,
                             stock=variant.stock_env)
        to_run = bench.results.series("handoff", variant.name, 2)
        to_lock = bench.results.series("handoff-lock", variant.name, 2)
        alone = bench.results.series("handoff-solo", variant.name, 1)
        for repeat in range(bench.repeats + 1):  # repeat 0 is unmeasured
            latencies = _one(bench, variant, project, marks)
            setup = _solo(bench, variant, solo, marks)
            if repeat == 0:
                continue
            for series, latency in zip((to_lock, to_run, alone), (*latencies, setup),
                                       strict=True):
                series.failed.append(0 if latency is not None else 1)
                if latency is None:
                    series.broken += 1
                else:
                    series.seconds.append(latency)
    bench.say("  hand-off done")


def _one(bench: Bench, variant: Variant, project: projects.Project,
         marks: Path) -> tuple[float | None, float | None]:
    """(commit -> waiter holds the lock, commit -> waiter runs ``b``), in seconds."""
    project.reset()
    for mark in marks.iterdir():
        mark.unlink()
    works = [variant.work(project.ini, "a"), variant.work(project.ini, "b")]
    with Crew(works, log_path=bench.log_path, prepare=_instrument, probe=_probe) as crew:
        crew.release(0)
        deadline = time.monotonic() + 30
        while not (marks / "held").exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{variant.name}: the holder never took the lock")
            time.sleep(0.001)
        waiter_released = crew.release(1)
        holder, waiter = crew.collect()
    commit = _checked_commit(bench, variant, holder, waiter, waiter_released)
    started_b = marks / "b_started"
    if commit is None or not started_b.exists():
        return None, None
    locked = waiter.extra.get("lock_acquired")
    return (None if locked is None else locked - commit,
            float(started_b.read_text()) - commit)


def _solo(bench: Bench, variant: Variant, project: projects.Project,
          marks: Path) -> float | None:
    """One worker alone: from taking the lock to its first revision running, in seconds."""
    project.reset()
    for mark in marks.iterdir():
        mark.unlink()
    with Crew([variant.work(project.ini, "b")], log_path=bench.log_path, prepare=_instrument,
              probe=_probe) as crew:
        crew.release()
        (worker,) = crew.collect()
    locked = worker.extra.get("lock_acquired")
    started_b = marks / "b_started"
    if not worker.ok or locked is None or not started_b.exists():
        bench.say(f"  hand-off {variant.name}: the solo round failed: {worker.error}")
        return None
    return float(started_b.read_text()) - locked


def _checked_commit(bench: Bench, variant: Variant, holder: Outcome, waiter: Outcome,
                    waiter_released: float) -> float | None:
    """The holder's commit time, if the round really was a hand-off."""
    commit = holder.extra.get("last_commit")
    if not (holder.ok and waiter.ok) or commit is None:
        bench.say(f"  hand-off {variant.name}: a round failed: {holder.error} {waiter.error}")
        return None
    if commit < waiter_released:
        bench.say(f"  hand-off {variant.name}: the holder committed before the waiter started")
        return None
    return commit
