"""Files beside the database, opened, created, read and replaced safely.

The library often runs as root (the default in containers), next to a directory that
other users may write: a shared data folder, a group-writable volume, /tmp. Anything it
creates or reads there by a predictable name can be planted first. Every file and
folder it keeps beside the database (the run lock, the holder record, backups) goes
through this module, which holds these rules:

* Never follow a symlink in the last component (``O_NOFOLLOW``): a link planted at a
  predicted name would make root truncate, create or write a file of the attacker's
  choosing. Folders above it are the user's configuration and are followed.
* Never block on a FIFO or a device (``O_NONBLOCK``, then ``fstat``: only a regular
  file is used), and never read more than a small bound (a link to /dev/zero).
* Create only with ``O_EXCL`` (a file that appears meanwhile is opened, never
  truncated), and write a new version under a random temporary name in the same folder,
  then rename it over the old one: a rename replaces a planted link, never follows it.
* Grant no more than the database file does: a side file gets the database's mode bits
  (``rw`` only), a folder the same plus ``x`` where ``r`` is set, whatever the umask;
  created by root, it belongs to the database's owner and group, so that the app's own
  user can open it on its next run.
* Trust what was read only from the users who can write the database anyway: the
  database's owner, this process's user, and root.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import stat
from dataclasses import dataclass

logger = logging.getLogger(__name__)

MAX_READ_BYTES = 64 * 1024
"""The most read from a side file: a holder record is a few hundred bytes."""

_SAFE = os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


class UnsafeSideFile(OSError):
    """A side file is there but must not be used: not a regular file (a symlink, a FIFO,
    a folder, a device), or a folder that belongs to an untrusted user."""

    def __init__(self, path: str, what: str) -> None:
        super().__init__(errno.EPERM, what, path)
        self.path = path
        self.what = what

    def __str__(self) -> str:
        return f"{self.path} {self.what}"


@dataclass(frozen=True)
class Owner:
    """Whose side files these are: the database file's owner, group and mode."""

    uid: int
    gid: int
    mode: int
    """The database file's permission bits (``rw`` bits only)."""

    @classmethod
    def of(cls, database_path: str) -> Owner:
        """The database's; before it exists, what SQLite would create (0644 less the
        umask, this process's user)."""
        try:
            info = os.stat(database_path)
        except OSError:
            return cls(os.geteuid(), os.getegid(), 0o644 & ~_umask())
        return cls(info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode) & 0o666)

    @classmethod
    def of_locked(cls, database_path: str) -> Owner:
        """The database's, checked against the file this process holds SQLite's lock on.

        Whoever can write the database's folder can swap another file in at its path
        for an instant, and a plain ``stat`` would then make them the owner whose files
        these are (a backup handed over to them, a folder of theirs trusted). Inside the
        locked run SQLite holds a POSIX lock on the real file; /proc/locks names its
        inode. Raises :class:`UnsafeSideFile` when the file at the path is not that one;
        where /proc/locks cannot be read (not Linux), it is the plain ``stat``.
        """
        info = os.stat(database_path)
        locked = _posix_locked_inodes(os.getpid())
        if locked is not None and info.st_ino not in locked:
            raise UnsafeSideFile(
                database_path, "is not the file this run holds SQLite's lock on (it was "
                "replaced or moved while the run held it)")
        return cls(info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode) & 0o666)

    def others_can_change(self, info: os.stat_result) -> str | None:
        """Why users who cannot write the database could add, rename or remove entries
        in the folder ``info`` describes (None: they cannot). In a sticky folder (/tmp)
        only an entry's owner may rename or remove it."""
        mode = info.st_mode
        if mode & stat.S_ISVTX:
            return None
        if mode & 0o002 and not self.mode & 0o002:
            return "is writable by every user"
        if mode & 0o020 and not (info.st_gid == self.gid and self.mode & 0o020):
            return (f"is writable by group {info.st_gid}, whose members may not write "
                    "the database")
        return None

    @property
    def file_mode(self) -> int:
        return self.mode

    @property
    def dir_mode(self) -> int:
        """``rw`` as the database's, plus ``x`` wherever ``r`` is set (0600 -> 0700)."""
        return self.mode | 0o700 | ((self.mode & 0o444) >> 2)

    def trusts(self, uid: int) -> bool:
        """A file of this user's was written by someone who can write the database."""
        return uid in (self.uid, os.geteuid(), 0)

    def adopt(self, fd: int, mode: int) -> None:
        """Give a file or folder this process just created the database's mode and, when
        run as root, its owner."""
        if os.geteuid() == 0:
            info = os.fstat(fd)
            if (info.st_uid, info.st_gid) != (self.uid, self.gid):
                os.fchown(fd, self.uid, self.gid)
        os.fchmod(fd, mode)


def _umask() -> int:
    # os.umask can only be read by setting it; /proc has it without that race.
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def _posix_locked_inodes(pid: int) -> set[int] | None:
    """Inodes of the files on which process ``pid`` holds a POSIX (fcntl) lock, from
    /proc/locks: ``1: POSIX  ADVISORY  WRITE <pid> <major>:<minor>:<inode> ...``. Inodes
    only: an overlay filesystem may show another device there than stat() does. None
    where /proc/locks cannot be read."""
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as locks:
            lines = locks.read().splitlines()
    except OSError:
        return None
    inodes = set()
    for line in lines:
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "POSIX" and fields[4] == str(pid):
            inode = fields[5].rpartition(":")[2]
            if inode.isdigit():
                inodes.add(int(inode))
    return inodes


def _checked_regular(fd: int, path: str) -> os.stat_result:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise UnsafeSideFile(path, f"is not a regular file ({_kind(info.st_mode)})")
    return info


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"),
                       (stat.S_ISBLK, "a device")):
        if test(mode):
            return name
    return "not a file"


