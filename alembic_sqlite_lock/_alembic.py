"""Every use of Alembic's private API, in one module (as Alembic's ``util/sqla_compat.py``
is for SQLAlchemy): when Alembic moves, this file changes and nothing else.

What we rely on, and why:

* ``ScriptDirectory._upgrade_revs`` / ``_downgrade_revs`` / ``_stamp_revs``: the steps a
  command would take from some heads, which ``alembic.command`` computes the same way
  inside its work functions;
* ``ScriptDirectory._version_locations``: the version locations as Alembic resolved
  them (``package:resource`` forms included), for the revision cache's key;
* ``RevisionMap._revision_map`` (memoized in the instance's ``__dict__``): whether this
  process has loaded the revision files already, so the cache is written only then;
* ``alembic.context._proxy``: the ``EnvironmentContext`` behind the module proxy that
  env.py imports;
* ``EnvironmentContext.context_opts``: the options of the running command, among them
  ``fn``, the command's work function, which we wrap (its name says which command it
  is: ``alembic.command`` names them ``upgrade``, ``downgrade``, ``do_stamp``...), and
  ``destination_rev``/``purge``;
* ``MigrationContext._transaction`` and ``autocommit_block``: to let
  ``autocommit_block()`` commit a transaction Alembic did not begin, and to check (or
  refuse) the block.

tests/test_architecture.py checks that no other module touches these names.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from alembic.runtime.environment import EnvironmentContext
from alembic.runtime.migration import MigrationContext, MigrationStep, RevisionStep, StampStep
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection

StepsFn = Callable[[tuple[str, ...], MigrationContext], Iterable[MigrationStep]]
"""A command's work function: the steps from the database's heads (``context_opts["fn"]``)."""


# The steps from some heads ----------------------------------------------------------------
# alembic.command passes the heads tuple to these too, despite their annotations.
def upgrade_revs(
    script: ScriptDirectory, destination: str, heads: tuple[str, ...]
) -> list[RevisionStep]:
    """The steps ``upgrade destination`` takes from ``heads``."""
    return script._upgrade_revs(destination, heads)  # type: ignore[arg-type]


def downgrade_revs(
    script: ScriptDirectory, destination: str, heads: tuple[str, ...]
) -> list[RevisionStep]:
    """The steps ``downgrade destination`` takes from ``heads``."""
    return script._downgrade_revs(destination, heads)  # type: ignore[arg-type]


def stamp_revs(
    script: ScriptDirectory, destinations: tuple[str, ...], heads: tuple[str, ...]
) -> list[StampStep]:
    """The steps ``stamp destinations`` takes from ``heads``."""
    return script._stamp_revs(destinations, heads)


def version_locations(script: ScriptDirectory) -> list[str]:
    """Every folder Alembic loads revision files from, absolute."""
    return [str(path) for path in script._version_locations]


def revision_map_loaded(script: ScriptDirectory) -> bool:
    """This process has executed the revision files (built the revision map)."""
    return "_revision_map" in vars(script.revision_map)


# The environment of the running command ---------------------------------------------------
def environment_of(context: Any) -> EnvironmentContext | None:
    """The ``EnvironmentContext`` of ``alembic.context`` (the module proxy env.py has) or
    of the instance itself; None outside a running command."""
    if isinstance(context, EnvironmentContext):
        return context
    env = getattr(context, "_proxy", None)
    return env if isinstance(env, EnvironmentContext) else None


def work_function(env: EnvironmentContext) -> StepsFn:
    """The command's work function, as Alembic will call it."""
    fn: StepsFn = env.context_opts["fn"]
    return fn


def set_work_function(env: EnvironmentContext, fn: StepsFn) -> None:
    env.context_opts["fn"] = fn


def is_upgrade(env: EnvironmentContext) -> bool:
    """The running command is an upgrade (``alembic.command.upgrade``'s work function,
    or ``upgrade()``'s, both named so)."""
    fn = env.context_opts.get("fn")
    return getattr(inspect.unwrap(fn), "__name__", None) == "upgrade" if fn else False


def names_destination(env: EnvironmentContext) -> bool:
    """The command goes somewhere (upgrade, downgrade, stamp); current, check and
    autogenerate do not."""
    return "destination_rev" in env.context_opts


def destination(env: EnvironmentContext) -> object:
    """The command's destination revision(s) as given (``+2`` stays relative), or None."""
    return env.context_opts.get("destination_rev")


def purges(env: EnvironmentContext) -> bool:
    """``stamp --purge``: Alembic empties the version table before the work function."""
    return bool(env.context_opts.get("purge"))


def update_options(env: EnvironmentContext, options: Mapping[str, Any]) -> None:
    """Set options of the running command (those ``upgrade()`` held back)."""
    env.context_opts.update(options)


# The migration context of the locked run --------------------------------------------------
def adopt_transaction(migration_context: MigrationContext, connection: Connection) -> None:
    """Let Alembic take the connection's transaction for its own, so that
    ``autocommit_block()`` commits it and begins a new one after the block."""
    migration_context._transaction = connection.get_transaction()


def replace_autocommit_block(
    migration_context: MigrationContext,
    replace: Callable[[Callable[[], Any]], Callable[[], Any]],
) -> None:
    """Put ``replace(autocommit_block)`` in the place of the context's
    ``autocommit_block()``."""
    migration_context.autocommit_block = replace(  # type: ignore[method-assign]
        migration_context.autocommit_block
    )
