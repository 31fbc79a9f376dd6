"""Low-rank storage: a per-layer PCA basis fitted on a sample of the teacher's features.

The geometry losses are invariant to rotations of the teacher's space and remove the mean by centering, so k PCA
coefficients per token give the same D_P / D_FG / CKA as the full features up to the energy the basis drops.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from pipeline.data.prepared import collate_batch
from pipeline.features.format import Layer, layer_key, read_lowrank
from pipeline.features.plan import length_batches
from pipeline.models import capture_hidden_states

LowRank = dict[Layer, tuple[Tensor, Tensor]]  # layer -> (basis [d, k], mean [d]) on the teacher's device


def fit_positions(lengths: np.ndarray, fit_tokens: int, seed: int) -> list[int]:
    """A seeded random subset of samples holding at least `fit_tokens` tokens (all samples if there are fewer)."""
    perm = np.random.default_rng(seed).permutation(len(lengths))
    cum = np.cumsum(np.asarray(lengths)[perm])
    m = min(len(perm), int(np.searchsorted(cum, fit_tokens)) + 1)
    return sorted(int(p) for p in perm[:m])


@torch.no_grad()
def fit_lowrank(model: Any, dataset: Any, layers: Sequence[int], *, k: int, energy: float, fit_tokens: int,
                seed: int, pad_id: int, batch_tokens: int, max_batch_size: int, device: torch.device
                ) -> tuple[LowRank, dict[str, dict[str, float]]]:
    """Per-layer PCA of the teacher's features on a sample of the data: {layer: (basis, mean)} and a
    report {layer: {"k", "d", "energy_fit", "fit_tokens"}}. k is fixed, or the least k keeping `energy` of the
    variance. Accumulated in float64 so the basis does not depend on batch order beyond rounding of the sums."""
    positions = fit_positions(dataset.lengths, fit_tokens, seed)
    s1: dict[int, Tensor] = {}
    s2: dict[int, Tensor] = {}
    n = 0
    for batch_pos in length_batches(dataset.lengths, positions, batch_tokens, max_batch_size):
        batch = collate_batch([dataset[p] for p in batch_pos], pad_id)
        hs = capture_hidden_states(model, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                   list(layers))
        for layer in layers:
            h = hs[layer][batch["attention_mask"].to(hs[layer].device).bool()].double()
            s1[layer] = s1.get(layer, 0) + h.sum(0)
            s2[layer] = s2.get(layer, 0) + h.T @ h
        n += int(batch["attention_mask"].sum())
    bases: LowRank = {}
    report: dict[str, dict[str, float]] = {}
    for layer in layers:
        basis, mean, kept = pca_basis(s1[layer].cpu(), s2[layer].cpu(), n, k=k, energy=energy)
        bases[layer] = (basis, mean)
        report[layer_key(layer)] = {"k": basis.shape[1], "d": basis.shape[0], "energy_fit": kept, "fit_tokens": n,
                                    "k_for_energy": k_for_energy(s1[layer].cpu(), s2[layer].cpu(), n)}
    return bases, report


def pca_basis(s1: Tensor, s2: Tensor, n: int, *, k: int = 0, energy: float = 0.0) -> tuple[Tensor, Tensor, float]:
    """PCA from the moments sum(x) [d] and sum(x x^T) [d, d] of n rows: (basis [d, k] fp32 with orthonormal
    columns, mean [d] fp32, fraction of the variance the k directions keep). k is fixed, or the least k keeping
    `energy` of the variance."""
    mean = s1.double() / n
    cov = s2.double() / n - torch.outer(mean, mean)
    evals, evecs = torch.linalg.eigh(cov)
    evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
    # One sign per eigenvector (largest entry positive) so the basis is reproducible across LAPACK builds.
    signs = torch.sign(evecs.gather(0, evecs.abs().argmax(0, keepdim=True)))
    evecs = evecs * torch.where(signs == 0, 1.0, signs)
    frac = torch.cumsum(evals, 0) / evals.sum().clamp_min(1e-300)
    kk = k if k else int(torch.searchsorted(frac, torch.tensor([energy - 1e-12], dtype=frac.dtype))) + 1
    kk = max(1, min(kk, evals.numel()))
    return evecs[:, :kk].float().contiguous(), mean.float(), float(frac[kk - 1])


def k_for_energy(s1: Tensor, s2: Tensor, n: int, levels: Sequence[float] = (0.9, 0.99, 0.999)) -> dict[str, int]:
    """How many principal directions keep each energy level: the spectrum in three numbers, to choose k by."""
    return {str(e): pca_basis(s1, s2, n, energy=e)[0].shape[1] for e in levels}


def load_lowrank(path: Path, device: torch.device) -> LowRank:
    """The store's bases, on the device the teacher's features are projected on."""
    return {layer: (basis.to(device), mean.to(device)) for layer, (basis, mean) in read_lowrank(path).items()}
