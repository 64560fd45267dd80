"""Relative targets (``upgrade +2``, ``downgrade -1``), pinned to what a worker first saw.

Four workers that each run ``alembic upgrade +2`` mean "the app needs two more
revisions", not eight. Each worker resolves its relative target to an absolute
revision from the database as it found it (the look before the lock); under the lock,
if another worker has moved the database meanwhile, it heads for that absolute
revision instead of counting again from wherever the database now is.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

from alembic.runtime.migration import MigrationContext, RevisionStep
from alembic.script import ScriptDirectory

from ._alembic import StepsFn, downgrade_revs, upgrade_revs

_RELATIVE = re.compile(r"[+-]\d+$")


def pin_relative_target(
    command_fn: StepsFn,
    script: ScriptDirectory,
    destination: object,
    heads_seen: tuple[str, ...],
    steps_seen: Sequence[Any],
) -> StepsFn:
    """``command_fn``, or a version of it that heads for the absolute revision (layer 2
    of _steps.py)."""
    if not (isinstance(destination, str) and _RELATIVE.search(destination) and steps_seen):
        return command_fn
    last = steps_seen[-1]
    if not isinstance(last, RevisionStep):
        return command_fn
    if last.is_upgrade:
        target = str(last.revision.revision)
    else:
        downs = last.to_revisions_no_deps
        if len(downs) > 1:
            return command_fn  # a merge point: no single revision to pin
        target = downs[0] if downs else "base"

    def steps(heads: tuple[str, ...], context: MigrationContext) -> Iterable[Any]:
        if heads == heads_seen:
            return command_fn(heads, context)
        if last.is_upgrade:
            # Alembic returns no steps when the target is already below the heads.
            return upgrade_revs(script, target, heads)
        if not heads:
            return []  # already at base
        below_or_at = {
            rev.revision for rev in script.revision_map.iterate_revisions(heads, "base")
        }
        if target != "base" and target not in below_or_at:
            return []  # another worker already went further down
        return downgrade_revs(script, target, heads)

    return steps
