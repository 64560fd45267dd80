"""N workers forked after the imports, released by one signal, timed to the last one done.

The driver has already imported alembic, SQLAlchemy and the library (as a gunicorn
master with ``preload_app`` would), so interpreter start-up and imports are not what is
measured. Each child blocks in ``read()`` on its own start pipe; closing the pipe's
write end wakes it. Every child reports, on one shared pipe, when it was released and
when its work was done, on the system-wide monotonic clock (CLOCK_MONOTONIC on Linux),
so the driver can time from its start signal to the last worker done.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Work = Callable[[], Any]
"""What a worker runs after the start signal; its return value is ignored."""

Probe = Callable[[], dict[str, float]]
"""Called in the child after the work, to report extra timestamps (hand-off)."""

_READ_CHUNK = 65536
_READY_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Outcome:
    """What one worker did."""

    index: int
    ok: bool
    error: str
    released: float
    """Monotonic time at which the worker saw its start signal."""
    done: float
    """Monotonic time at which its work returned or raised."""
    extra: dict[str, float] = field(default_factory=dict)


class Crew:
    """Forked workers, each waiting on its own start signal.

    Use as a context manager: on exit every child still running is killed.
    """

    def __init__(
        self,
        works: Sequence[Work],
        *,
        log_path: Path,
        prepare: Callable[[], None] | None = None,
        probe: Probe | None = None,
        timeout_s: float = 300.0,
    ) -> None:
        self._timeout_s = timeout_s
        self.cpu_s = 0.0
        """User + system CPU time of all workers, known after :meth:`collect`."""
        self._pids: list[int] = []
        self._start_writers: list[int | None] = []
        ready_r, ready_w = os.pipe()
        result_r, result_w = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        for index, work in enumerate(works):
            start_r, start_w = os.pipe()
            pid = os.fork()
            if pid == 0:  # the child: never returns
                inherited = [fd for fd in self._start_writers if fd is not None]
                _child(
                    index,
                    work,
                    close=[ready_r, result_r, start_w, *inherited],
                    ready_w=ready_w,
                    start_r=start_r,
                    result_w=result_w,
                    log_path=log_path,
                    prepare=prepare,
                    probe=probe,
                )
            os.close(start_r)
            self._pids.append(pid)
            self._start_writers.append(start_w)
        os.close(ready_w)
        os.close(result_w)
        self._result_r = result_r
        try:
            _read_exactly(ready_r, len(works), min(timeout_s, _READY_TIMEOUT_S))
        except BaseException:
            self.__exit__()
            raise
        finally:
            os.close(ready_r)

    def __enter__(self) -> Crew:
        return self

    def __exit__(self, *_exc: object) -> None:
        for fd in self._start_writers:
            if fd is not None:
                os.close(fd)
        for pid in self._pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in self._pids:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        self._pids.clear()
        self._start_writers = []
        if self._result_r >= 0:
            os.close(self._result_r)
            self._result_r = -1

    def release(self, *indices: int) -> float:
        """Start the given workers (all if none given); returns the time of the signal."""
        chosen = indices or tuple(range(len(self._start_writers)))
        started = time.monotonic()
        for index in chosen:
            fd = self._start_writers[index]
            if fd is not None:
                os.close(fd)
                self._start_writers[index] = None
        return started

    def collect(self) -> list[Outcome]:
        """Wait until every worker has exited; what each did, in worker order."""
        data = _read_to_eof(self._result_r, self._timeout_s)
        os.close(self._result_r)
        self._result_r = -1
        for pid in self._pids:
            _pid, _status, usage = os.wait4(pid, 0)
            self.cpu_s += usage.ru_utime + usage.ru_stime
        self._pids.clear()
        outcomes = [Outcome(**json.loads(line)) for line in data.splitlines() if line]
        if len(outcomes) != len(self._start_writers):
            msg = f"{len(self._start_writers) - len(outcomes)} worker(s) died without a report"
            raise RuntimeError(msg)
        return sorted(outcomes, key=lambda o: o.index)


@dataclass(frozen=True)
class Round:
    """N identical workers released at once."""

    elapsed_s: float
    """From the start signal to the last worker done."""
    outcomes: list[Outcome]
    cpu_s: float
    """User + system CPU time of all workers together."""

    @property
    def failed(self) -> int:
        return sum(not o.ok for o in self.outcomes)


def run_together(work: Work, n: int, *, log_path: Path) -> Round:
    """Fork ``n`` workers running ``work``, release them at once, time the last one."""
    with Crew([work] * n, log_path=log_path) as crew:
        started = crew.release()
        outcomes = crew.collect()
    return Round(max(o.done for o in outcomes) - started, outcomes, crew.cpu_s)


def _child(
    index: int,
    work: Work,
    *,
    close: list[int],
    ready_w: int,
    start_r: int,
    result_w: int,
    log_path: Path,
    prepare: Callable[[], None] | None,
    probe: Probe | None,
) -> None:
    status = 0
    try:
        for fd in close:
            os.close(fd)
        # Workers' own output (stock Alembic's logging, tracebacks) goes to a log file.
        log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        if prepare is not None:
            prepare()
        os.write(ready_w, b"r")
        os.close(ready_w)
        os.read(start_r, 1)  # returns b"" when the driver closes the write end
        released = time.monotonic()
        ok, error = True, ""
        try:
            work()
        except BaseException as exc:  # a racing stock worker may fail any way it likes
            ok, error = False, f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        done = time.monotonic()
        extra = probe() if probe is not None else {}
        report = {"index": index, "ok": ok, "error": error, "released": released,
                  "done": done, "extra": extra}
        # One write below PIPE_BUF is atomic, so reports from many children never mix.
        os.write(result_w, (json.dumps(report) + "\n").encode()[:4000])
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        status = 70
    finally:
        os._exit(status)


def _read_exactly(fd: int, count: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    got = 0
    while got < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            raise TimeoutError("workers were not ready in time")
        chunk = os.read(fd, count - got)
        if not chunk:
            raise RuntimeError("a worker died before it was ready (see the worker log)")
        got += len(chunk)


def _read_to_eof(fd: int, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    chunks: list[bytes] = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            raise TimeoutError("workers did not finish in time")
        chunk = os.read(fd, _READ_CHUNK)
        if not chunk:
            return b"".join(chunks).decode()
        chunks.append(chunk)
