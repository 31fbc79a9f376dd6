"""Low-rank storage: a per-layer PCA basis fitted on a sample of the teacher's features.

The geometry losses are invariant to rotations of the teacher's space and remove the mean by centering, so k PCA
coefficients per token give the same D_P / D_FG / CKA as the full features up to the energy the basis drops.

A real teacher's massive-activation rows (one token 100x the median norm) would own the PCA: fitted on every row,
99% of layer 20's energy of SmolLM2-135M is the first token's direction, so `--lowrank_energy 0.99` chose k = 1
and dropped everything else. So the basis is fitted on the rows the default token rule keeps, and the rows it
leaves out are kept faithfully by a few extra directions: the principal directions of what the k-basis misses of
them (massive activations sit in a few fixed channels, so a handful of directions hold them; they are added until
the outliers' residual is below 1e-4 of their energy, at most 32).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from pipeline.data.prepared import collate_batch
from pipeline.features.format import Layer, layer_key, read_lowrank
from pipeline.features.plan import length_batches
from pipeline.geometry import DEFAULT_TOKEN_RULE
from pipeline.models import FINAL, capture_hidden_states

OUTLIER_RESIDUAL = 1e-4  # outlier energy the extra directions may leave unrepresented
MAX_OUTLIER_DIRECTIONS = 32
MAX_OUTLIER_ROWS = 20_000  # outlier rows kept in memory during the fit

LowRank = dict[Layer, tuple[Tensor, Tensor]]  # layer -> (basis [d, k], mean [d]) on the teacher's device


def fit_positions(lengths: np.ndarray, fit_tokens: int, seed: int) -> list[int]:
    """A seeded random subset of samples holding at least `fit_tokens` tokens (all samples if there are fewer)."""
    perm = np.random.default_rng(seed).permutation(len(lengths))
    cum = np.cumsum(np.asarray(lengths)[perm])
    m = min(len(perm), int(np.searchsorted(cum, fit_tokens)) + 1)
    return sorted(int(p) for p in perm[:m])


def fit_sample_states(model: Any, dataset: Any, layers: Sequence[Any], *, fit_tokens: int, seed: int, pad_id: int,
                      batch_tokens: int, max_batch_size: int, device: torch.device
                      ) -> Iterator[tuple[dict[Any, Tensor], Tensor]]:
    """The teacher's hidden states `layers` ("final" allowed) over a seeded sample of about `fit_tokens` tokens, one
    length-grouped batch at a time: ({layer: [B, T, d]}, valid-token mask [B, T]), on `device`. What the low-rank
    bases and the quantized store's means are fitted on."""
    ints = [x for x in layers if x != FINAL]
    for batch_pos in length_batches(dataset.lengths, fit_positions(dataset.lengths, fit_tokens, seed), batch_tokens,
                                    max_batch_size):
        batch = collate_batch([dataset[p] for p in batch_pos], pad_id)
        mask = batch["attention_mask"].to(device).bool()
        yield capture_hidden_states(model, batch["input_ids"].to(device), mask, ints, final=FINAL in layers), mask


