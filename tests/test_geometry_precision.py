"""Every feature distance, value and gradient, against an independent float64 SVD reference on LM-like features.

Real teachers are anisotropic (a few directions hold most of the energy; one token's massive activation can hold
99% of a layer's variance) and a micro-batch has thousands of tokens: exactly where fp32 products and a fixed
Newton-Schulz step count went wrong. The reference is written here from the definitions (SVD of the normalized
features' cross product in float64) and shares no code with pipeline/geometry/__init__.py.
"""
from __future__ import annotations

import pytest
import torch

from pipeline.geometry import (
    ALL_TOKENS, ProjectionMSE, cka_distance, feature_gram_distance, normalize_features, procrustes_distance,
)

N, D_S, D_T = 3000, 48, 160
TOL = 1e-4  # relative, on the value and on the gradient's Frobenius norm


def reference_normalize(x: torch.Tensor) -> torch.Tensor:
    r = x.double()
    r = r - r.mean(0, keepdim=True)
    return r / r.norm()


def reference(name: str, student: torch.Tensor, teacher: torch.Tensor, proj_weight: torch.Tensor | None = None
              ) -> tuple[float, torch.Tensor]:
    """(value, d value / d student) in float64 from textbook formulas."""
    s = student.detach().double().requires_grad_(True)
    rs, rt = reference_normalize(s), reference_normalize(teacher)
    if name == "procrustes":
        value = 2 - 2 * torch.linalg.svdvals(rs.T @ rt).sum()
    elif name == "fg":
        value = (rt.T @ rt).square().sum() + (rs.T @ rs).square().sum() - 2 * (rs.T @ rt).square().sum()
    elif name == "cka":
        value = 1 - (rs.T @ rt).square().sum() / ((rs.T @ rs).norm() * (rt.T @ rt).norm())
    else:  # proj_mse with the given W
        value = (rs @ proj_weight.double().T - rt).square().sum()
    value.backward()
    return float(value.detach()), s.grad


