"""Samples and their summaries: median and p95 over repeats."""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass, field


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def p95(values: list[float]) -> float:
    """The 95th percentile, interpolated between samples (the max for tiny samples)."""
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=20, method="inclusive")[-1]


@dataclass
class Series:
    """Every repeat of one case (cold, warm, ...) for one variant at one N."""

    case: str
    variant: str
    n: int
    seconds: list[float] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    """Workers that failed, per repeat."""
    cpu_s: list[float] = field(default_factory=list)
    """CPU time (user + system) per worker, per repeat."""
    errors: Counter[str] = field(default_factory=Counter)
    broken: int = 0
    """Repeats that left the database in a wrong state (not at head, or data twice)."""

    @property
    def median(self) -> float:
        return median(self.seconds)

    @property
    def p95(self) -> float:
        return p95(self.seconds)

    @property
    def cpu_per_worker_s(self) -> float:
        return median(self.cpu_s)

    def as_dict(self) -> dict[str, object]:
        return {
            "case": self.case,
            "variant": self.variant,
            "n": self.n,
            "seconds": self.seconds,
            "failed": self.failed,
            "cpu_s_per_worker": self.cpu_s,
            "errors": dict(self.errors),
            "broken": self.broken,
            "median_s": self.median,
            "p95_s": self.p95,
        }


class Results:
    """All series of a run, keyed by (case, variant, n)."""

    def __init__(self) -> None:
        self._series: dict[tuple[str, str, int], Series] = {}

    def series(self, case: str, variant: str, n: int) -> Series:
        key = (case, variant, n)
        if key not in self._series:
            self._series[key] = Series(case, variant, n)
        return self._series[key]

    def get(self, case: str, variant: str, n: int) -> Series | None:
        return self._series.get((case, variant, n))

    def all(self) -> list[Series]:
        return list(self._series.values())
