"""ROUGE-L as MiniLLM reports it: `rouge_score`'s F-measure with stemming, x100, best over the references;
mean over samples per seed, then mean and standard deviation over seeds."""
from __future__ import annotations

import statistics
from functools import lru_cache
from typing import Sequence

from pipeline.errors import DataError


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(generation: str, references: Sequence[str]) -> float:
    """Best ROUGE-L F-measure (x100) of one generation over its references."""
    if isinstance(references, str) or not references:
        raise DataError("references must be a non-empty list of strings")
    scorer = _scorer()
    return max(scorer.score(ref, generation)["rougeL"].fmeasure for ref in references) * 100.0


def score_all(generations: Sequence[str], references: Sequence[Sequence[str]]) -> list[float]:
    """Per-sample ROUGE-L; a count mismatch means generations and references are misaligned, so it is an error."""
    if len(generations) != len(references):
        raise DataError(
            f"{len(generations)} generations but {len(references)} reference sets: outputs and references "
            "are misaligned"
        )
    return [rouge_l(g, r) for g, r in zip(generations, references)]


def aggregate(per_seed: dict[str, Sequence[float]]) -> dict[str, float | int | dict[str, float]]:
    """Mean over samples for each seed, then mean and population std (ddof=0) over seeds.

    Every seed must cover the same number of samples, otherwise the seeds measure different sets.
    """
    if not per_seed:
        raise DataError("no seeds to aggregate")
    counts = {seed: len(scores) for seed, scores in per_seed.items()}
    if len(set(counts.values())) != 1:
        raise DataError(f"seeds scored different numbers of samples: {counts}")
    if 0 in counts.values():
        raise DataError("a seed has no scored samples")
    seed_means = {seed: statistics.fmean(scores) for seed, scores in per_seed.items()}
    values = list(seed_means.values())
    return {
        "mean": statistics.fmean(values),
        "std": statistics.pstdev(values) if len(values) > 1 else 0.0,
        "n_samples": next(iter(counts.values())),
        "n_seeds": len(values),
        "per_seed": seed_means,
    }
