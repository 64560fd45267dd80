"""The retry policy: how often, how long and how patiently a worker asks for the lock.

The numbers are the seed design's (StarPunk ADR-022): up to 10 attempts, a delay of
``0.1 * 2**n + uniform(0, 0.1)`` seconds after failed attempt ``n``, each attempt
waiting up to 30 s inside SQLite's busy handler, and 120 s overall.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from typing import Protocol, TypeVar

from ._errors import lock_timeout

logger = logging.getLogger(__name__)

T = TypeVar("T")


class LockBusy(Exception):
    """Raised by a lock attempt when another connection holds the lock (internal).
    ``lock_file``: the run lock file, when that is the lock another process kept."""

    def __init__(self, message: str, *, lock_file: str | None = None) -> None:
        super().__init__(message)
        self.lock_file = lock_file


class _Uniform(Protocol):
    def uniform(self, a: float, b: float, /) -> float: ...


@dataclass(frozen=True)
class RetryPolicy:
    """How a worker waits for the migration lock.

    Field names are the setting names everywhere: keyword arguments, the
    ``[alembic_sqlite_lock]`` section of alembic.ini, and ``-x lock_<name>=...``.
    """

    max_attempts: int = 10
    """Attempts to take the lock, each on a new connection."""
    base_delay_s: float = 0.1
    """Back-off base: after failed attempt n the worker sleeps base_delay_s * 2**n..."""
    jitter_s: float = 0.1
    """...plus uniform(0, jitter_s), so that waiting workers do not retry in lockstep."""
    busy_timeout_s: float = 30.0
    """How long one attempt waits inside SQLite's busy handler (capped by the deadline)."""
    deadline_s: float = 120.0
    """Overall time a worker waits for the lock before giving up with LockTimeout."""

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if field.name == "max_attempts":
                ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
                want = "a whole number >= 1"
            elif field.name == "deadline_s":
                ok = _is_number(value) and math.isfinite(value) and value > 0
                want = "a finite number of seconds > 0"
            else:
                ok = _is_number(value) and math.isfinite(value) and value >= 0
                want = "a finite number of seconds >= 0"
            if not ok:
                msg = f"Setting {field.name} must be {want}, got {value!r}."
                raise ValueError(msg)

    def delay_after(self, attempt: int, rng: _Uniform = random) -> float:
        """Seconds to sleep after failed attempt ``attempt`` (counted from 1)."""
        # The exponent is capped: 2.0**1024 overflows a float, and minutes are plenty.
        return float(self.base_delay_s * 2 ** min(attempt, 30) + rng.uniform(0, self.jitter_s))

    def delays(self, rng: _Uniform = random) -> Iterator[float]:
        """The sleeps between attempts if every attempt fails (ignores the deadline)."""
        for attempt in range(1, self.max_attempts):
            yield self.delay_after(attempt, rng)

    def busy_timeout_for(self, remaining_s: float) -> float:
        """An attempt never waits past the deadline."""
        return max(0.0, min(self.busy_timeout_s, remaining_s))


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def retry_log_level(attempt: int) -> int:
    """Graduated logging: the first retries are normal contention, late ones are news."""
    if attempt <= 3:
        return logging.DEBUG
    if attempt <= 7:
        return logging.INFO
    return logging.WARNING


def acquire(
    try_lock: Callable[[float], T],
    policy: RetryPolicy,
    *,
    url: str,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    rng: _Uniform = random,
    causes: Callable[[str | None], str] | None = None,
    describe_holder: Callable[[], str] | None = None,
    keep_waiting: Callable[[], bool] | None = None,
    started_at: float | None = None,
) -> T:
    """Call ``try_lock(busy_timeout_s)`` until it returns, backing off between attempts.

    ``try_lock`` raises :class:`LockBusy` when the lock is held elsewhere. Gives up with
    :class:`LockTimeout` after ``max_attempts`` or at ``deadline_s``, whichever is first.
    ``causes(lock_file)`` explains that error for the backend (its ``timeout_causes``).
    ``describe_holder()`` returns a suffix naming the lock's holder ("" when unknown).
    When the attempts or the deadline run out and ``keep_waiting()`` is true, it keeps
    trying, each attempt waiting a full ``busy_timeout_s``, for as long as it stays true.
    ``started_at`` (a ``clock()`` reading): when the wait began, if before this call.
    """
    start = clock() if started_at is None else started_at
    attempt = 0
    extended = False  # past the deadline, waiting on a holder that is alive
    while True:
        attempt += 1
        remaining = policy.deadline_s - (clock() - start)
        timeout = policy.busy_timeout_s if extended else policy.busy_timeout_for(remaining)
        try:
            return try_lock(timeout)
        except LockBusy as busy:
            lock_file = busy.lock_file  # the last attempt's says what to look at
        remaining = policy.deadline_s - (clock() - start)
        holder = describe_holder() if describe_holder is not None else ""
        if attempt >= policy.max_attempts or remaining <= 0:
            if keep_waiting is not None and keep_waiting():
                if not extended:
                    logger.warning(
                        "Still locked after %.1fs and %d attempts, but the holder is alive on "
                        "this host%s: waiting on (wait_while_holder_alive)",
                        clock() - start,
                        attempt,
                        holder,
                    )
                extended = True
                # Each attempt blocks up to busy_timeout_s; never spin when that is ~0.
                sleep(max(0.0, 1.0 - policy.busy_timeout_s))
                continue
            error = lock_timeout(url, attempt, clock() - start, causes, lock_file)
            if holder:
                error.holder = holder.strip(" ()")
                error.args = (f"{error.args[0]} The lock is {error.holder}.",)
            raise error
        delay = min(policy.delay_after(attempt, rng), remaining)
        logger.log(
            retry_log_level(attempt),
            "Database locked by another worker, retry %d/%d in %.2fs%s",
            attempt,
            policy.max_attempts,
            delay,
            holder,
        )
        sleep(delay)
