"""Quantized feature storage: codes plus one scale per group of channels, after a seeded rotation and the removal
of a per-channel mean, both optional.

A stored row x [d] becomes codes with one bf16 scale per `group` consecutive channels (group 0: one scale per
row): int8 (symmetric, -127..127), fp8 e4m3 (scaled so the group's largest entry is 448) or int4 (-7..7, two codes
per byte). The reader multiplies back (`dequantize`). Exact zeros stay zero; every row keeps its own scales, so a
massive-activation row (100x the median norm) loses the same fraction of itself as any other row.

Rotation: with `rotate`, each layer's rows are multiplied by one seeded orthogonal matrix Q before quantizing, and
the reader returns the rotated rows x Q. Nothing downstream needs them un-rotated: D_P, D_FG, CKA, the token rule
(centred row norms) and a learned projection are unchanged by an orthogonal map of the teacher's space, and exact
KD stays exact because the stored LM head is rotated too ((h Q)(W Q)^T = h W^T). What it buys: a massive channel
(SmolLM2, Gemma) is spread over all channels, so it no longer sets the scale of its group and crushes its
neighbours to zero codes. `analyze`, which reports channels, un-rotates with the stored matrix.

Centering: a per-channel mean, fitted before caching on a sample of the rows the default token rule keeps (a
massive first token would otherwise own it), is subtracted before quantizing and added back on read, so the part of
a channel that every token carries (Gemma 3's channel 163 holds 5,000-32,000 in every token) costs no code range;
only its variation does. The distances see rows after their mean is removed, so that is the error that counts:
on Gemma, int4 after rotation moves a close student's distances by 29-47% without the mean and 2.3-7.0% with it;
on SmolLM2-135M it takes int4's element error from 9.9% to 6.8% and int8's from 0.61% to 0.42% (BENCHMARKS.md, "A
quantized feature store").
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

QMAX = {"int8": 127.0, "fp8": 448.0, "int4": 7.0}
SCALE_DTYPE = torch.bfloat16
DEFAULT_GROUP = {"int8": 64, "fp8": 64, "int4": 32}
_SCALE_UP = 1.0 + 2.0 ** -7  # bf16 keeps 8 significant bits: rounding scale x (1 + 2^-7) never lands below scale


@dataclass(frozen=True)
class QuantSpec:
    """How a layer's rows are stored: `kind` (int8 / fp8 / int4), `group` channels per scale (0 = per row),
    `rotated` (rows were multiplied by the stored orthogonal matrix first), `centered` (then a stored per-channel
    mean was subtracted)."""

    kind: str
    group: int
    rotated: bool = False
    centered: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "group": self.group, "scale_dtype": "bfloat16", "rotated": self.rotated,
                "centered": self.centered}

    @classmethod
    def from_json(cls, info: dict[str, Any]) -> "QuantSpec":
        return cls(info["kind"], int(info["group"]), bool(info.get("rotated")), bool(info.get("centered")))

    def groups(self, d: int) -> int:
        return 1 if self.group == 0 else d // self.group

    def bytes_per_row(self, d: int) -> float:
        """Stored bytes of one row (codes + scales), to compare with 2 d for bf16."""
        return d * (0.5 if self.kind == "int4" else 1.0) + 2 * self.groups(d)


def default_group(kind: str, widths: list[int]) -> int:
    """The kind's default group (64 channels for int8 and fp8, 32 for int4: BENCHMARKS.md), or the largest power
    of two below it that divides every stored width (a 16-wide test model gets groups of 16)."""
    return math.gcd(DEFAULT_GROUP[kind], *widths)


def check_spec(kind: str, group: int, d: int, what: str) -> str | None:
    """Why `kind`/`group` cannot store rows of width d (None when they can), for a clear config error."""
    if kind not in QMAX:
        return f"unknown quantization {kind!r} (choose {', '.join(QMAX)})"
    if group < 0 or (group and d % group):
        return f"{what} has width {d}, not a multiple of the quantization group {group}"
    if kind == "int4" and d % 2:
        return f"{what} has odd width {d}: int4 packs two channels per byte"
    return None


def quantize(x: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Rows [n, d] (any float dtype) -> (codes, bf16 scales [n, groups]); computed in float32 on x's device."""
    n, d = x.shape
    g = spec.groups(d)
    xg = x.float().reshape(n, g, d // g)
    absmax = xg.abs().amax(dim=-1)
    scale = (absmax / QMAX[spec.kind] * _SCALE_UP).to(SCALE_DTYPE)
    safe = torch.where(scale > 0, scale.float(), torch.ones_like(absmax)).unsqueeze(-1)
    y = (xg / safe).reshape(n, d)
    if spec.kind == "fp8":
        codes = y.clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    else:
        q = y.round().clamp(-QMAX[spec.kind], QMAX[spec.kind])
        if spec.kind == "int8":
            codes = q.to(torch.int8)
        else:  # two 4-bit codes per byte, offset by 8: channel 2i in the low nibble, 2i+1 in the high one
            u = (q + 8).to(torch.uint8)
            codes = u[:, 0::2] | (u[:, 1::2] << 4)
    return codes, scale


def dequantize(codes: Tensor, scale: Tensor, spec: QuantSpec) -> Tensor:
    """(codes, scales) -> float32 rows [n, d]."""
    if spec.kind == "int4":
        u = torch.stack([codes & 0xF, codes >> 4], dim=-1).reshape(codes.shape[0], -1)
        y = u.to(torch.float32) - 8.0
    else:
        y = codes.to(torch.float32)
    n, d = y.shape
    g = scale.shape[1]
    return (y.reshape(n, g, d // g) * scale.float().unsqueeze(-1)).reshape(n, d)


def rotation_matrix(d: int, seed: int, dtype: torch.dtype = torch.float32) -> tuple[Tensor, str]:
    """A seeded orthogonal [d, d] matrix (built in float64, returned in `dtype`) and its name: a randomized Hadamard
    transform (random signs times the normalised Sylvester-Hadamard matrix) when d is a power of two, else the Q of
    a Gaussian matrix's QR (signs fixed by R's diagonal, so the matrix depends on the seed alone)."""
    g = torch.Generator().manual_seed(seed)
    if d & (d - 1) == 0:
        h = torch.ones(1, 1, dtype=torch.float64)
        while h.shape[0] < d:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        signs = torch.randint(0, 2, (d,), generator=g, dtype=torch.float64) * 2 - 1
        return (signs[:, None] * h / math.sqrt(d)).to(dtype), "randomized_hadamard"
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    return (q * torch.sign(torch.diagonal(r))).to(dtype), "random_orthogonal"

