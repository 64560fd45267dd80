"""Clear errors for revisions nobody can find, one-line error texts, and the revision
cache that lets a worker at its target skip the revision files.

Alembic reports "Can't locate revision" both for a mistyped argument and for a database
migrated by a newer release; this module tells those apart (and lets an app start on a
newer schema when ``allow_unknown_revision`` says so).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from alembic.script import ScriptDirectory
from alembic.script.revision import MultipleHeads, ResolutionError
from alembic.util import CommandError
from sqlalchemy import exc

import alembic

from . import _alembic, _revcache
from ._errors import (
    MigrationLockError,
    MultipleHeadsError,
    UnknownDatabaseRevision,
    UnknownRevision,
)
from ._sidefile import Owner
from ._urls import describe_url

logger = logging.getLogger(__name__)

SETTING = "allow_unknown_revision"
"""The setting that lets an app start on a database migrated by a newer release."""


def one_line(error: BaseException) -> str:
    """An error as one line: SQLAlchemy's own text spans several (SQL, parameters, link)."""
    if isinstance(error, exc.DBAPIError) and error.orig is not None:
        statement = " ".join(str(error.statement or "").split())
        shown = statement if len(statement) <= 200 else statement[:197] + "..."
        text = f"{type(error.orig).__name__}: {error.orig}"
        return f"{text} (while running: {shown})" if shown else text
    return f"{type(error).__name__}: {' '.join(str(error).split())}".rstrip(".")


# Revisions --------------------------------------------------------------------------------
def revision_guard(fn: Any, script: ScriptDirectory, *, allow_unknown: bool) -> Any:
    """Wrap a command's work function: clear errors for revisions nobody can find
    (layer 4 of _steps.py).

    A database at a revision the code does not have is the classic rolling deploy or
    code rollback: an older release boots against a schema a newer one migrated. With
    ``allow_unknown`` the app starts anyway (nothing migrated) after a WARNING.
    """

    def guarded(heads: tuple[str, ...], context: Any) -> list[Any]:
        try:
            return list(fn(heads, context))
        except MigrationLockError:
            raise
        except CommandError as error:
            url = _shown_url(context)
            unknown = _unknown_revisions(script, heads)
            if unknown:
                ahead = database_ahead(url, script, heads, unknown)
                if not allow_unknown:
                    raise ahead from error
                logger.warning(
                    "Database %s is at revision %s, which this code does not know (its "
                    "heads: %s); starting anyway because %s is set. Nothing was migrated.",
                    url, ", ".join(heads), _heads(script), SETTING,
                )
                return []
            raise revision_error(url, script, error) from error

    return guarded


def _shown_url(context: Any) -> str:
    connection = getattr(context, "connection", None)
    if connection is not None:
        return describe_url(connection.engine.url)
    # No connection yet: a target resolved before a new database file is created.
    env = getattr(context, "environment_context", None)
    url = env.config.get_main_option("sqlalchemy.url") if env is not None else None
    return describe_url(url) if url else "the database"


def _unknown_revisions(script: ScriptDirectory, heads: Iterable[str]) -> list[str]:
    unknown = []
    for head in heads:
        try:
            script.revision_map.get_revision(head)
        except Exception:
            unknown.append(head)
    return unknown


def _heads(script: ScriptDirectory) -> str:
    return ", ".join(script.get_heads()) or "none"


def database_ahead(
    url: str, script: ScriptDirectory, heads: tuple[str, ...], unknown: list[str]
) -> UnknownDatabaseRevision:
    code_heads = _heads(script)
    msg = (
        f"The database {url} is at revision {', '.join(heads)}, but this code does not "
        f"have revision {', '.join(unknown)}: its newest revision is {code_heads} (in "
        f"{script.versions}). Most likely an older release of the app is starting against "
        "a database that a newer release already migrated (a rolling deploy, or a code "
        "rollback without a database downgrade). Deploy the release that contains "
        f"{', '.join(unknown)}, or downgrade the database with that release first "
        f"(`alembic downgrade {code_heads}`). If this release is known to work with the "
        f"newer schema, set {SETTING} = true in [alembic_sqlite_lock] of alembic.ini "
        f"(or -x lock_{SETTING}=true, or upgrade(..., {SETTING}=True)) to start with a "
        "warning instead. Nothing was migrated."
    )
    return UnknownDatabaseRevision(
        msg, url=url, database_revisions=tuple(heads), code_heads=tuple(script.get_heads())
    )


