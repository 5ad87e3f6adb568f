"""Paired statistics for multi-seed comparisons: the mean difference, its 95% t-interval, and the smallest
effect the design can detect.

Every multi-seed line of a report compares two conditions run at the same seeds (same initialisation and data
order), so the unit of evidence is the per-seed difference. With n seeds and the differences' standard deviation
s, the 95% interval is mean +- t(0.975, n-1) s / sqrt(n), and the smallest true effect a two-sided paired t-test at
alpha = 0.05 detects with 80% power is about (t(0.975, n-1) + t(0.80, n-1)) s / sqrt(n) (the usual normal-
approximation formula with t quantiles). An effect smaller than that is "not resolvable with n seeds".
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with df degrees of freedom."""
    from scipy.stats import t
    return float(t.ppf(p, df))


@dataclass(frozen=True)
class Paired:
    """Summary of per-seed differences d_i (condition B minus condition A at seed i)."""

    diffs: tuple
    mean: float
    sd: float | None  # None with one seed
    lo: float | None  # 95% interval
    hi: float | None
    detectable: float | None  # smallest |effect| detected with 80% power at alpha 0.05

    @property
    def n(self) -> int:
        return len(self.diffs)

    def excludes(self, value: float) -> bool:
        return self.lo is not None and not (self.lo <= value <= self.hi)

    def within(self, lo: float, hi: float) -> bool:
        """The whole interval lies inside [lo, hi]."""
        return self.lo is not None and lo <= self.lo and self.hi <= hi

    def outside(self, lo: float, hi: float) -> bool:
        """The whole interval lies outside [lo, hi] (entirely below lo or entirely above hi)."""
        return self.lo is not None and (self.hi < lo or self.lo > hi)

    def describe(self, scale: float = 1.0, unit: str = "", digits: int = 2) -> str:
        """e.g. `+1.20 [-0.40, +2.80] (3 seeds: +0.9, +1.1, +1.6; detectable >= 2.90)`."""
        f = lambda v: f"{scale * v:+.{digits}f}{unit}"  # noqa: E731
        per_seed = ", ".join(f"{scale * d:+.{max(1, digits - 1)}f}" for d in self.diffs)
        if self.lo is None:
            return f"{f(self.mean)} (1 seed; no interval)"
        return (f"{f(self.mean)}, 95% CI [{f(self.lo)}, {f(self.hi)}] ({self.n} seeds: {per_seed}; smallest "
                f"detectable effect {scale * self.detectable:.{digits}f}{unit})")


def paired(a: list[float], b: list[float]) -> Paired | None:
    """Paired summary of b - a over seeds (a[i] and b[i] from the same seed). None when there is no pair."""
    if len(a) != len(b):
        raise ValueError(f"paired(): {len(a)} values against {len(b)}; every seed needs both conditions")
    return of_differences([y - x for x, y in zip(a, b)])


def of_differences(diffs: list[float]) -> Paired | None:
    diffs = tuple(float(d) for d in diffs)
    if not diffs:
        return None
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return Paired(diffs, mean, None, None, None, None)
    sd = statistics.stdev(diffs)
    se = sd / math.sqrt(len(diffs))
    t95 = t_quantile(0.975, len(diffs) - 1)
    detectable = (t95 + t_quantile(0.80, len(diffs) - 1)) * se
    return Paired(diffs, mean, sd, mean - t95 * se, mean + t95 * se, detectable)
