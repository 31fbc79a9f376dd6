"""The statistics of a method study: confidence intervals over training seeds, paired tests, a paired bootstrap
over prompts, and Holm's correction. scipy supplies the distributions; the bookkeeping is ours.

The unit of replication is the training seed (it changes the student's initialisation and data order): two
methods are paired by seed. Sampling seeds are averaged inside each run first; they are not replicates of the
training, only of the generation.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class Estimate:
    mean: float
    low: float  # 95% confidence interval (t distribution over the n values)
    high: float
    n: int

    def dict(self) -> dict[str, float]:
        return asdict(self)


def mean_ci(values: Sequence[float], level: float = 0.95) -> Estimate:
    """Mean and its t-interval; a single value has an infinitely wide interval (nothing to estimate it from)."""
    x = np.asarray(values, dtype=np.float64)
    m = float(x.mean())
    if len(x) < 2:
        return Estimate(m, -math.inf, math.inf, len(x))
    half = float(stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return Estimate(m, m - half, m + half, len(x))


@dataclass(frozen=True)
class Comparison:
    """Method minus reference, paired by training seed."""

    method: str
    reference: str
    difference: Estimate  # mean of the per-seed differences, with its t-interval
    t_p: float  # paired t-test, two-sided (the primary test)
    wilcoxon_p: float  # Wilcoxon signed-rank, two-sided, exact for small n (with 5 seeds it cannot go below 0.0625)
    bootstrap: Estimate  # paired bootstrap over prompts of the seed-averaged difference (percentile interval)
    bootstrap_p: float
    holm_p: float = math.nan  # t_p after Holm's correction over the comparisons against the same reference

    def dict(self) -> dict[str, object]:
        d = asdict(self)
        d["difference"], d["bootstrap"] = self.difference.dict(), self.bootstrap.dict()
        return d


def paired_t(diffs: Sequence[float]) -> float:
    d = np.asarray(diffs, dtype=np.float64)
    if len(d) < 2:
        return math.nan
    if np.all(d == d[0]):
        return 0.0 if d[0] != 0 else 1.0
    return float(stats.ttest_1samp(d, 0.0).pvalue)


def wilcoxon(diffs: Sequence[float]) -> float:
    d = np.asarray(diffs, dtype=np.float64)
    if len(d) < 1 or np.all(d == 0):
        return 1.0
    return float(stats.wilcoxon(d, zero_method="wilcox", alternative="two-sided").pvalue)


def paired_bootstrap(a: np.ndarray, b: np.ndarray, reps: int = 10_000, seed: int = 0) -> tuple[Estimate, float]:
    """`a`, `b`: [seeds, prompts] per-prompt scores of two methods on the same prompts. Resample prompts (the
    same resample for both), take the mean over seeds and prompts of a - b: percentile interval, and a two-sided
    p from how often the resampled difference falls on the other side of zero."""
    diff = (np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).mean(axis=0)  # per prompt
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(diff), size=(reps, len(diff)))
    boots = diff[idx].mean(axis=1)
    observed = float(diff.mean())
    low, high = (float(v) for v in np.percentile(boots, [2.5, 97.5]))
    other_side = np.mean(boots <= 0) if observed > 0 else np.mean(boots >= 0)
    return Estimate(observed, low, high, len(diff)), float(min(1.0, 2 * other_side))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (same order as given); NaN stays NaN and is not counted."""
    p = np.asarray(pvalues, dtype=np.float64)
    valid = np.flatnonzero(~np.isnan(p))
    out = np.full(len(p), math.nan)
    order = valid[np.argsort(p[valid], kind="stable")]
    m, running = len(order), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out.tolist()


def compare(method: str, reference: str, per_seed: dict[str, Sequence[float]],
            per_prompt: dict[str, np.ndarray], bootstrap: Callable[..., tuple[Estimate, float]] | None = None
            ) -> Comparison:
    """`per_seed[name]`: the score of each training seed (same seed order for all); `per_prompt[name]`:
    [seeds, prompts] scores, or what `bootstrap(method's, reference's)` resamples (default `paired_bootstrap`)."""
    diffs = np.asarray(per_seed[method], dtype=np.float64) - np.asarray(per_seed[reference], dtype=np.float64)
    boot, boot_p = (bootstrap or paired_bootstrap)(per_prompt[method], per_prompt[reference])
    return Comparison(method, reference, mean_ci(diffs), paired_t(diffs), wilcoxon(diffs), boot, boot_p)


def with_holm(comparisons: list[Comparison]) -> list[Comparison]:
    adjusted = holm([c.t_p for c in comparisons])
    return [Comparison(**{**c.__dict__, "holm_p": p}) for c, p in zip(comparisons, adjusted)]
