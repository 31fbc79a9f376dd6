"""Geometry-aware feature distances between student and teacher token representations (DESIGN section 1).

Every distance works on the valid tokens' features as rows of `R in R^{n x d}`, each side centered (mean row
removed) and scaled to unit Frobenius norm. Widths may differ. The teacher side never receives a gradient. With
`squared=True` (training) the squared distance is returned; with `squared=False` (reporting) the distance itself.

The math runs in float64 whatever the input dtype, and the result comes back in fp32 (float64 for float64
inputs). Each distance is a small difference of terms near 1 (D_P^2 = 2 - 2 ||M||_*), so fp32 products over
thousands of tokens lose most of its digits: at 8192 x 1024 fp32 gave D_P^2 20% too low, and for near-identical
features a negative value clamped to 0 with no gradient. float64 makes every distance exact to ~1e-12; its cost
is the products R_s^T R_t etc. in float64, which datacenter GPUs (A100, H100, H200) run at their fp32 rate and
a CPU at about half of it (BENCHMARKS.md).

    D_P^2  = 2 - 2 ||R_s^T R_t||_*                          (Procrustes: min over orthogonal Q of ||R_t - R_s Q||^2)
    D_FG^2 = ||R_t^T R_t||^2 + ||R_s^T R_s||^2 - 2 ||R_s^T R_t||^2      (= ||R_t R_t^T - R_s R_s^T||^2)
    D_CKA  = 1 - ||R_s^T R_t||^2 / (||R_s^T R_s|| ||R_t^T R_t||)

Which rows: a real teacher's massive activations (Sun et al., COLM 2024) put one token at 100x the median norm
(SmolLM2-135M: the first token at layers 15-25, 100-150x), and that one row then owns 98-99.7% of the centered
energy, so every distance becomes the distance to one spike. A `TokenRule` decided on the teacher's rows leaves
such rows out of both sides before normalization; the default leaves out rows above 4x the micro-batch's median
norm, and leaves spike-free inputs exactly as they are (BENCHMARKS.md: how 4 was chosen).

The nuclear norm of `M = R_s^T R_t` and its gradient (the polar factor of M): pipeline/geometry/nuclear.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.errors import ConfigError
from pipeline.geometry.nuclear import MATH_DTYPE, NuclearMethod, nuclear_norm  # noqa: F401 (nuclear_norm: re-exported)

_EPS = 1e-12


# ---------------------------------------------------------------------------------------------------------------
# Feature preparation
# ---------------------------------------------------------------------------------------------------------------
def select_tokens(x: Tensor, mask: Tensor | None = None) -> Tensor:
    """Rows of the valid tokens: `[n, d]` as is, `[batch, seq, d]` flattened over the positions where mask is true."""
    if x.dim() == 2:
        if mask is None:
            return x
        if mask.shape != x.shape[:1]:
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not match features of shape {tuple(x.shape)}")
        return x[mask.bool()]
    if x.dim() == 3:
        if mask is None:
            return x.reshape(-1, x.shape[-1])
        if mask.shape != x.shape[:2]:
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not match features of shape {tuple(x.shape)}")
        return x[mask.bool()]
    raise ValueError(f"features must be [n, d] or [batch, seq, d], got shape {tuple(x.shape)}")


@dataclass(frozen=True)
class TokenRule:
    """Which valid token rows a feature distance compares, decided on the teacher's rows (the student's rows at
    the same positions follow).

    `max_norm_ratio` c > 0 leaves out rows whose centred norm exceeds c x the median centred norm of the valid
    tokens (0: keep every row; `centred_norm_ratios`); `row_normalize` scales every row to unit norm before
    centering. Written as text: "outliers:4" (the default), "all", "rownorm", "outliers:4+rownorm".
    """

    max_norm_ratio: float = 4.0
    row_normalize: bool = False

    @classmethod
    def parse(cls, text: str) -> "TokenRule":
        ratio, rownorm = 0.0, False
        for part in text.replace(" ", "").split("+"):
            if part == "all":
                continue
            if part == "rownorm":
                rownorm = True
            elif part.startswith("outliers:"):
                try:
                    ratio = float(part.split(":", 1)[1])
                except ValueError:
                    ratio = -1.0
                if not ratio > 1.0:
                    raise ConfigError(f"token rule {text!r}: outliers:C needs a number C > 1 (x the median norm)")
            else:
                raise ConfigError(f"unknown token rule {text!r}: use all, outliers:C (e.g. outliers:4), rownorm, "
                                  f"or outliers:C+rownorm")
        return cls(ratio, rownorm)

    def __str__(self) -> str:
        parts = ([f"outliers:{self.max_norm_ratio:g}"] if self.max_norm_ratio else []) + \
            (["rownorm"] if self.row_normalize else [])
        return "+".join(parts) or "all"

    def select(self, teacher: Tensor, mask: Tensor | None = None) -> tuple[Tensor | None, int]:
        """(mask of the rows to compare, number of valid rows left out). When nothing is left out the mask comes
        back as given, so spike-free inputs are computed exactly as without the rule."""
        if not self.max_norm_ratio:
            return mask, 0
        valid = teacher.new_ones(teacher.shape[:-1], dtype=torch.bool) if mask is None else mask.bool()
        if valid.shape != teacher.shape[:-1]:
            raise ValueError(f"mask of shape {tuple(valid.shape)} does not match features of shape "
                             f"{tuple(teacher.shape)}")
        if not bool(valid.any()):
            return mask, 0
        keep = valid & (centred_norm_ratios(teacher.detach(), valid) <= self.max_norm_ratio)
        dropped = int(valid.sum() - keep.sum())
        return (mask, 0) if dropped == 0 else (keep, dropped)


def centred_norm_ratios(rows: Tensor, mask: Tensor) -> Tensor:
    """Each row's norm after subtracting the valid rows' mean, over the median of those norms (float32, the shape
    of `mask`; 0 at invalid rows).

    Centred as the distances centre rows before comparing them, so a row's weight in them is its centred norm: a
    massive channel that every token carries (Gemma 3's channel 163, ~2e4 at layer 15) inflates every raw norm
    alike and hides a massive first token (4.5x the median raw norm there, 10.5x centred). A massive row moves
    the mean by 1/n of itself, which at a micro-batch's hundreds of rows changes no decision. BENCHMARKS.md ("The
    token rule on two families") has the measurements behind the rule.
    """
    rows = rows.float()
    norms = torch.linalg.vector_norm(rows - rows[mask].mean(dim=0), dim=-1)
    scale = norms[mask].median()
    if not scale > 0:  # most rows equal (one valid row, a constant input): no row stands out from the rest
        return torch.zeros_like(norms)
    return torch.where(mask, norms / scale, torch.zeros_like(norms))


DEFAULT_TOKEN_RULE = TokenRule()
ALL_TOKENS = TokenRule(0.0)


def normalize_features(x: Tensor, mask: Tensor | None = None, row_normalize: bool = False) -> Tensor:
    """Valid rows in float64, centered and scaled to unit Frobenius norm (a zero matrix stays zero); with
    `row_normalize` every row is first scaled to unit norm."""
    r = select_tokens(x, mask).to(MATH_DTYPE)
    if r.shape[0] == 0:
        raise ValueError("no valid tokens: the mask selects nothing")
    if row_normalize:
        r = r / torch.linalg.vector_norm(r, dim=1, keepdim=True).clamp_min(_EPS)
    r = r - r.mean(dim=0, keepdim=True)
    norm = torch.linalg.vector_norm(r)
    return r / norm.clamp_min(_EPS)


def _result_dtype(*inputs: Tensor) -> torch.dtype:
    """What a distance returns: float64 for float64 inputs (gradcheck, references), fp32 otherwise."""
    return torch.float64 if any(x.dtype == torch.float64 for x in inputs) else torch.float32


def _pair(student: Tensor, teacher: Tensor, mask: Tensor | None, rule: TokenRule) -> tuple[Tensor, Tensor]:
    mask, _ = rule.select(teacher, mask)
    rs = normalize_features(student, mask, rule.row_normalize)
    rt = normalize_features(teacher.detach(), mask, rule.row_normalize)
    if rs.shape[0] != rt.shape[0]:
        raise ValueError(f"student has {rs.shape[0]} valid tokens, teacher {rt.shape[0]}: they must be the same tokens")
    return rs, rt


def _finish(sq: Tensor, squared: bool, dtype: torch.dtype = torch.float32) -> Tensor:
    sq = sq.clamp_min(0.0)
    return (sq if squared else sq.sqrt()).to(dtype)


# ---------------------------------------------------------------------------------------------------------------
# Distances
# ---------------------------------------------------------------------------------------------------------------
def procrustes_distance(
    student: Tensor,
    teacher: Tensor,
    mask: Tensor | None = None,
    squared: bool = True,
    method: NuclearMethod = "auto",
    rule: TokenRule = DEFAULT_TOKEN_RULE,
) -> Tensor:
    """Orthogonal Procrustes distance D_P (squared by default) between centered, unit-norm features."""
    rs, rt = _pair(student, teacher, mask, rule)
    return _finish(2.0 - 2.0 * nuclear_norm(rs.T @ rt, method), squared, _result_dtype(student, teacher))


def _gram_sq_norms(rs: Tensor, rt: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(||R_s^T R_s||^2, ||R_t^T R_t||^2, ||R_s^T R_t||^2), through d x d or n x n products, whichever is cheaper."""
    n, ds = rs.shape
    dt = rt.shape[1]
    if n * n * (ds + dt) < n * (ds * ds + dt * dt + ds * dt):
        ks, kt = rs @ rs.T, rt @ rt.T
        return (ks * ks).sum(), (kt * kt).sum(), (ks * kt).sum()
    ss, tt, st = rs.T @ rs, rt.T @ rt, rs.T @ rt
    return (ss * ss).sum(), (tt * tt).sum(), (st * st).sum()


def feature_gram_distance(
    student: Tensor, teacher: Tensor, mask: Tensor | None = None, squared: bool = True,
    rule: TokenRule = DEFAULT_TOKEN_RULE,
) -> Tensor:
    """Feature Gram matrix distance D_FG = ||R_t R_t^T - R_s R_s^T||_F (squared by default), never forming n x n
    matrices when the feature widths are the smaller side."""
    rs, rt = _pair(student, teacher, mask, rule)
    ss, tt, st = _gram_sq_norms(rs, rt)
    return _finish(tt + ss - 2.0 * st, squared, _result_dtype(student, teacher))


def cka_distance(student: Tensor, teacher: Tensor, mask: Tensor | None = None, squared: bool = True,
                 rule: TokenRule = DEFAULT_TOKEN_RULE) -> Tensor:
    """Linear CKA distance 1 - CKA (the CKA baseline's training objective and its reported value alike).

    1 - CKA is not a squared quantity, so `squared` changes nothing; it is accepted so that every feature
    distance can be called the same way."""
    rs, rt = _pair(student, teacher, mask, rule)
    ss, tt, st = _gram_sq_norms(rs, rt)
    cka = st / (ss * tt).clamp_min(_EPS**2).sqrt()  # clamp inside the sqrt: finite gradient at 0
    return (1.0 - cka).clamp_min(0.0).to(_result_dtype(student, teacher))


def procrustes_floor(teacher: Tensor, student_width: int, mask: Tensor | None = None, squared: bool = True,
                     rule: TokenRule = DEFAULT_TOKEN_RULE) -> Tensor:
    """Smallest D_P any student of width `student_width` can reach against these teacher features.

    With e the teacher's spectral energy beyond rank d_s (normalized features), the best unit-norm rank-d_s
    student has ||R_s^T R_t||_* = sqrt(1 - e) (von Neumann's trace inequality, attained by the truncated SVD),
    so D_P^2 >= 2 - 2 sqrt(1 - e). A floor well above 0 says the student is too narrow for that layer.
    """
    mask, _ = rule.select(teacher, mask)
    rt = normalize_features(teacher.detach(), mask, rule.row_normalize)
    s2 = torch.linalg.svdvals(rt) ** 2
    dropped = s2[student_width:].sum().clamp(0.0, 1.0)
    return _finish(2.0 - 2.0 * (1.0 - dropped).sqrt(), squared)


class ProjectionMSE(nn.Module):
    """Projection-MSE baseline: ||R_s W - R_t||_F^2 with a learned W (d_s x d_t), on centered unit-norm features.

    The normalization puts it on the same scale as D_P^2 (both in [0, 4]) so one weight `b` means the same
    thing for every feature loss. W starts as a scaled random projection.
    """

    def __init__(self, d_student: int, d_teacher: int):
        super().__init__()
        self.proj = nn.Linear(d_student, d_teacher, bias=False)
        nn.init.normal_(self.proj.weight, std=1.0 / math.sqrt(d_student))

    def forward(self, student: Tensor, teacher: Tensor, mask: Tensor | None = None, squared: bool = True,
                rule: TokenRule = DEFAULT_TOKEN_RULE) -> Tensor:
        rs, rt = _pair(student, teacher, mask, rule)
        # W in the math dtype too (its gradient flows back to the stored weight, whatever its dtype).
        diff = nn.functional.linear(rs, self.proj.weight.to(rs.dtype)) - rt
        return _finish((diff * diff).sum(), squared, _result_dtype(student, teacher))


def logit_kd(
    student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, temperature: float = 1.0
) -> Tensor:
    """Forward KL(teacher || student) at temperature T, mean over the valid tokens, scaled by T^2 so its
    gradient magnitude does not shrink with T. Logits are `[..., vocab]`; the mask selects tokens."""
    s = select_tokens(student_logits, mask)
    t = select_tokens(teacher_logits.detach(), mask)
    s = (s if s.dtype == torch.float64 else s.float()) / temperature
    t = (t if t.dtype == torch.float64 else t.float()) / temperature
    if s.shape != t.shape:
        raise ValueError(f"student logits {tuple(s.shape)} and teacher logits {tuple(t.shape)} differ in shape")
    if s.shape[0] == 0:
        raise ValueError("no valid tokens: the mask selects nothing")
    log_ps = torch.log_softmax(s, dim=-1)
    log_pt = torch.log_softmax(t, dim=-1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    return kl.mean() * temperature**2


# ---------------------------------------------------------------------------------------------------------------
# The one registry of feature losses: train, synthetic, demo and every config check read it
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FeatureLoss:
    """A feature distance called the same way for every loss: `loss(student, teacher, mask, params, squared, rule)`.

    `params` is the loss's trainable part for one layer pair (projection MSE's W), made by `make_params` and
    owned by whoever optimizes it (the training objective, the synthetic experiment); None for the others.
    """

    name: str
    distance: Callable[..., Tensor] | None = None
    learned: bool = False

    def make_params(self, d_student: int, d_teacher: int) -> nn.Module | None:
        return ProjectionMSE(d_student, d_teacher) if self.learned else None

    def __call__(self, student: Tensor, teacher: Tensor, mask: Tensor | None = None,
                 params: nn.Module | None = None, squared: bool = True, rule: TokenRule = DEFAULT_TOKEN_RULE
                 ) -> Tensor:
        if self.learned:
            if params is None:
                raise ValueError(f"feature loss {self.name!r} needs its parameters (make_params)")
            return params(student, teacher, mask, squared, rule)
        return self.distance(student, teacher, mask, squared, rule=rule)


def pkd_distance(student: Tensor, teacher: Tensor, mask: Tensor | None = None, squared: bool = True,
                 rule: TokenRule = DEFAULT_TOKEN_RULE) -> Tensor:
    """Patient KD's loss (Sun et al., 2019): the mean squared distance between L2-normalised student and teacher
    rows of the same width; an encoder's objective gives it each example's [CLS] row. No centering, no rule."""
    if student.shape[-1] != teacher.shape[-1]:
        raise ConfigError(f"pkd compares rows of the same width: the student's are {student.shape[-1]} wide, the "
                          f"teacher's {teacher.shape[-1]} (a layer-cut student has the teacher's width; use "
                          f"procrustes, fg, cka or proj_mse across widths)")
    s, t = select_tokens(student, mask).float(), select_tokens(teacher, mask).float()
    d = (F.normalize(s, dim=-1) - F.normalize(t, dim=-1)).square().sum(-1).mean()
    return d if squared else d.clamp_min(0).sqrt()


FEATURE_LOSSES: dict[str, FeatureLoss] = {
    "procrustes": FeatureLoss("procrustes", procrustes_distance),
    "fg": FeatureLoss("fg", feature_gram_distance),
    "cka": FeatureLoss("cka", cka_distance),
    "proj_mse": FeatureLoss("proj_mse", learned=True),
}
# Losses of one width only, for classification tasks (the paper's BERT baseline): not in FEATURE_LOSSES, whose
# losses compare any two widths (the synthetic experiment and the demo run each of them).
CLASSIFIER_LOSSES: dict[str, FeatureLoss] = {"pkd": FeatureLoss("pkd", pkd_distance)}


def feature_loss(name: str) -> FeatureLoss:
    """The registered loss called `name`, or a ConfigError listing the choices."""
    losses = {**FEATURE_LOSSES, **CLASSIFIER_LOSSES}
    if name not in losses:
        raise ConfigError(f"unknown feature loss {name!r}; choose one of {', '.join(losses)}")
    return losses[name]
