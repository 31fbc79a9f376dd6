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

The nuclear norm avoids `torch.linalg.svdvals` (slow on GPUs, and its backward is unstable for repeated
singular values): its value and its gradient, the polar factor of `M = R_s^T R_t`, come from one eigh of the
smaller Gram `M M^T` (the default on every device), or from a Newton-Schulz polar iteration (matmuls only) run
until it converges.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import Tensor, nn

from pipeline.errors import ConfigError

NuclearMethod = Literal["auto", "eigh", "newton_schulz", "svd"]
_EPS = 1e-12
MATH_DTYPE = torch.float64
NEWTON_SCHULZ_MAX_STEPS = 100
# Smallest / largest eigenvalue of M M^T below which eigh's polar factor goes wrong: measured on SmolLM2's layer
# 20 against a close student, a ratio of 5e-10 gave a 22% gradient error; 1e-6 keeps eigh to well-conditioned M.
_EIGH_RANGE = 1e-6


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


def normalize_features(x: Tensor, mask: Tensor | None = None) -> Tensor:
    """Valid rows in float64, centered and scaled to unit Frobenius norm (a zero matrix stays zero)."""
    r = select_tokens(x, mask).to(MATH_DTYPE)
    if r.shape[0] == 0:
        raise ValueError("no valid tokens: the mask selects nothing")
    r = r - r.mean(dim=0, keepdim=True)
    norm = torch.linalg.vector_norm(r)
    return r / norm.clamp_min(_EPS)


def _result_dtype(*inputs: Tensor) -> torch.dtype:
    """What a distance returns: float64 for float64 inputs (gradcheck, references), fp32 otherwise."""
    return torch.float64 if any(x.dtype == torch.float64 for x in inputs) else torch.float32