@torch.no_grad()
def fit_lowrank(model: Any, dataset: Any, layers: Sequence[int], *, k: int, energy: float, fit_tokens: int,
                seed: int, pad_id: int, batch_tokens: int, max_batch_size: int, device: torch.device
                ) -> tuple[LowRank, dict[str, dict[str, Any]]]:
    """Per-layer PCA of the teacher's features on a sample of the data: {layer: (basis, mean)} and a report per
    layer. k is fixed, or the least k keeping `energy` of the variance of the rows the default token rule keeps;
    the basis then gains the directions that keep the left-out rows (see the module docstring). Moments are
    accumulated in float64 so the basis does not depend on batch order beyond rounding of the sums."""
    kept = {layer: [0, 0, 0] for layer in layers}  # sum(x), sum(x x^T), rows: over the rows the rule keeps
    every = {layer: [0, 0, 0] for layer in layers}  # the same over every row
    outliers: dict[int, list[Tensor]] = {layer: [] for layer in layers}
    for hs, mask in fit_sample_states(model, dataset, layers, fit_tokens=fit_tokens, seed=seed, pad_id=pad_id,
                                      batch_tokens=batch_tokens, max_batch_size=max_batch_size, device=device):
        for layer in layers:
            keep, _ = DEFAULT_TOKEN_RULE.select(hs[layer], mask)
            h_all, h_keep = hs[layer][mask].double(), hs[layer][keep].double()
            for acc, h in ((every[layer], h_all), (kept[layer], h_keep)):
                acc[0], acc[1], acc[2] = acc[0] + h.sum(0), acc[1] + h.T @ h, acc[2] + h.shape[0]
            if sum(o.shape[0] for o in outliers[layer]) < MAX_OUTLIER_ROWS:
                outliers[layer].append(hs[layer][mask & ~keep].double().cpu())
    bases: LowRank = {}
    report: dict[str, dict[str, Any]] = {}
    for layer in layers:
        s1, s2, n = (x.cpu() if torch.is_tensor(x) else x for x in kept[layer])
        basis, mean, kept_energy = pca_basis(s1, s2, n, k=k, energy=energy)
        out_rows = torch.cat(outliers[layer]) if outliers[layer] else torch.zeros(0, basis.shape[0])
        extra, out_err = outlier_directions(out_rows, basis.double(), mean.double())
        full = torch.cat([basis, extra.float()], dim=1)
        bases[layer] = (full, mean)
        a1, a2, a_n = (x.cpu() if torch.is_tensor(x) else x for x in every[layer])
        report[layer_key(layer)] = {
            "k": full.shape[1], "k_principal": basis.shape[1], "k_outlier": extra.shape[1], "d": basis.shape[0],
            "energy_fit": kept_energy, "energy_fit_all_tokens": energy_kept(a1, a2, a_n, full.double(),
                                                                          mean.double()),
            "fit_tokens": a_n, "outlier_tokens": a_n - n, "outlier_rel_error": out_err,
            "k_for_energy": k_for_energy(s1, s2, n), "k_for_energy_all_tokens": k_for_energy(a1, a2, a_n)}
    return bases, report


def outlier_directions(rows: Tensor, basis: Tensor, mean: Tensor) -> tuple[Tensor, float]:
    """Orthonormal directions [d, r] (orthogonal to `basis`) that hold what `basis` misses of the outlier `rows`,
    and the relative error ||residual|| / ||rows - mean|| left after adding them (0.0 with no outliers)."""
    d = basis.shape[0]
    if rows.shape[0] == 0:
        return torch.zeros(d, 0, dtype=torch.float64), 0.0
    centred = rows - mean
    resid = centred - (centred @ basis) @ basis.T
    total = float(centred.square().sum())
    evals, evecs = torch.linalg.eigh(resid.T @ resid)  # the residuals' principal directions, largest last
    evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
    left = torch.flip(torch.cumsum(torch.flip(evals, [0]), 0), [0])  # energy from direction i on
    r = 0
    while r < min(MAX_OUTLIER_DIRECTIONS, evals.numel()) and float(left[r]) > OUTLIER_RESIDUAL * total:
        r += 1
    extra = evecs[:, :r]
    extra = extra - basis @ (basis.T @ extra)  # exactly orthogonal to the principal basis, then orthonormal
    extra, _ = torch.linalg.qr(extra) if r else (extra, None)
    rest = resid - (resid @ extra) @ extra.T
    return extra, float(rest.norm() / max(total, 1e-300) ** 0.5)


def energy_kept(s1: Tensor, s2: Tensor, n: int, basis: Tensor, mean: Tensor) -> float:
    """Fraction of the centred energy of n rows (moments s1, s2) that `basis` keeps, centred at `mean`."""
    mu = s1.double() / n
    cov = s2.double() / n - torch.outer(mu, mu)
    shift = mu - mean  # rows are centred at the store's mean, not their own
    total = float(torch.trace(cov)) + float(shift @ shift)
    kept = float(torch.trace(basis.T @ cov @ basis)) + float((basis.T @ shift).square().sum())
    return kept / max(total, 1e-300)


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