def spectrum_features(n: int, d: int, energy: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """n rows whose centred covariance has the given per-direction energies, in a random basis."""
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    z = torch.randn(n, d, generator=gen, dtype=torch.float64)
    return (z * energy.sqrt()) @ q.T


def case(kind: str, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(student [N, D_S], teacher [N, D_T]) of an LM-like regime."""
    if kind == "few_directions":  # 4 directions hold ~95% of the energy, a power-law tail the rest
        energy = torch.cat([torch.tensor([40.0, 20.0, 10.0, 5.0]), torch.arange(1, D_T - 3) ** -1.5])
        teacher = spectrum_features(N, D_T, energy.double(), gen)
    elif kind == "long_tail":  # energies decaying over 6 orders of magnitude
        teacher = spectrum_features(N, D_T, torch.logspace(0, -6, D_T, dtype=torch.float64), gen)
    elif kind == "steep_tail":  # over 10: singular values of R_s^T R_t far below 1.5^-30 of the largest
        teacher = spectrum_features(N, D_T, torch.logspace(0, -10, D_T, dtype=torch.float64), gen)
    elif kind == "massive_row":  # the first token 100x the others: it owns most of the centred energy
        teacher = torch.randn(N, D_T, generator=gen, dtype=torch.float64)
        teacher[0] *= 100.0
    else:
        raise ValueError(kind)
    mix = torch.randn(D_T, D_S, generator=gen, dtype=torch.float64) / D_T**0.5
    student = teacher @ mix + 0.3 * torch.randn(N, D_S, generator=gen, dtype=torch.float64)
    return student, teacher


def ours(name: str, method: str, student: torch.Tensor, teacher: torch.Tensor, proj: ProjectionMSE | None
         ) -> tuple[float, torch.Tensor]:
    # Over every row, as the reference: the math must be exact even where one row owns the energy (the default
    # token rule would leave that row out; tests/test_geometry.py checks the rule).
    s = student.detach().clone().requires_grad_(True)
    if name == "procrustes":
        value = procrustes_distance(s, teacher, method=method, rule=ALL_TOKENS)
    elif name == "fg":
        value = feature_gram_distance(s, teacher, rule=ALL_TOKENS)
    elif name == "cka":
        value = cka_distance(s, teacher, rule=ALL_TOKENS)
    else:
        value = proj(s, teacher, rule=ALL_TOKENS)
    value.backward()
    return float(value.detach()), s.grad.double()


LOSSES = [("procrustes", "auto"), ("procrustes", "eigh"), ("procrustes", "newton_schulz"), ("procrustes", "svd"),
          ("fg", "-"), ("cka", "-"), ("proj_mse", "-")]


@pytest.mark.parametrize("kind", ["few_directions", "long_tail", "steep_tail", "massive_row"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name,method", LOSSES, ids=[f"{n}-{m}" for n, m in LOSSES])
def test_value_and_gradient_match_float64_svd(kind, dtype, name, method):
    g = torch.Generator().manual_seed(hash(kind) % 1000)
    student, teacher = (x.to(dtype) for x in case(kind, g))
    proj = ProjectionMSE(D_S, D_T) if name == "proj_mse" else None
    # The reference sees exactly the rounded inputs the loss sees.
    ref_value, ref_grad = reference(name, student, teacher, proj.proj.weight.detach() if proj else None)
    value, grad = ours(name, method, student, teacher, proj)
    assert value == pytest.approx(ref_value, rel=TOL)
    # A gradient comes back in its input's dtype: for bf16 inputs it is exact up to bf16's own rounding.
    grad_tol = TOL if dtype == torch.float32 else torch.finfo(torch.bfloat16).eps
    assert float((grad - ref_grad).norm() / ref_grad.norm()) < grad_tol


def test_near_identical_features_keep_a_small_positive_distance_and_its_gradient():
    """Where fp32 products gave a negative D_P^2, clamped to 0 with an exactly zero gradient."""
    g = torch.Generator().manual_seed(7)
    teacher = spectrum_features(N, D_S, torch.logspace(0, -3, D_S, dtype=torch.float64), g)
    q, _ = torch.linalg.qr(torch.randn(D_S, D_S, generator=g, dtype=torch.float64))
    student = (teacher @ q + 1e-4 * torch.randn(N, D_S, generator=g, dtype=torch.float64)).float()
    for name in ("procrustes", "fg"):
        ref_value, ref_grad = reference(name, student, teacher.float())
        value, grad = ours(name, "auto", student, teacher.float(), None)
        assert 0 < ref_value < 1e-6
        assert value == pytest.approx(ref_value, rel=TOL)
        assert float((grad - ref_grad).norm() / ref_grad.norm()) < TOL


def test_unit_norm_scaling_is_exact_at_micro_batch_size():
    """The scale every distance rests on: fp32 CPU norms were 6.5e-4 off at 8192 x 2048."""
    x = torch.randn(8192, 2048, generator=torch.Generator().manual_seed(0)) * 3.0 + 1.0
    r = normalize_features(x)
    assert float(r.square().sum()) == pytest.approx(1.0, abs=1e-12)
    assert float((r.sum(0)).abs().max()) < 1e-12


@pytest.mark.parametrize("method", ["auto", "eigh", "newton_schulz"])
def test_a_student_close_to_a_steep_teacher_is_exact_for_every_nuclear_method(method):
    """A well-trained student (D_P^2 ~ 1e-2) of a teacher with a k^-2 spectrum at width 256: R_s^T R_t has
    singular values far below 1.5^-30 of its largest, where 30 fixed Newton-Schulz steps were 6e-4 off."""
    g = torch.Generator().manual_seed(11)
    d = 256
    teacher = spectrum_features(2048, d, torch.arange(1, d + 1, dtype=torch.float64) ** -2.0, g)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    student = (teacher @ q + 0.01 * torch.randn(2048, d, generator=g, dtype=torch.float64)).float()
    ref_value, ref_grad = reference("procrustes", student, teacher.float())
    value, grad = ours("procrustes", method, student, teacher.float(), None)
    assert 1e-3 < ref_value < 1e-1
    assert value == pytest.approx(ref_value, rel=TOL)
    assert float((grad - ref_grad).norm() / ref_grad.norm()) < TOL


@pytest.mark.parametrize("student_kind", ["top_k_pca", "near_identical"])
def test_a_massive_activation_teacher_with_a_close_student_is_exact(student_kind):
    """The regime a real teacher is in (SmolLM2-135M layer 20: one token 100x the median norm holds 99% of the
    energy): M = R_s^T R_t spans ten orders of magnitude, where eigh of the Gram lost the value (37x) or the
    gradient (22%). Procrustes must stay exact there."""
    g = torch.Generator().manual_seed(5)
    d = 192
    teacher = spectrum_features(1500, d, torch.arange(1, d + 1, dtype=torch.float64) ** -2.0, g)
    teacher[0] *= 1000.0  # pure eigh: the top-48 student's gradient 21% off
    centred = teacher - teacher.mean(0)
    u, s, _ = torch.linalg.svd(centred, full_matrices=False)
    if student_kind == "top_k_pca":
        student = (u[:, :48] * s[:48]).float()
    else:
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        student = (teacher @ q + 1e-3 * teacher.std() * torch.randn(teacher.shape, generator=g,
                                                                    dtype=torch.float64)).float()
    ref_value, ref_grad = reference("procrustes", student, teacher.float())
    value, grad = ours("procrustes", "auto", student, teacher.float(), None)
    assert value == pytest.approx(ref_value, rel=TOL)
    assert float((grad - ref_grad).norm() / ref_grad.norm()) < TOL