def _pair(student: Tensor, teacher: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    rs = normalize_features(student, mask)
    rt = normalize_features(teacher.detach(), mask)
    if rs.shape[0] != rt.shape[0]:
        raise ValueError(f"student has {rs.shape[0]} valid tokens, teacher {rt.shape[0]}: they must be the same tokens")
    return rs, rt


def _finish(sq: Tensor, squared: bool, dtype: torch.dtype = torch.float32) -> Tensor:
    sq = sq.clamp_min(0.0)
    return (sq if squared else sq.sqrt()).to(dtype)


# ---------------------------------------------------------------------------------------------------------------
# Nuclear norm with the polar factor as its gradient
# ---------------------------------------------------------------------------------------------------------------
def _nuclear_eigh(m: Tensor) -> tuple[Tensor, Tensor]:
    """||M||_* and the polar factor of M from eigh of the smaller Gram, in float64.

    float64 because sqrt(eigenvalue) of a squared-condition Gram loses half the digits: in fp32 the small
    singular values (most of them, for features) would be wrong by ~sqrt(eps) * sigma_max each.
    """
    wide = m.shape[0] <= m.shape[1]
    a = (m if wide else m.T).double()
    evals, evecs = torch.linalg.eigh(a @ a.T)
    # The Gram squares the condition number, so small singular values keep few correct digits. A real teacher's
    # massive-activation token puts most of M in one direction, and a close student's distance and gradient are
    # then made of exactly those small values (SmolLM2-135M layer 20: a near-identical student's value 37x off,
    # a top-64-PCA student's gradient 22% off). There the SVD of M itself is exact; elsewhere the cheaper eigh.
    if evals.min() < evals.max() * _EIGH_RANGE:
        value, polar = _nuclear_svd(m.double())
        return value.to(m.dtype), polar.to(m.dtype)
    evals = evals.clamp_min(0.0)
    # Eigenvalues below the round-off of the largest are zero singular values: they add nothing to the value
    # (their square roots would add ~sqrt(eps) each) and get no gradient (a valid subgradient there).
    tol = evals.max().clamp_min(1e-300) * (a.shape[0] * torch.finfo(torch.float64).eps)
    kept = evals > tol
    sing = torch.where(kept, evals.sqrt(), torch.zeros_like(evals))
    nuc = sing.sum()
    inv_sqrt = torch.where(kept, 1.0 / sing.clamp_min(1e-300), torch.zeros_like(sing))
    polar = (evecs * inv_sqrt) @ (evecs.T @ a)
    polar = polar if wide else polar.T
    return nuc.to(m.dtype), polar.to(m.dtype)


def _nuclear_newton_schulz(m: Tensor, max_steps: int = NEWTON_SCHULZ_MAX_STEPS) -> tuple[Tensor, Tensor]:
    """Polar factor by the cubic Newton-Schulz iteration X <- 1.5 X - 0.5 X X^T X (matmuls only), run until it
    stops moving.

    Scaling by the Frobenius norm puts every singular value in (0, 1], inside the iteration's (0, sqrt 3)
    basin. A small singular value s grows by ~1.5x a step, so a fixed step count leaves the small ones of an
    anisotropic M unconverged (30 steps: D_P^2 8.7% too high on LM-like features). Here the iteration stops
    when a step moves X by less than 1e-10 x sqrt(rank) (Frobenius), which only singular values below that
    size survive, or after `max_steps`. ||M||_* = <polar, M> is read off the iterate.
    """
    wide = m.shape[0] <= m.shape[1]
    x = (m if wide else m.T).to(MATH_DTYPE)
    x = x / torch.linalg.matrix_norm(x).clamp_min(_EPS)
    tol = 1e-10 * math.sqrt(min(x.shape))
    for _ in range(max_steps):
        step = 0.5 * (x - (x @ x.T) @ x)
        x = x + step
        if torch.linalg.matrix_norm(step) < tol:
            break
    polar = (x if wide else x.T).to(m.dtype)
    return (polar * m).sum(), polar


def _nuclear_svd(m: Tensor) -> tuple[Tensor, Tensor]:
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return s.sum(), u @ vh


class _NuclearNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, m: Tensor, method: str) -> Tensor:  # type: ignore[override]
        if method == "eigh":
            value, polar = _nuclear_eigh(m)
        elif method == "newton_schulz":
            value, polar = _nuclear_newton_schulz(m)
        else:
            value, polar = _nuclear_svd(m)
        ctx.save_for_backward(polar)
        return value

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (polar,) = ctx.saved_tensors
        return grad * polar, None


def nuclear_norm(m: Tensor, method: NuclearMethod = "auto") -> Tensor:
    """Sum of singular values of a 2-D matrix, differentiable (gradient = polar factor U V^T).

    `auto` is float64 eigh of the smaller Gram on every device, and the float64 SVD of M itself where M's
    spectrum spans more than the Gram resolves (a real teacher's massive activations): exact either way (checked
    against a float64 SVD on SmolLM2-135M's layers 10 and 20). On an H100 eigh was no slower than a converged
    Newton-Schulz at 2048x5120 (34 vs 51+ ms); bench/gpu_suite.sh measures both.
    """
    if m.dim() != 2:
        raise ValueError(f"nuclear_norm expects a matrix, got shape {tuple(m.shape)}")
    if method == "auto":
        method = "eigh"
    if method not in ("eigh", "newton_schulz", "svd"):
        raise ValueError(f"unknown nuclear-norm method {method!r}: use auto, eigh, newton_schulz or svd")
    return _NuclearNorm.apply(m, method)


# ---------------------------------------------------------------------------------------------------------------
# Distances
# ---------------------------------------------------------------------------------------------------------------
def procrustes_distance(
    student: Tensor,
    teacher: Tensor,
    mask: Tensor | None = None,
    squared: bool = True,
    method: NuclearMethod = "auto",
) -> Tensor:
    """Orthogonal Procrustes distance D_P (squared by default) between centered, unit-norm features."""
    rs, rt = _pair(student, teacher, mask)
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
    student: Tensor, teacher: Tensor, mask: Tensor | None = None, squared: bool = True
) -> Tensor:
    """Feature Gram matrix distance D_FG = ||R_t R_t^T - R_s R_s^T||_F (squared by default), never forming n x n
    matrices when the feature widths are the smaller side."""
    rs, rt = _pair(student, teacher, mask)
    ss, tt, st = _gram_sq_norms(rs, rt)
    return _finish(tt + ss - 2.0 * st, squared, _result_dtype(student, teacher))