def revision_error(url: str, script: ScriptDirectory, error: CommandError) -> CommandError:
    """A clearer error for a mistyped revision or an ambiguous ``head``."""
    cause = error.__cause__
    code_heads = _heads(script)
    if isinstance(cause, MultipleHeads):
        msg = (
            f"Cannot upgrade {url} to '{cause.argument}': the code in {script.versions} has "
            f"{len(cause.heads)} head revisions ({', '.join(cause.heads)}), so there is no "
            "single newest revision. Merge them (`alembic merge heads -m merge`, commit "
            "and deploy the merge revision), or upgrade to every head with `alembic "
            "upgrade heads`. Nothing was migrated."
        )
        return MultipleHeadsError(msg, url=url, code_heads=tuple(cause.heads))
    if isinstance(cause, ResolutionError):
        msg = (
            f"Revision '{cause.argument}' does not exist in {script.versions}, so {url} "
            f"cannot be migrated to it. The code's newest revision is {code_heads}; "
            "`alembic history` lists them all. Check the revision id (or use head). "
            "Nothing was migrated."
        )
        return UnknownRevision(msg, url=url, revision=str(cause.argument))
    return error


# The revision cache -----------------------------------------------------------------------
class RevisionCache:
    """The revision cache (``_revcache``) of one script folder, as the ``revision_cache``
    setting places it: what it says is right only while the revision files are those it
    was written from, which :meth:`known` checks by hashing them."""

    def __init__(self, script: ScriptDirectory, setting: str) -> None:
        self.script = script
        # sourceless chains load .pyc files whose sources may be gone: not hashed.
        self.path = None if script.sourceless else _revcache.cache_path(script.dir, setting)
        """The cache file; None when turned off."""
        self.key: str | None = None
        """The fingerprint of the revision files when :meth:`known` looked and found no
        right cache: what :meth:`remember` writes it under."""

    def _fingerprint(self) -> str | None:
        return _revcache.fingerprint(
            _alembic.version_locations(self.script),
            recursive=bool(self.script.recursive_version_locations),
            alembic_version=alembic.__version__,
        )

    def known(self) -> _revcache.Known | None:
        """What the cache says, when it was written from the revision files as they are
        now; None: no cache, or not (or no longer) right."""
        if self.path is None:
            return None
        self.key = self._fingerprint()
        if self.key is None:
            return None
        known = _revcache.read(self.path, self.key, Owner.of(self.script.dir))
        if known is not None:
            self.key = None  # right as it is: nothing to remember
        return known

    def remember(self) -> None:
        """Write what this process's revision map says, when :meth:`known` found nothing
        right, the map is loaded already (never loaded for this), and the files are
        still those it hashed: a file changed while Alembic loaded them must not store
        the old graph under the new key. Never fails."""
        if self.path is None or self.key is None:
            return
        if not _alembic.revision_map_loaded(self.script):
            return
        try:
            if self._fingerprint() != self.key:
                logger.debug("Revision files changed while loading them: not cached")
                return
            _revcache.write(self.path, self.key, self._from_map(), Owner.of(self.script.dir))
        except Exception as error:  # a cache, never a reason to fail a run
            logger.debug("Could not write the revision cache %s: %s", self.path, error)
            return
        self.key = None  # written: nothing more to remember

    def _from_map(self) -> _revcache.Known:
        revisions: set[str] = set()
        labels: set[str] = set()
        for script in self.script.walk_revisions():
            revisions.add(script.revision)
            labels.update(script.branch_labels or ())
        heads = tuple(self.script.get_heads())
        return _revcache.Known(heads, frozenset(revisions), frozenset(labels))

    def heads(self) -> tuple[str, ...]:
        """The script's heads: from the cache when it is right, else from Alembic (and
        then remembered)."""
        known = self.known()
        if known is not None:
            return known.heads
        heads = tuple(self.script.get_heads())
        self.remember()
        return heads