def _opened(path: str, flags: int, dir_fd: int | None = None) -> int:
    """``os.open`` without following a final symlink; ELOOP says what it was."""
    try:
        return os.open(path, flags | _SAFE, 0o600, dir_fd=dir_fd)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise UnsafeSideFile(path, "is a symbolic link") from error
        raise


def open_existing(path: str, flags: int = os.O_RDONLY, *, dir_fd: int | None = None) -> int:
    """A descriptor of the regular file at ``path``; never follows a final symlink,
    never blocks on a FIFO, never creates anything. Raises OSError (FileNotFoundError,
    PermissionError, :class:`UnsafeSideFile`)."""
    fd = _opened(path, flags, dir_fd)
    _checked_regular(fd, path)
    return fd


def open_or_create(path: str, owner: Owner, flags: int = os.O_RDWR) -> tuple[int, bool]:
    """Open the regular file at ``path``, creating it (``O_EXCL``, the database's mode
    and owner) when there is none. Returns the descriptor and whether it was created."""
    try:
        fd = _opened(path, flags | os.O_CREAT | os.O_EXCL)
    except FileExistsError:  # also a planted symlink, dangling or not: opened below
        return open_existing(path, flags), False
    try:
        owner.adopt(fd, owner.file_mode)
    except BaseException:
        os.close(fd)
        raise
    return fd, True


def read_bounded(
    path: str, owner: Owner | None = None, limit: int = MAX_READ_BYTES
) -> bytes | None:
    """The bytes of a small regular file, or None: none there, unreadable, not a regular
    file, larger than ``limit``, or (with ``owner``) written by an untrusted user."""
    try:
        fd = open_existing(path)
    except OSError as error:
        if not isinstance(error, FileNotFoundError):
            logger.debug("Not reading %s: %s", path, error)
        return None
    try:
        if owner is not None and not owner.trusts(os.fstat(fd).st_uid):
            logger.debug("Not reading %s: it belongs to uid %d, who cannot write the "
                         "database", path, os.fstat(fd).st_uid)
            return None
        data = os.read(fd, limit + 1)
    except OSError as error:
        logger.debug("Could not read %s: %s", path, error)
        return None
    finally:
        os.close(fd)
    return data if len(data) <= limit else None


def replace(path: str, data: bytes, owner: Owner) -> None:
    """Write ``path`` atomically: a new file under a random name in the same folder
    (``O_EXCL``: nothing planted is opened), then renamed over ``path`` (a planted link
    at ``path`` is replaced, not followed). Raises OSError; nothing is left behind."""
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.{secrets.token_hex(8)}.tmp")
    fd = _opened(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        try:
            owner.adopt(fd, owner.file_mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        remove(tmp)
        raise


def remove(path: str, *, dir_fd: int | None = None) -> bool:
    """Unlink ``path`` (a link is removed itself, never its target); False if it could
    not be removed."""
    try:
        os.unlink(path, dir_fd=dir_fd)
    except FileNotFoundError:
        return True
    except OSError as error:
        logger.debug("Could not remove %s: %s", path, error)
        return False
    return True


def same_file(fd: int, path: str) -> bool:
    """Does ``path`` still name the file open at ``fd``? (Not if someone unlinked or
    replaced it meanwhile: a lock taken on the old file would exclude nobody.)"""
    try:
        now = os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    held = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)


def open_folder(path: str, owner: Owner, *, create: bool) -> int:
    """A descriptor of the folder at ``path`` (never a symlink in the last component),
    created with the database's mode and owner when ``create`` and missing. A folder
    that belongs to a user who cannot write the database is refused: whoever created it
    could read and replace everything put in it; so is one that such users may write
    (unless it is sticky): they could rename a private folder in it away and put their
    own in its place while SQLite looks its path up. Raises OSError."""
    if create:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        else:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | _SAFE)
            try:
                owner.adopt(fd, owner.dir_mode)
            except BaseException:
                os.close(fd)
                raise
            return fd
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | _SAFE)
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.ENOTDIR):
            kind = "is a symbolic link" if os.path.islink(path) else "is not a folder"
            raise UnsafeSideFile(path, kind) from error
        raise
    info = os.fstat(fd)
    if not owner.trusts(info.st_uid):
        os.close(fd)
        raise UnsafeSideFile(path, f"belongs to uid {info.st_uid}, a user who cannot write "
                                   "the database (it could read or replace what is put in it)")
    others = owner.others_can_change(info)
    if others is not None:
        os.close(fd)
        raise UnsafeSideFile(path, f"{others} (they could rename what is put in it, or "
                                   "swap it for their own)")
    return fd


def path_in(dir_fd: int, folder: str, name: str) -> str:
    """A path to ``name`` inside the folder open at ``dir_fd`` for code that takes only
    paths (SQLite's VACUUM INTO): through /proc/self/fd on Linux, so that the lookup
    starts at the folder we checked, not at a name someone may have re-pointed since.

    SQLite turns this into the folder's real path before it opens the file, so this
    narrows the window rather than closing it: use it on a :func:`private_folder`, which
    only its owner (a user trusted with the database) can rename or replace."""
    proc = f"/proc/self/fd/{dir_fd}"
    if os.path.isdir(proc):
        return os.path.join(proc, name)
    return os.path.join(folder, name)  # pragma: no cover - not Linux


def private_folder(dir_fd: int, prefix: str) -> str:
    """A new folder only this user can enter, inside the folder open at ``dir_fd``;
    returns its name."""
    while True:
        name = f".{prefix}.{secrets.token_hex(8)}.tmp"
        try:
            os.mkdir(name, 0o700, dir_fd=dir_fd)
        except FileExistsError:
            continue
        return name
