"""Classification metrics of the GLUE tasks (pure Python; scikit-learn's definitions, no scikit-learn):
accuracy, F1 of the positive class (MRPC), Matthews correlation (CoLA). `task_scores` gives them x100, as GLUE
tables print them."""
from __future__ import annotations

import math
from typing import Any, Sequence

from pipeline.errors import ConfigError, DataError

# The score a task's metric is ranked by (MRPC reports F1 and accuracy; F1 is its headline).
PRIMARY = {"mcc": "mcc", "accuracy": "accuracy", "f1": "f1"}


def _ints(pred: Sequence[Any], gold: Sequence[Any]) -> tuple[list[int], list[int]]:
    """Class ids as ints (lists, tuples or tensors); misaligned or empty sets are an error."""
    p = [int(x) for x in (pred.tolist() if hasattr(pred, "tolist") else pred)]
    g = [int(x) for x in (gold.tolist() if hasattr(gold, "tolist") else gold)]
    if len(p) != len(g):
        raise DataError(f"{len(p)} predictions but {len(g)} gold labels: they are misaligned")
    if not p:
        raise DataError("no predictions to score")
    return p, g


def accuracy(pred: Sequence[Any], gold: Sequence[Any]) -> float:
    """Fraction of predictions equal to the gold label, in [0, 1]."""
    p, g = _ints(pred, gold)
    return sum(a == b for a, b in zip(p, g)) / len(p)


def f1_binary(pred: Sequence[Any], gold: Sequence[Any], positive: int = 1) -> float:
    """F1 of class `positive`, in [0, 1]: 2 TP / (2 TP + FP + FN); 0.0 when there is no positive in either (as
    scikit-learn's zero_division default)."""
    p, g = _ints(pred, gold)
    tp = sum(a == positive and b == positive for a, b in zip(p, g))
    fp = sum(a == positive and b != positive for a, b in zip(p, g))
    fn = sum(a != positive and b == positive for a, b in zip(p, g))
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def matthews_corrcoef(pred: Sequence[Any], gold: Sequence[Any]) -> float:
    """Matthews correlation in [-1, 1], the multiclass form scikit-learn uses (the binary formula for two classes);
    0.0 when it is undefined (all predictions, or all gold labels, one class)."""
    p, g = _ints(pred, gold)
    n = len(p)
    classes = sorted(set(p) | set(g))
    t_k = [sum(b == k for b in g) for k in classes]  # gold counts
    p_k = [sum(a == k for a in p) for k in classes]  # predicted counts
    correct = sum(a == b for a, b in zip(p, g))
    cov_tp = correct * n - sum(t * q for t, q in zip(t_k, p_k))
    cov_pp = n * n - sum(q * q for q in p_k)
    cov_tt = n * n - sum(t * t for t in t_k)
    if cov_pp == 0 or cov_tt == 0:
        return 0.0
    return cov_tp / math.sqrt(cov_pp * cov_tt)


def task_scores(metric: str, pred: Sequence[Any], gold: Sequence[Any]) -> dict[str, float]:
    """A task's scores x100: mcc -> {"mcc"}, accuracy -> {"accuracy"}, f1 -> {"f1", "accuracy"} (MRPC's pair)."""
    if metric == "mcc":
        return {"mcc": 100.0 * matthews_corrcoef(pred, gold)}
    if metric == "accuracy":
        return {"accuracy": 100.0 * accuracy(pred, gold)}
    if metric == "f1":
        return {"f1": 100.0 * f1_binary(pred, gold), "accuracy": 100.0 * accuracy(pred, gold)}
    raise ConfigError(f"metric {metric!r}: choose one of {', '.join(PRIMARY)}")
