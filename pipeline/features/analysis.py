"""A teacher's feature geometry on a prepared split, layer by layer: what to map and how wide a student must be.

Everything is measured on micro-batches of whole samples, as the training loss sees them, with and without the
default token rule (pipeline/geometry/): the token-norm profile and the massive-activation tokens and channels
the rule leaves out, the spectrum (top direction's share of the centred energy; k for 90/99/99.9% energy) and
the Procrustes floor a student of each width cannot go below.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from pipeline.features.lowrank import k_for_energy
from pipeline.geometry import ALL_TOKENS, DEFAULT_TOKEN_RULE, centred_norm_ratios, normalize_features

ENERGY_LEVELS = (0.9, 0.99, 0.999)
RULES = {"rule": DEFAULT_TOKEN_RULE, "all_tokens": ALL_TOKENS}


@dataclass
class LayerTally:
    """Running sums over the micro-batches of one layer."""

    d: int
    widths: list[int]
    norm_ratio_by_position: dict[int, list[float]] = field(default_factory=dict)
    norms: list[Tensor] = field(default_factory=list)
    first_ratio: list[float] = field(default_factory=list)
    outlier_tokens: Counter = field(default_factory=Counter)
    outlier_positions: Counter = field(default_factory=Counter)
    channel_abs: Tensor | None = None  # sum over outlier rows of |activation| per channel
    n_outliers: int = 0
    n_tokens: int = 0
    top1: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in RULES})
    spectrum: dict[str, Tensor] = field(default_factory=dict)  # mean energy share per direction (first 64)
    floors: dict[str, list[list[float]]] = field(default_factory=lambda: {k: [] for k in RULES})
    moments: dict[str, list[Any]] = field(default_factory=lambda: {k: [0, 0, 0] for k in RULES})

    def add(self, h: Tensor, mask: Tensor, input_ids: Tensor, decode: Callable[[int], str]) -> None:
        """One micro-batch: h [B, T, d] (float), mask [B, T] bool."""
        h = h.double()
        ratio = centred_norm_ratios(h, mask).double()  # what the token rule measures
        for pos in range(min(h.shape[1], 64)):
            vals = ratio[:, pos][mask[:, pos]]
            if vals.numel():
                self.norm_ratio_by_position.setdefault(pos, []).extend(vals.tolist())
        self.first_ratio.extend(ratio[:, 0][mask[:, 0]].tolist())
        self.norms.append(ratio[mask].float())
        keep, dropped = DEFAULT_TOKEN_RULE.select(h, mask)
        out = mask & ~keep
        self.n_outliers += dropped
        self.n_tokens += int(mask.sum())
        for b, t in torch.nonzero(out).tolist():
            self.outlier_tokens[decode(int(input_ids[b, t]))] += 1
            self.outlier_positions[t] += 1
        if dropped:
            absolute = h[out].abs().sum(0)
            self.channel_abs = absolute if self.channel_abs is None else self.channel_abs + absolute
        for name, rows in (("rule", keep), ("all_tokens", mask)):
            r = normalize_features(h, rows)
            s2 = torch.linalg.svdvals(r).square()
            self.top1[name].append(float(s2[0]))
            head = torch.zeros(64, dtype=torch.float64)
            head[: min(64, s2.numel())] = s2[:64]
            self.spectrum[name] = self.spectrum.get(name, 0) + head
            # D_P (not squared) >= sqrt(2 - 2 sqrt(1 - e_w)), e_w the energy beyond rank w (geometry.procrustes_floor)
            tail = torch.cat([torch.flip(torch.cumsum(torch.flip(s2, [0]), 0), [0]), s2.new_zeros(1)])
            self.floors[name].append([float((2 - 2 * (1 - tail[min(w, s2.numel())]).clamp(0, 1).sqrt()).sqrt())
                                      for w in self.widths])
            x = h[rows]
            m = self.moments[name]
            m[0], m[1], m[2] = m[0] + x.sum(0), m[1] + x.T @ x, m[2] + x.shape[0]

    def summary(self) -> dict[str, Any]:
        ratios = torch.cat(self.norms).double()
        batches = len(self.top1["rule"])
        out: dict[str, Any] = {
            "d": self.d, "tokens": self.n_tokens,
            "top1_energy": float(np.mean(self.top1["rule"])),
            "top1_energy_all_tokens": float(np.mean(self.top1["all_tokens"])),
            "norm_ratio_quantiles": {q: float(torch.quantile(ratios, float(q))) for q in ("0.5", "0.9", "0.99")},
            "max_norm_ratio": float(ratios.max()),
            "first_token_norm_ratio": float(np.median(self.first_ratio)) if self.first_ratio else None,
            "norm_ratio_by_position": {p: float(np.mean(v)) for p, v in sorted(self.norm_ratio_by_position.items())},
            "outlier_tokens": self.n_outliers, "outlier_fraction": self.n_outliers / max(self.n_tokens, 1),
            "outlier_token_texts": dict(self.outlier_tokens.most_common(8)),
            "outlier_positions": {int(p): c for p, c in self.outlier_positions.most_common(8)},
            "outlier_channels": [],
            "k_for_energy": k_for_energy(*self.moments["rule"], ENERGY_LEVELS),
            "k_for_energy_all_tokens": k_for_energy(*self.moments["all_tokens"], ENERGY_LEVELS),
            "spectrum": {k: (v / batches).tolist() for k, v in self.spectrum.items()},
            "procrustes_floor": {k: dict(zip(map(str, self.widths), np.mean(v, axis=0).tolist()))
                                 for k, v in self.floors.items()},
        }
        if self.channel_abs is not None:
            mean_abs = self.channel_abs / max(self.n_outliers, 1)
            top = torch.topk(mean_abs, min(5, self.d))
            out["outlier_channels"] = [{"channel": int(c), "mean_abs": float(v)} for v, c in zip(*top)]
        return out


def student_widths(d: int) -> list[int]:
    """64, 128, ... up to the teacher's width, and the width itself."""
    widths, w = [], 64
    while w < d:
        widths.append(w)
        w *= 2
    return widths + [d]


def analyze_batches(batches: Iterable[tuple[dict[Any, Tensor], Tensor, Tensor]], layers: Sequence[Any],
                    decode: Callable[[int], str]) -> dict[str, Any]:
    """`batches` yields ({layer: h [B, T, d]}, attention_mask [B, T], input_ids [B, T]); returns the report."""
    tallies: dict[Any, LayerTally] = {}
    for hidden, mask, input_ids in batches:
        mask = mask.bool()
        for layer in layers:
            h = hidden[layer].float()
            if layer not in tallies:
                tallies[layer] = LayerTally(h.shape[-1], student_widths(h.shape[-1]))
            tallies[layer].add(h, mask, input_ids, decode)
    return {str(layer): t.summary() for layer, t in tallies.items()}
