"""A paired bootstrap over examples for classification metrics, which are not means of per-example scores (MCC,
F1): every resample recomputes the metric from its confusion counts, for each training seed of both methods."""
from __future__ import annotations

import numpy as np

from pipeline.experiments.stats import Estimate


def _binary_metric(pred: np.ndarray, gold: np.ndarray, metric: str) -> np.ndarray:
    """The metric x100 along the last axis of `pred`/`gold` ([..., n] of 0/1), vectorised over the leading axes."""
    tp = ((pred == 1) & (gold == 1)).sum(-1).astype(np.float64)
    tn = ((pred == 0) & (gold == 0)).sum(-1).astype(np.float64)
    fp = ((pred == 1) & (gold == 0)).sum(-1).astype(np.float64)
    fn = ((pred == 0) & (gold == 1)).sum(-1).astype(np.float64)
    if metric == "accuracy":
        return 100.0 * (tp + tn) / pred.shape[-1]
    if metric == "f1":
        denom = 2 * tp + fp + fn
        return 100.0 * np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    if metric == "mcc":
        denom = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        return 100.0 * np.divide(tp * tn - fp * fn, denom, out=np.zeros_like(tp), where=denom > 0)
    raise ValueError(f"unknown metric {metric!r}")


def metric_per_seed(pred: np.ndarray, gold: np.ndarray, metric: str) -> np.ndarray:
    """[seeds] metric values of [seeds, n] predictions (accuracy for any number of classes; F1 and MCC binary)."""
    pred, gold = np.asarray(pred), np.asarray(gold)
    if metric == "accuracy":
        return 100.0 * (pred == gold).mean(-1)
    return _binary_metric(pred, np.broadcast_to(gold, pred.shape), metric)


def paired_metric_bootstrap(a: np.ndarray, b: np.ndarray, gold: np.ndarray, metric: str, reps: int = 2000,
                            seed: int = 0) -> tuple[Estimate, float]:
    """`a`, `b`: [seeds, n] predicted classes of two methods on the same n examples. Resample examples (the same
    resample for both), take the seed-averaged metric of a minus b's: percentile interval and a two-sided p from
    how often the resampled difference falls on the other side of zero."""
    a, b, gold = np.asarray(a), np.asarray(b), np.asarray(gold)
    observed = float(metric_per_seed(a, gold, metric).mean() - metric_per_seed(b, gold, metric).mean())
    rng = np.random.default_rng(seed)
    boots = np.empty(reps)
    for start in range(0, reps, 100):  # [100, seeds, n] at a time: a few MB for GLUE's dev sets
        idx = rng.integers(0, len(gold), size=(min(100, reps - start), 1, len(gold)))
        ga = np.take_along_axis(np.broadcast_to(a, (idx.shape[0], *a.shape)), np.broadcast_to(idx, (idx.shape[0],
                                *a.shape)), -1)
        gb = np.take_along_axis(np.broadcast_to(b, (idx.shape[0], *b.shape)), np.broadcast_to(idx, (idx.shape[0],
                                *b.shape)), -1)
        g = gold[idx]
        boots[start:start + idx.shape[0]] = (metric_per_seed(ga, np.broadcast_to(g, ga.shape), metric).mean(-1)
                                             - metric_per_seed(gb, np.broadcast_to(g, gb.shape), metric).mean(-1))
    low, high = (float(v) for v in np.percentile(boots, [2.5, 97.5]))
    other_side = np.mean(boots <= 0) if observed > 0 else np.mean(boots >= 0)
    return Estimate(observed, low, high, len(gold)), float(min(1.0, 2 * other_side))
