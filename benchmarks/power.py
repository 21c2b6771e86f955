"""Intervals and power for a study with few seeds: Student-t and chi-square quantiles (no SciPy in
the project), t-intervals, and the minimum detectable effect of a paired difference.

With 4 seeds the honest interval of a between-arm difference is a t-interval with 3 degrees of
freedom over the per-seed differences (a bootstrap over so few seeds is too narrow), and the
spread it is sized from, measured on 3 seeds, is itself uncertain: the planned minimum detectable
effect uses an upper confidence bound of that spread.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from functools import cache


def _integrate(pdf: Callable[[float], float], low: float, high: float, steps: int = 2000) -> float:
    """Simpson's rule (steps even)."""
    h = (high - low) / steps
    total = pdf(low) + pdf(high)
    total += sum((4 if i % 2 else 2) * pdf(low + i * h) for i in range(1, steps))
    return total * h / 3


def _invert(cdf: Callable[[float], float], p: float, low: float, high: float) -> float:
    """x with cdf(x) = p, by bisection on [low, high] (cdf increasing)."""
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if cdf(mid) < p else (low, mid)
    return (low + high) / 2


@cache
def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with `df` degrees of freedom."""
    if not 0 < p < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df >= 1, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1 - p, df)
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def pdf(t: float) -> float:
        return math.exp(log_c - (df + 1) / 2 * math.log1p(t * t / df))

    return _invert(lambda x: 0.5 + _integrate(pdf, 0.0, x), p, 0.0, 1e3)


@cache
def chi2_quantile(p: float, df: int) -> float:
    """The p-quantile of the chi-square distribution with `df` >= 2 degrees of freedom."""
    if not 0 < p < 1 or df < 2:
        raise ValueError(f"chi2_quantile needs 0 < p < 1 and df >= 2, got p={p}, df={df}")
    log_c = -math.lgamma(df / 2) - df / 2 * math.log(2)

    def pdf(x: float) -> float:
        if x > 0:
            return math.exp(log_c + (df / 2 - 1) * math.log(x) - x / 2)
        return 0.5 if df == 2 else 0.0  # the density's limit at 0

    return _invert(lambda x: _integrate(pdf, 0.0, x), p, 0.0, 10.0 * df + 100.0)


def t_interval(values: Sequence[float], level: float = 0.95) -> list[float]:
    """Two-sided t-interval of the mean of `values` (NaN with fewer than 2, or any NaN)."""
    if len(values) < 2 or not all(math.isfinite(v) for v in values):
        return [float("nan"), float("nan")]
    mean, sd = statistics.fmean(values), statistics.stdev(values)
    half = t_quantile(0.5 + level / 2, len(values) - 1) * sd / math.sqrt(len(values))
    return [mean - half, mean + half]


def sd_upper_bound(sd: float, df: int, confidence: float = 0.8) -> float:
    """One-sided upper confidence bound of a standard deviation estimated with `df` degrees of
    freedom: sd * sqrt(df / chi2_{1 - confidence}(df))."""
    return sd * math.sqrt(df / chi2_quantile(1 - confidence, df))


def minimum_detectable_effect(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest true mean paired difference that a two-sided level-`alpha` t-test over `n`
    paired units (seeds) with per-unit spread `sd` detects with probability about `power`:
    (t_{1-alpha/2, n-1} + t_{power, n-1}) * sd / sqrt(n)."""
    if n < 2:
        raise ValueError(f"a t-test needs at least 2 paired units, got n={n}")
    df = n - 1
    return (t_quantile(1 - alpha / 2, df) + t_quantile(power, df)) * sd / math.sqrt(n)
