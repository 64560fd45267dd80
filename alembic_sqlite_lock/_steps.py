"""The command's work function, wrapped: every layer, in one order, built here.

Alembic asks a command's work function (``context_opts["fn"]``) for the steps to take
from the heads it read; we wrap it. Outermost first, a locked run calls:

1. ``_progress.logging_steps``: logs each step before Alembic runs it and records the
   run's progress (the heads read under the lock, the step running, the steps done) for
   the lines after COMMIT and for the error of a failed run; its ``on_steps`` writes the
   holder record and the backup. Outermost, so that it logs and records exactly the
   steps that run, after every layer below has decided what they are. The locked run
   only: the looks before the lock log nothing.
2. ``_targets.pin_relative_target``: after the look found work for a relative target
   (``upgrade +2``), heads for the absolute revision that look resolved it to when the
   heads read under the lock differ from the ones seen (another worker moved the
   database meanwhile). It needs the heads exactly as Alembic read them, and decides
   which command runs below it.
3. ``answered``: when the revision cache can tell that the command has nothing to do
   from the heads Alembic read (``_revcache.answer``), no step, and no revision file
   loaded to learn it: a worker that waited while another migrated and then takes the
   lock, or finds the database at its target under it, never loads the chain.
4. ``_revisions.revision_guard``: turns Alembic's "Can't locate revision" into our
   errors (a mistyped target, a database ahead of the code, several heads) and lets
   ``allow_unknown_revision`` start anyway. It wraps the command itself, the one that
   resolves revisions, and lets our own errors (the check below) through untouched.
5. ``requiring_run_migrations``: ``upgrade()``, ``downgrade()`` and ``stamp()`` only.
   It refuses to migrate while env.py has not come through ``run_migrations()``
   (Alembic's stock boilerplate takes no lock). Innermost because it is the one layer
   Alembic holds before env.py runs: ``upgrade()`` hands it to the EnvironmentContext,
   and it is what Alembic calls when env.py bypasses us.
6. The command's own function: ``alembic.command``'s, or ``upgrade()``'s.

Layers 1 to 4 are added by :func:`work_function`, 5 by :func:`requiring_run_migrations`.
:func:`installed` puts a built function where Alembic calls it for the locked run, and
puts back what it found.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from alembic.runtime.environment import EnvironmentContext
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from . import _alembic
from ._alembic import StepsFn
from ._progress import Progress, logging_steps
from ._revisions import revision_guard
from ._targets import pin_relative_target


@dataclass(frozen=True)
class Seen:
    """What the look before the lock found: layer 2 pins a relative target from it."""

    destination: object
    """The command's destination as given (``+2``, ``-1``, ``head``...)."""
    heads: tuple[str, ...]
    steps: Sequence[Any]


@dataclass(frozen=True)
class Logged:
    """Layer 1's arguments (see ``_progress.logging_steps``)."""

    progress: Progress
    migrates: bool
    saw_work: bool
    on_steps: Callable[[tuple[str, ...], list[Any]], None] | None = None
    between_steps: Callable[[], None] | None = None


def work_function(
    command: StepsFn,
    script: ScriptDirectory,
    *,
    allow_unknown: bool,
    seen: Seen | None = None,
    logged: Logged | None = None,
    nothing_to_do: Callable[[tuple[str, ...]], bool] | None = None,
) -> StepsFn:
    """``command`` (Alembic's work function, layers 5 and 6) wrapped in layers 4, 3
    (with ``nothing_to_do``), 2 (with ``seen``) and 1 (with ``logged``), in the order
    of the module docstring."""
    fn: StepsFn = revision_guard(command, script, allow_unknown=allow_unknown)
    if nothing_to_do is not None:
        fn = answered(fn, nothing_to_do)
    if seen is not None:
        fn = pin_relative_target(fn, script, seen.destination, seen.heads, seen.steps)
    if logged is not None:
        fn = logging_steps(
            fn,
            logged.progress,
            migrates=logged.migrates,
            saw_work=logged.saw_work,
            on_steps=logged.on_steps,
            between_steps=logged.between_steps,
        )
    return fn


def requiring_run_migrations(
    command: StepsFn,
    *,
    inside: Callable[[], bool],
    refused: Callable[[], BaseException],
) -> StepsFn:
    """Layer 5: ``command``, run only while ``inside()`` (env.py's run_migrations() is
    running); otherwise ``refused()`` is raised before a single step is computed."""

    @functools.wraps(command)  # keeps the command's name (_alembic.is_upgrade)
    def guarded(heads: tuple[str, ...], context: MigrationContext) -> Iterable[Any]:
        if not inside():
            raise refused()
        return command(heads, context)

    return guarded


def answered(command: StepsFn, nothing_to_do: Callable[[tuple[str, ...]], bool]) -> StepsFn:
    """Layer 3: no step, without asking ``command``, when ``nothing_to_do(heads)``."""

    def steps(heads: tuple[str, ...], context: MigrationContext) -> Iterable[Any]:
        if nothing_to_do(heads):
            return []
        return command(heads, context)

    return steps


@contextmanager
def installed(env: EnvironmentContext, fn: StepsFn) -> Iterator[None]:
    """While inside, Alembic's ``env.run_migrations()`` calls ``fn``; after, what it
    called before."""
    original = _alembic.work_function(env)
    _alembic.set_work_function(env, fn)
    try:
        yield
    finally:
        _alembic.set_work_function(env, original)
