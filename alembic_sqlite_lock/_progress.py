"""What a locked run is doing: the steps it runs, the lines it logs, the error it raises."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from alembic.runtime.migration import MigrationContext, RevisionStep

from ._alembic import StepsFn
from ._errors import MigrationError, as_original
from ._revisions import one_line

logger = logging.getLogger(__name__)


@dataclass
class Progress:
    before: tuple[str, ...] = ()
    """The heads Alembic read under the lock."""
    running: Any = None
    """The step being run, if any."""
    done: list[Any] = field(default_factory=list)
    """Steps run so far (committed only once the run commits)."""


def logging_steps(
    command_fn: StepsFn,
    progress: Progress,
    *,
    migrates: bool,
    saw_work: bool,
    on_steps: Callable[[tuple[str, ...], list[Any]], None] | None = None,
    between_steps: Callable[[], None] | None = None,
) -> StepsFn:
    """Wrap a command's work function: log each step before Alembic runs it (layer 1
    of _steps.py, the outermost).

    ``on_steps(heads, steps)`` runs once the steps are known, before the first one;
    ``between_steps()`` before each later one (after the previous one was written).
    """

    def steps(heads: tuple[str, ...], context: MigrationContext) -> Iterator[Any]:
        progress.before = heads
        pending = list(command_fn(heads, context))
        if on_steps is not None:
            on_steps(heads, pending)
        if not pending and migrates:
            if saw_work:
                logger.info("All migrations already applied by another worker")
            else:
                logger.info("Database already at %s, nothing to do", revisions(heads))
        for number, step in enumerate(pending):
            if number and between_steps is not None:
                between_steps()
            progress.running = step
            logger.info("%s: %s", verb(step, done=False), describe(step))
            yield step  # Alembic runs the step and writes the version before resuming us
            progress.done.append(step)
        progress.running = None

    return steps


def log_applied(progress: Progress) -> list[str]:
    """After COMMIT: one line per step, and the revisions for upgrade()'s caller."""
    applied = []
    for step in progress.done:
        logger.info("%s: %s", verb(step, done=True), revision_of(step))
        applied.append(revision_of(step))
    return applied


def migration_error(
    url: str,
    progress: Progress,
    error: BaseException,
    heads_now: tuple[str, ...] | None,
    *,
    transactional: bool = True,
    hint: str = "",
) -> MigrationError:
    """The error for a failed run, saying where the database really is now.

    ``hint``: the backend's extra sentence for the cause (its ``failure_hint``), or "".
    """
    if progress.running is not None:
        what = f"Migration {describe(progress.running)} failed on {url}"
        revision: str | None = revision_of(progress.running)
    else:
        what = f"The migration run on {url} failed before it could commit"
        revision = None
    if not transactional:
        where = (
            "This database commits each DDL statement on its own, so the run could not be "
            "rolled back as a whole: the revisions before the failing one are applied and "
            f"the version table says {revisions(heads_now) if heads_now is not None else '?'}"
            "; statements of the failing revision that ran before the error are applied "
            "too. Check them and undo them by hand if needed."
        )
    elif heads_now is None or heads_now == progress.before:
        where = (
            f"The run was rolled back; the database is still at {revisions(progress.before)}."
        )
    else:
        # An autocommit block (or transaction_per_migration) committed part of the run.
        where = (
            f"The run was rolled back to its last commit: the database is at "
            f"{revisions(heads_now)} (it started at {revisions(progress.before)}); "
            "statements a revision committed in an autocommit block stay applied."
        )
    msg = f"{what}: {one_line(error)}. {where} Fix the cause and run again.{hint}"
    return as_original(MigrationError(msg, url=url, revision=revision), error)


def revisions(heads: Iterable[str]) -> str:
    return ", ".join(heads) or "base (no revision)"


def revision_of(step: Any) -> str:
    if isinstance(step, RevisionStep):
        return str(step.revision.revision)
    return ", ".join(step.to_revisions_no_deps) or "base"


def describe(step: Any) -> str:
    doc = step.doc
    return f"{revision_of(step)} ({doc})" if doc else revision_of(step)


def verb(step: Any, *, done: bool) -> str:
    if not isinstance(step, RevisionStep):
        return "Stamped" if done else "Stamping"
    if step.is_upgrade:
        return "Applied migration" if done else "Applying migration"
    return "Reverted migration" if done else "Reverting migration"
