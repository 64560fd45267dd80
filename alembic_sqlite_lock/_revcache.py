"""What the revision files say, remembered: a worker at its target imports none of them.

To learn that a database is at ``head``, Alembic builds its revision map, and that
means executing every revision file (they often import the application). Every worker,
replica and autoscaled instance pays that on every start, and it grows with the chain.

This module keeps what the map told last time (its heads, every revision id, the branch
labels) in a small JSON file, keyed by a SHA-256 of everything that can change the
answer: the content and relative path of every ``.py`` file in every version location
(walked as Alembic walks them, recursively with ``recursive_version_locations``), the
locations themselves, the script folder, and the versions of Alembic and of this
format. It is checked by hashing on every start, never by mtimes: a changed, added or
removed revision file, another ``version_locations``, another Alembic, all give another
key, and then Alembic's own path is taken (and the file rewritten).

What it does not see: a revision file whose ``revision``/``down_revision`` depend on
something outside the version locations (an environment variable, an imported module).
Turn the cache off for such a chain (``revision_cache = off``). ``sourceless`` chains
are not cached.

The file is plain data: a planted pickle would run code as root. It is read and written
through ``_sidefile`` (no symlink followed, no FIFO blocked on, size bounded, replaced
atomically) and trusted only when it belongs to a user who can change the revision
files anyway: the script folder's owner, this process's user, or root; the folder that
holds it must not be writable by anyone else. Anything wrong with it (missing, corrupt,
unreadable, unwritable, planted, another key) means "unknown", never a wrong answer.

Only targets that name revisions exactly may be answered from it (``head``, ``heads``,
a full revision id): see :func:`answer`.

The standard library only: the command line's answer at head (``_cli/_athead.py``)
reads it without importing Alembic or SQLAlchemy. ``_revisions.RevisionCache`` is the
part that asks Alembic.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass

from . import _sidefile

logger = logging.getLogger(__name__)

FORMAT = 1
"""The file's format; part of the key, so that a new format never reads an old file."""

DEFAULT_NAME = "alembic_sqlite_lock.revisions.json"
"""The file's name in the script folder's ``__pycache__`` (ignored by every VCS setup
that ignores Python's own caches), where it goes unless ``revision_cache`` says."""

OFF = frozenset({"off", "false", "no", "none", "0"})
"""``revision_cache`` values that turn the cache off."""

MAX_BYTES = 4 * 1024 * 1024
"""The most read from a cache file (a chain of 10,000 revisions is well under 1 MB)."""

# Targets Alembic reads as relative (``+2``, ``-1``, ``ae1@+1``) or branch-qualified.
_NOT_EXACT = re.compile(r"[@:]|[+-]\d+$")


@dataclass(frozen=True)
class Known:
    """What the revision map said."""

    heads: tuple[str, ...]
    revisions: frozenset[str]
    labels: frozenset[str]


def cache_path(script_dir: str, setting: str) -> str | None:
    """Where the cache of the script folder lives: ``setting`` empty -> its
    ``__pycache__``; off -> None; else that file (relative to the script folder)."""
    value = setting.strip()
    if value.lower() in OFF:
        return None
    if not value:
        return os.path.join(script_dir, "__pycache__", DEFAULT_NAME)
    return os.path.join(script_dir, os.path.expanduser(value))


def answer(known: Known, destination: object, heads: tuple[str, ...], *,
           upgrade: bool) -> bool | None:
    """Has the command nothing to do from the database's ``heads``? True: nothing
    (Alembic would compute no step); False: it has work (upgrade only: every known
    revision other than the heads is below them); None: the cache cannot tell, ask
    Alembic (a relative or branch target, a revision the code does not know, several
    heads for ``head``, a revision below the database's...)."""
    if isinstance(destination, tuple) and len(destination) == 1:  # stamp's
        destination = destination[0]
    if not isinstance(destination, str) or not set(heads) <= known.revisions:
        return None
    if destination in ("head", "heads"):
        if destination == "head" and len(known.heads) != 1:
            return None  # Alembic's MultipleHeads error says it best
        if sorted(heads) == sorted(known.heads):
            return True
        return False if upgrade else None
    exact = (destination in known.revisions and destination not in known.labels
             and not _NOT_EXACT.search(destination))
    # Above or beside a revision id: only Alembic's walk can tell.
    return True if exact and heads == (destination,) else None


