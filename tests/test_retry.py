"""The retry policy and the acquire loop, on a fake clock: no test here really sleeps.

The clock only moves when the loop sleeps or when a lock attempt "waits" in SQLite's
busy handler, so every number below is exact and no assertion depends on wall time.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, field

import pytest

from alembic_sqlite_lock import LockTimeout, RetryPolicy
from alembic_sqlite_lock._retry import LockBusy, acquire, retry_log_level

URL = "sqlite:////srv/app/app.db"
SEED_DELAYS_BASE = [0.1 * 2**n for n in range(1, 10)]  # 0.2, 0.4, ... 51.2


@dataclass
class FixedJitter:
    """An rng whose uniform(a, b) always returns the same value (checked to be in range)."""

    value: float

    def uniform(self, a: float, b: float, /) -> float:
        assert a <= self.value <= b, (a, self.value, b)
        return self.value


@dataclass
class FakeTime:
    """A monotonic clock and a sleep that advances it instead of waiting."""

    now: float = 1000.0
    sleeps: list[float] = field(default_factory=list)

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.sleeps.append(seconds)
        self.now += seconds


@dataclass
class FakeLock:
    """try_lock: busy until attempt ``succeed_on``; may spend its busy timeout waiting."""

    time: FakeTime
    succeed_on: int | None = None
    waits_out_busy_timeout: bool = False
    busy_timeouts: list[float] = field(default_factory=list)

    def __call__(self, busy_timeout_s: float) -> str:
        self.busy_timeouts.append(busy_timeout_s)
        if self.succeed_on is not None and len(self.busy_timeouts) == self.succeed_on:
            return f"connection from attempt {self.succeed_on}"
        if self.waits_out_busy_timeout:
            self.time.now += busy_timeout_s  # SQLite's busy handler waited the whole time
        raise LockBusy("database is locked")


# The policy itself ------------------------------------------------------------------


def test_defaults_are_the_seed_numbers() -> None:
    policy = RetryPolicy()

    assert policy.max_attempts == 10
    assert policy.base_delay_s == 0.1
    assert policy.jitter_s == 0.1
    assert policy.busy_timeout_s == 30
    assert policy.deadline_s == 120


def test_delays_are_exponential_plus_jitter_for_a_fixed_jitter() -> None:
    delays = list(RetryPolicy().delays(FixedJitter(0.04)))

    # 10 attempts leave 9 sleeps between them, after failed attempts n = 1..9.
    assert delays == pytest.approx([base + 0.04 for base in SEED_DELAYS_BASE])


def test_delays_for_a_seeded_rng_stay_within_base_and_base_plus_jitter() -> None:
    policy = RetryPolicy()
    delays = list(policy.delays(random.Random(2024)))

    reference = random.Random(2024)
    expected = [0.1 * 2**n + reference.uniform(0, 0.1) for n in range(1, 10)]
    assert delays == pytest.approx(expected)
    assert len(delays) == 9
    for n, delay in enumerate(delays, 1):
        assert 0.1 * 2**n <= delay <= 0.1 * 2**n + 0.1


def test_delay_after_uses_the_policy_numbers() -> None:
    policy = RetryPolicy(base_delay_s=0.5, jitter_s=2.0)

    assert policy.delay_after(3, FixedJitter(1.5)) == pytest.approx(0.5 * 8 + 1.5)
    assert list(RetryPolicy(max_attempts=1).delays(FixedJitter(0.0))) == []


@pytest.mark.parametrize(
    ("remaining", "expected"),
    [(1000.0, 30.0), (30.0, 30.0), (12.5, 12.5), (0.0, 0.0), (-3.0, 0.0), (-math.inf, 0.0)],
)
def test_busy_timeout_is_capped_at_the_remaining_time_and_never_negative(
    remaining: float, expected: float
) -> None:
    assert RetryPolicy().busy_timeout_for(remaining) == expected


INVALID = [
    ("max_attempts", 0),
    ("max_attempts", -1),
    ("max_attempts", 2.5),
    ("max_attempts", math.nan),
    ("max_attempts", math.inf),
    ("max_attempts", True),
    ("max_attempts", "3"),
    ("base_delay_s", -0.1),
    ("base_delay_s", math.nan),
    ("base_delay_s", math.inf),
    ("base_delay_s", False),
    ("base_delay_s", "0.1"),
    ("jitter_s", -1),
    ("jitter_s", math.nan),
    ("jitter_s", -math.inf),
    ("jitter_s", True),
    ("busy_timeout_s", -5.0),
    ("busy_timeout_s", math.inf),
    ("busy_timeout_s", "30"),
    ("deadline_s", 0),
    ("deadline_s", -5),
    ("deadline_s", math.nan),
    ("deadline_s", math.inf),
    ("deadline_s", True),
    ("deadline_s", "120"),
    ("deadline_s", None),
]


@pytest.mark.parametrize(("name", "value"), INVALID)
def test_invalid_values_raise_value_error_naming_the_field(name: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"\b{name}\b") as caught:
        RetryPolicy(**{name: value})  # type: ignore[arg-type]

    assert repr(value) in str(caught.value)


def test_zero_delays_and_zero_busy_timeout_are_valid() -> None:
    policy = RetryPolicy(max_attempts=1, base_delay_s=0, jitter_s=0, busy_timeout_s=0)

    assert policy.busy_timeout_for(100) == 0


# acquire() ----------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 4, 10])
def test_acquire_succeeds_on_attempt_k_after_k_tries(k: int) -> None:
    time = FakeTime()
    try_lock = FakeLock(time, succeed_on=k)

    got = acquire(try_lock, RetryPolicy(), url=URL, clock=time.clock, sleep=time.sleep,
                  rng=FixedJitter(0.05))

    sleeps = [base + 0.05 for base in SEED_DELAYS_BASE[: k - 1]]
    assert got == f"connection from attempt {k}"
    assert time.sleeps == pytest.approx(sleeps)
    # Each attempt may wait 30 s, or what is left of the 120 s: attempt 10 comes after
    # 102.65 s of sleeping and gets the remaining 17.35 s.
    expected = [min(30.0, 120.0 - sum(sleeps[:n])) for n in range(k)]
    assert try_lock.busy_timeouts == pytest.approx(expected)
    if k == 10:
        assert try_lock.busy_timeouts[-1] == pytest.approx(17.35)


def test_acquire_caps_each_busy_timeout_at_the_time_left_before_the_deadline() -> None:
    time = FakeTime()
    try_lock = FakeLock(time, succeed_on=3)
    policy = RetryPolicy(deadline_s=1.0, busy_timeout_s=30.0, jitter_s=0.0)

    acquire(try_lock, policy, url=URL, clock=time.clock, sleep=time.sleep,
            rng=FixedJitter(0.0))

    # Attempt 1 at t=0, sleep 0.2, attempt 2 at t=0.2, sleep 0.4, attempt 3 at t=0.6.
    assert try_lock.busy_timeouts == pytest.approx([1.0, 0.8, 0.4])
    assert time.sleeps == pytest.approx([0.2, 0.4])


def test_acquire_gives_up_after_max_attempts_with_the_facts() -> None:
    time = FakeTime()
    try_lock = FakeLock(time)

    with pytest.raises(LockTimeout) as caught:
        acquire(try_lock, RetryPolicy(), url=URL, clock=time.clock, sleep=time.sleep,
                rng=FixedJitter(0.05))

    error = caught.value
    assert len(try_lock.busy_timeouts) == 10
    assert error.attempts == 10
    assert len(time.sleeps) == 9  # no pointless sleep after the last attempt
    waited = sum(time.sleeps)
    assert waited == pytest.approx(102.2 + 9 * 0.05)
    assert error.waited_s == pytest.approx(waited)
    assert error.url == URL
    message = str(error)
    assert URL in message
    assert "after 10 attempts" in message
    assert f"over {waited:.1f}s" in message
    assert "Likely causes" in message
    for cause in ("stuck in a migration", "permissions", "disk I/O"):
        assert cause in message
    assert "deadline_s" in message


def test_acquire_stops_at_the_deadline_before_max_attempts() -> None:
    time = FakeTime()
    start = time.now
    try_lock = FakeLock(time, waits_out_busy_timeout=True)

    with pytest.raises(LockTimeout) as caught:
        acquire(try_lock, RetryPolicy(), url=URL, clock=time.clock, sleep=time.sleep,
                rng=FixedJitter(0.1))

    # 30 s busy + 0.3 sleep, 30 + 0.5, 30 + 0.9, then the rest of the 120 s: 4 attempts.
    assert try_lock.busy_timeouts == pytest.approx([30.0, 30.0, 30.0, 120 - 91.7])
    assert caught.value.attempts == 4 < RetryPolicy().max_attempts
    assert time.now - start == pytest.approx(120.0)
    assert caught.value.waited_s == pytest.approx(120.0)
    assert "after 4 attempts over 120.0s" in str(caught.value)


def test_the_final_sleep_is_cut_short_at_the_deadline() -> None:
    time = FakeTime(now=0.0)
    try_lock = FakeLock(time, waits_out_busy_timeout=True)
    policy = RetryPolicy(max_attempts=10, base_delay_s=1.0, jitter_s=0.0, busy_timeout_s=1.0,
                         deadline_s=10.0)

    with pytest.raises(LockTimeout) as caught:
        acquire(try_lock, policy, url=URL, clock=time.clock, sleep=time.sleep,
                rng=FixedJitter(0.0))

    # t=0 try 1s, sleep 2 -> t=3 try 1s, sleep 4 -> t=8 try 1s, sleep 8 cut to 1 -> t=10.
    assert time.sleeps == [2.0, 4.0, 1.0]
    assert try_lock.busy_timeouts == [1.0, 1.0, 1.0, 0.0]
    assert time.now == 10.0  # never past the deadline
    assert caught.value.attempts == 4
    assert caught.value.waited_s == 10.0


def test_every_sleep_ends_by_the_deadline_whatever_the_jitter() -> None:
    policy = RetryPolicy(max_attempts=50, base_delay_s=0.3, jitter_s=5.0, busy_timeout_s=2.5,
                         deadline_s=37.0)
    for seed in range(20):
        time = FakeTime(now=0.0)
        try_lock = FakeLock(time, waits_out_busy_timeout=True)
        with pytest.raises(LockTimeout) as caught:
            acquire(try_lock, policy, url=URL, clock=time.clock, sleep=time.sleep,
                    rng=random.Random(seed))
        assert time.now <= policy.deadline_s + 1e-9
        assert caught.value.attempts < policy.max_attempts
        assert all(timeout >= 0 for timeout in try_lock.busy_timeouts)


# Logging ------------------------------------------------------------------------------


def test_retry_lines_are_graduated_and_say_when_the_next_try_is(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="alembic_sqlite_lock")
    time = FakeTime()

    with pytest.raises(LockTimeout):
        acquire(FakeLock(time), RetryPolicy(), url=URL, clock=time.clock, sleep=time.sleep,
                rng=FixedJitter(0.04))

    retries = [r for r in caplog.records if r.name.startswith("alembic_sqlite_lock")]
    assert [r.levelno for r in retries] == (
        [logging.DEBUG] * 3 + [logging.INFO] * 4 + [logging.WARNING] * 2
    )
    messages = [r.getMessage() for r in retries]
    assert messages[2] == "Database locked by another worker, retry 3/10 in 0.84s"
    assert messages == [
        f"Database locked by another worker, retry {n}/10 in {0.1 * 2**n + 0.04:.2f}s"
        for n in range(1, 10)
    ]


def test_retry_log_level_by_attempt() -> None:
    levels = [retry_log_level(n) for n in range(1, 13)]

    assert levels == [logging.DEBUG] * 3 + [logging.INFO] * 4 + [logging.WARNING] * 5


# Past attempt 1023, base_delay_s * 2**n would overflow a float ----------------------


def test_many_attempts_do_not_overflow_the_back_off() -> None:
    policy = RetryPolicy(max_attempts=1100, base_delay_s=0.0, jitter_s=0.0, busy_timeout_s=0.0)
    time = FakeTime()

    assert list(policy.delays(FixedJitter(0.0))) == [0.0] * 1099
    with pytest.raises(LockTimeout) as caught:
        acquire(FakeLock(time), policy, url=URL, clock=time.clock, sleep=time.sleep,
                rng=FixedJitter(0.0))
    assert caught.value.attempts == 1100
