"""A real PgBouncer (Debian's package) in front of the test PostgreSQL, for
test_pgbouncer.py.

The package is installed by the tests themselves when /usr/sbin/pgbouncer is missing
(``apt-get install``, once: xdist workers wait on one flock). When that is not possible
the tests skip with the reason, except under ``CI=true``, where it is a failure: CI
must never pass by skipping them.

Each test starts a pgbouncer of its own on a free port of 127.0.0.1 (never 6432, where a
system service might listen), as an unprivileged user (pgbouncer refuses to run as
root) in a temporary directory of that user's, and stops it after.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa
from servers import PG_ADMIN

PGBOUNCER = Path("/usr/sbin/pgbouncer")
INSTALL_LOCK = Path("/tmp/alsl-apt-pgbouncer.lock")
SYSTEM_PORT = 6432
"""Where Debian's own pgbouncer service listens, if the package started one."""
RUN_AS = "nobody"


def unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: the PgBouncer tests must run)")
    pytest.skip(reason)


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _apt(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(["apt-get", "-qq", *args], env=env, capture_output=True,
                          text=True, timeout=600, check=False)


def _install() -> None:
    """``apt-get install pgbouncer`` (after an ``apt-get update`` if the package lists
    are stale), then make sure no system pgbouncer service was left running."""
    if os.geteuid() != 0:
        unavailable(f"{PGBOUNCER} is missing and installing it needs root")
    if shutil.which("apt-get") is None:
        unavailable(f"{PGBOUNCER} is missing and there is no apt-get to install it")
    busy_before = _listening(SYSTEM_PORT)
    install = ("install", "-y", "--no-install-recommends", "pgbouncer")
    done = _apt(*install)
    if done.returncode != 0:
        _apt("update")
        done = _apt(*install)
    if done.returncode != 0 or not PGBOUNCER.exists():
        unavailable(f"apt-get install pgbouncer failed: {(done.stderr or done.stdout).strip()}")
    if not busy_before and _listening(SYSTEM_PORT):
        # The package started its service (no policy-rc.d forbade it): stop it, through
        # the init system that started it. Our pgbouncers use ports of their own anyway.
        subprocess.run(["invoke-rc.d", "pgbouncer", "stop"], capture_output=True,
                       timeout=60, check=False)


def ensure_pgbouncer() -> str:
    """Install pgbouncer if needed; return its version (e.g. "1.18.0")."""
    if not PGBOUNCER.exists():
        with INSTALL_LOCK.open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another xdist worker may be installing
            if not PGBOUNCER.exists():
                _install()
    version = subprocess.run([str(PGBOUNCER), "--version"], capture_output=True,
                             text=True, check=False).stdout
    found = re.search(r"PgBouncer (\S+)", version)
    if found is None:
        unavailable(f"{PGBOUNCER} --version said {version!r}")
        raise AssertionError  # unreachable: unavailable() raises
    return found.group(1)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class PgBouncer:
    port: int
    pool_mode: str
    directory: Path
    process: subprocess.Popen[bytes]

    def url(self, database: str, *, password: str = "") -> str:
        """A ``postgresql://`` URL to ``database`` through this pooler."""
        url = sa.make_url(PG_ADMIN).set(drivername="postgresql", host="127.0.0.1",
                                        port=self.port, database=database)
        if password:
            url = url.set(password=password)
        return url.render_as_string(hide_password=False)

    def log(self) -> str:
        path = self.directory / "pgbouncer.log"
        return path.read_text(errors="replace") if path.exists() else ""


def _config(directory: Path, port: int, pool_mode: str, pool_size: int) -> str:
    server = sa.make_url(PG_ADMIN)
    return (
        "[databases]\n"
        f"* = host={server.host or '127.0.0.1'} port={server.port or 5432}\n\n"
        "[pgbouncer]\n"
        "listen_addr = 127.0.0.1\n"
        f"listen_port = {port}\n"
        "unix_socket_dir =\n"
        # Clients are not asked for a password (the user must still be in auth_file);
        # the test PostgreSQL trusts local connections in turn.
        "auth_type = trust\n"
        f"auth_file = {directory}/userlist.txt\n"
        f"pool_mode = {pool_mode}\n"
        f"default_pool_size = {pool_size}\n"
        "max_client_conn = 200\n"
        f"logfile = {directory}/pgbouncer.log\n"
        f"pidfile = {directory}/pgbouncer.pid\n"
    )


@contextmanager
def running_pgbouncer(pool_mode: str, pool_size: int) -> Iterator[PgBouncer]:
    """A pgbouncer of its own, in ``pool_mode`` with ``pool_size`` server connections
    per database and user, until the block ends."""
    ensure_pgbouncer()
    user = pwd.getpwnam(RUN_AS) if os.geteuid() == 0 else None
    prefix = [] if user is None else [
        "setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups", "--"]
    directory = Path(tempfile.mkdtemp(prefix="alsl-pgbouncer-", dir="/tmp"))
    try:
        users = sa.make_url(PG_ADMIN).username or "postgres"
        (directory / "userlist.txt").write_text(f'"{users}" ""\n')
        for _attempt in range(3):  # the free port may be taken by someone else meanwhile
            port = _free_port()
            ini = directory / "pgbouncer.ini"
            ini.write_text(_config(directory, port, pool_mode, pool_size))
            if user is not None:
                for path in (directory, *directory.iterdir()):
                    os.chown(path, user.pw_uid, user.pw_gid)
            process = subprocess.Popen([*prefix, str(PGBOUNCER), str(ini)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            bouncer = PgBouncer(port, pool_mode, directory, process)
            deadline = time.monotonic() + 15
            while process.poll() is None and not _listening(port):
                if time.monotonic() > deadline:
                    process.kill()
                    process.wait()
                    pytest.fail(f"pgbouncer did not listen on {port} in 15 s:\n{bouncer.log()}")
                time.sleep(0.05)
            if process.poll() is None:
                break
        else:
            pytest.fail(f"pgbouncer would not start:\n{bouncer.log()}")
        try:
            yield bouncer
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(directory)