def cka_distance(student: Tensor, teacher: Tensor, mask: Tensor | None = None, squared: bool = True) -> Tensor:
    """Linear CKA distance 1 - CKA (the CKA baseline's training objective and its reported value alike).

    1 - CKA is not a squared quantity, so `squared` changes nothing; it is accepted so that every feature
    distance can be called the same way."""
    rs, rt = _pair(student, teacher, mask)
    ss, tt, st = _gram_sq_norms(rs, rt)
    cka = st / (ss * tt).clamp_min(_EPS**2).sqrt()  # clamp inside the sqrt: finite gradient at 0
    return (1.0 - cka).clamp_min(0.0).to(_result_dtype(student, teacher))


def procrustes_floor(teacher: Tensor, student_width: int, mask: Tensor | None = None, squared: bool = True) -> Tensor:
    """Smallest D_P any student of width `student_width` can reach against these teacher features.

    With e the teacher's spectral energy beyond rank d_s (normalized features), the best unit-norm rank-d_s
    student has ||R_s^T R_t||_* = sqrt(1 - e) (von Neumann's trace inequality, attained by the truncated SVD),
    so D_P^2 >= 2 - 2 sqrt(1 - e). A floor well above 0 says the student is too narrow for that layer.
    """
    rt = normalize_features(teacher.detach(), mask)
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

    def forward(self, student: Tensor, teacher: Tensor, mask: Tensor | None = None, squared: bool = True) -> Tensor:
        rs, rt = _pair(student, teacher, mask)
        # W in the math dtype too (its gradient flows back to the stored weight, whatever its dtype).
        diff = nn.functional.linear(rs, self.proj.weight.to(rs.dtype)) - rt
        return _finish((diff * diff).sum(), squared, _result_dtype(student, teacher))


def projection_mse(
    student: Tensor, teacher: Tensor, projection: ProjectionMSE, mask: Tensor | None = None, squared: bool = True
) -> Tensor:
    """Functional form of the projection-MSE baseline with a given `ProjectionMSE` module."""
    return projection(student, teacher, mask, squared)


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
    """A feature distance called the same way for every loss: `loss(student, teacher, mask, params, squared)`.

    `params` is the loss's trainable part for one layer pair (projection MSE's W), made by `make_params` and
    owned by whoever optimizes it (the training objective, the synthetic experiment); None for the others.
    """

    name: str
    distance: Callable[[Tensor, Tensor, Tensor | None, bool], Tensor] | None = None
    learned: bool = False

    def make_params(self, d_student: int, d_teacher: int) -> nn.Module | None:
        return ProjectionMSE(d_student, d_teacher) if self.learned else None

    def __call__(self, student: Tensor, teacher: Tensor, mask: Tensor | None = None,
                 params: nn.Module | None = None, squared: bool = True) -> Tensor:
        if self.learned:
            if params is None:
                raise ValueError(f"feature loss {self.name!r} needs its parameters (make_params)")
            return params(student, teacher, mask, squared)
        return self.distance(student, teacher, mask, squared)


FEATURE_LOSSES: dict[str, FeatureLoss] = {
    "procrustes": FeatureLoss("procrustes", procrustes_distance),
    "fg": FeatureLoss("fg", feature_gram_distance),
    "cka": FeatureLoss("cka", cka_distance),
    "proj_mse": FeatureLoss("proj_mse", learned=True),
}


def feature_loss(name: str) -> FeatureLoss:
    """The registered loss called `name`, or a ConfigError listing the choices."""
    if name not in FEATURE_LOSSES:
        raise ConfigError(f"unknown feature loss {name!r}; choose one of {', '.join(FEATURE_LOSSES)}")
    return FEATURE_LOSSES[name]