def fingerprint(locations: list[str], *, recursive: bool, alembic_version: str) -> str | None:
    """A SHA-256 of everything that decides the revision map (see the module
    docstring): ``locations`` are the version locations as Alembic resolved them. None
    when a file cannot be read (the cache is then not used)."""
    # Normalized: Alembic releases spell an absolute location differently ("a/./b").
    locations = [os.path.normpath(os.path.abspath(location)) for location in locations]
    digest = hashlib.sha256()
    digest.update(json.dumps({
        "format": FORMAT, "alembic": alembic_version, "locations": locations,
        "recursive": recursive,
    }, sort_keys=True).encode())
    try:
        for location in locations:
            for relative, path in _revision_files(location, recursive=recursive):
                with open(path, "rb") as file:
                    data = file.read()
                name = f"{location}\0{relative}".encode()
                digest.update(len(name).to_bytes(8, "big") + name)
                digest.update(len(data).to_bytes(8, "big") + data)
    except OSError as error:
        logger.debug("Cannot hash the revision files (%s): revision cache not used", error)
        return None
    return digest.hexdigest()


def _revision_files(location: str, *, recursive: bool) -> list[tuple[str, str]]:
    """(relative path, path) of every .py file Alembic could load from ``location``, in
    a stable order. As Alembic: ``__pycache__`` skipped, subfolders only when recursive,
    symlinked folders not entered. (os.scandir, not os.walk and relpath: this runs on
    every start, and relpath alone was a third of it.)"""
    found: list[tuple[str, str]] = []

    def visit(folder: str, prefix: str) -> None:
        try:
            entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
        except FileNotFoundError:
            return  # Alembic skips a version location that does not exist
        subfolders = []
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                if recursive and entry.name != "__pycache__":
                    subfolders.append(entry)
            elif entry.name.endswith(".py"):
                found.append((prefix + entry.name, entry.path))
        for entry in subfolders:
            visit(entry.path, f"{prefix}{entry.name}/")

    visit(location, "")
    return found


def _open(path: str, owner: _sidefile.Owner) -> int | None:
    """A descriptor of the cache file, in a folder only trusted users can change; None
    when there is none or it must not be used."""
    folder, name = os.path.split(path)
    try:
        dir_fd = _sidefile.open_folder(folder, owner, create=False)
        try:
            return _sidefile.open_existing(name, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)
    except FileNotFoundError:
        return None
    except OSError as error:
        _refused(path, error)
        return None


def read(path: str, key: str, owner: _sidefile.Owner) -> Known | None:
    """The cache at ``path`` when it is for ``key`` and trusted (``owner``: whose
    revision files these are); None otherwise, never an error."""
    fd = _open(path, owner)
    if fd is None:
        return None
    try:
        info = os.fstat(fd)
        if not owner.trusts(info.st_uid):
            _refused(path, _sidefile.UnsafeSideFile(
                path, f"belongs to uid {info.st_uid}, who cannot change the revision files"))
            return None
        others = owner.others_can_change(info)
        if others is not None:
            _refused(path, _sidefile.UnsafeSideFile(path, others))
            return None
        data = os.read(fd, MAX_BYTES + 1)
    except OSError as error:
        logger.debug("Could not read the revision cache %s: %s", path, error)
        return None
    finally:
        os.close(fd)
    if len(data) > MAX_BYTES:
        logger.debug("The revision cache %s is too large: not used", path)
        return None
    return _parse(data, key, path)


def _parse(data: bytes, key: str, path: str) -> Known | None:
    try:
        content = json.loads(data)
        if not isinstance(content, dict) or content.get("key") != key:
            logger.debug("The revision cache %s is for other revision files", path)
            return None
        heads, revisions, labels = content["heads"], content["revisions"], content["labels"]
        if not all(isinstance(item, list) and all(isinstance(v, str) for v in item)
                   for item in (heads, revisions, labels)):
            raise TypeError("not lists of text")
        if not set(heads) <= set(revisions):
            raise ValueError("a head that is no revision")
    except (ValueError, KeyError, TypeError) as error:
        logger.debug("The revision cache %s is corrupt (%s): not used", path, error)
        return None
    return Known(tuple(heads), frozenset(revisions), frozenset(labels))


def write(path: str, key: str, known: Known, owner: _sidefile.Owner) -> None:
    """Replace the cache at ``path`` (its folder created if missing). Raises OSError."""
    folder = os.path.dirname(path)
    dir_fd = _sidefile.open_folder(folder, owner, create=True)
    os.close(dir_fd)
    data = json.dumps({
        "format": FORMAT, "key": key, "heads": list(known.heads),
        "revisions": sorted(known.revisions), "labels": sorted(known.labels),
    }, indent=0).encode()
    _sidefile.replace(path, data, owner)
    logger.debug("Revision cache written: %s", path)


def _refused(path: str, error: OSError) -> None:
    """A cache file (or its folder) that is there but must not be trusted: said once per
    start, at WARNING when it looks planted."""
    if isinstance(error, _sidefile.UnsafeSideFile):
        logger.warning("Not using the revision cache: %s. Alembic's revision files are "
                       "read instead; remove it (or set revision_cache).", error)
    else:
        logger.debug("Could not open the revision cache %s: %s", path, error)
