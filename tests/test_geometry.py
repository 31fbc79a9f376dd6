"""Math properties of the geometry losses that a user's training objective relies on."""
import math

import pytest
import torch

from pipeline.geometry import (
    ProjectionMSE,
    cka_distance,
    feature_gram_distance,
    logit_kd,
    normalize_features,
    nuclear_norm,
    procrustes_distance,
    procrustes_floor,
)

DISTANCES = [procrustes_distance, feature_gram_distance, cka_distance]


def rand_orthogonal(d: int, gen: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=dtype))
    return q * torch.sign(torch.diagonal(r))


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- closed forms against brute force ----------------------------------------------------------------------------
def brute_force(rs: torch.Tensor, rt: torch.Tensor) -> dict[str, float]:
    """Textbook definitions on n x n Grams and an explicit optimal rotation, in float64."""
    rs, rt = rs.double(), rt.double()
    ks, kt = rs @ rs.T, rt @ rt.T
    fg = ((kt - ks) ** 2).sum()
    # Optimal Q for min ||R_t - R_s Q||: pad R_s to R_t's width, Q = polar factor of R_s^T R_t.
    pad = torch.zeros(rs.shape[0], rt.shape[1] - rs.shape[1], dtype=rs.dtype)
    rs_wide = torch.cat([rs, pad], dim=1)
    u, _, vh = torch.linalg.svd(rs_wide.T @ rt)
    p = ((rt - rs_wide @ (u @ vh)) ** 2).sum()
    h = torch.eye(rs.shape[0], dtype=rs.dtype) - 1.0 / rs.shape[0]
    hsic = lambda a, b: torch.trace(a @ h @ b @ h)  # noqa: E731
    cka = hsic(ks, kt) / torch.sqrt(hsic(ks, ks) * hsic(kt, kt))
    return {"procrustes": p.item(), "fg": fg.item(), "cka": 1.0 - cka.item()}


@pytest.mark.parametrize("n,ds,dt", [(64, 8, 24), (20, 16, 48), (200, 32, 32)])
def test_closed_forms_equal_brute_force(n, ds, dt):
    g = gen(n)
    s, t = torch.randn(n, ds, generator=g), torch.randn(n, dt, generator=g)
    ref = brute_force(normalize_features(s), normalize_features(t))
    assert procrustes_distance(s, t).item() == pytest.approx(ref["procrustes"], abs=2e-6)
    assert feature_gram_distance(s, t).item() == pytest.approx(ref["fg"], abs=2e-6)
    assert cka_distance(s, t).item() == pytest.approx(ref["cka"], abs=2e-6)
    assert procrustes_distance(s, t, squared=False).item() == pytest.approx(math.sqrt(ref["procrustes"]), abs=2e-6)
    assert feature_gram_distance(s, t, squared=False).item() == pytest.approx(math.sqrt(ref["fg"]), abs=2e-5)


def test_fg_uses_both_product_orders_consistently():
    # n < d takes the n x n route, n > d the d x d route: the same matrices through both give the same value.
    g = gen(1)
    s, t = torch.randn(12, 40, generator=g), torch.randn(12, 60, generator=g)
    ref = brute_force(normalize_features(s), normalize_features(t))
    assert feature_gram_distance(s, t).item() == pytest.approx(ref["fg"], abs=1e-6)


# --- the nuclear norm without svdvals -----------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["eigh", "newton_schulz"])
@pytest.mark.parametrize("shape", [(24, 64), (64, 24), (48, 48)])
def test_nuclear_norm_and_gradient_match_float64_svd(method, shape):
    g = gen(2)
    # A feature-like spectrum: a few large singular values and a long decaying tail.
    u = rand_orthogonal(shape[0], g)[:, : min(shape)]
    v = rand_orthogonal(shape[1], g)[:, : min(shape)]
    sing = torch.logspace(0, -2.5, min(shape), dtype=torch.float64)
    m64 = (u * sing) @ v.T
    m = m64.float().requires_grad_(True)
    value = nuclear_norm(m, method)
    value.backward()
    uu, ss, vvh = torch.linalg.svd(m64, full_matrices=False)
    ref_value, ref_polar = ss.sum().item(), uu @ vvh
    # Newton-Schulz runs until it converges, so both are exact up to the fp32 rounding of m.
    assert value.item() == pytest.approx(ref_value, rel=1e-5)
    assert torch.allclose(m.grad.double(), ref_polar, atol=5e-4)


def test_newton_schulz_converged_directions_match_polar_factor():
    # On a well-conditioned matrix the iteration converges fully: polar factor to fp32 precision.
    g = gen(3)
    m = torch.randn(32, 80, generator=g, dtype=torch.float64)
    m = m.float().requires_grad_(True)
    nuclear_norm(m, "newton_schulz").backward()
    u, s, vh = torch.linalg.svd(m.detach().double(), full_matrices=False)
    assert torch.allclose(m.grad.double(), u @ vh, atol=1e-4)


def test_auto_method_on_cpu_is_exact():
    g = gen(4)
    m = torch.randn(40, 90, generator=g)
    assert nuclear_norm(m).item() == pytest.approx(torch.linalg.svdvals(m.double()).sum().item(), rel=1e-6)


def test_gradcheck_float64():
    g = gen(5)
    s = torch.randn(30, 6, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(30, 9, generator=g, dtype=torch.float64)
    for method in ("eigh", "svd"):
        assert torch.autograd.gradcheck(lambda x: procrustes_distance(x, t, method=method), (s,))
    assert torch.autograd.gradcheck(lambda x: feature_gram_distance(x, t), (s,))
    assert torch.autograd.gradcheck(lambda x: cka_distance(x, t), (s,))
    proj = ProjectionMSE(6, 9).double()
    assert torch.autograd.gradcheck(lambda x: proj(x, t), (s,))
    m = torch.randn(5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: nuclear_norm(x, "eigh"), (m,))


# --- zero exactly when the geometry matches ------------------------------------------------------------------------
@pytest.mark.parametrize("dist", DISTANCES)
def test_zero_on_rotated_and_zero_padded_copies(dist):
    g = gen(6)
    n, d = 100, 16
    t = torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.diag(torch.linspace(3, 0.2, d, dtype=torch.float64))
    # Student: an exact copy of the teacher's geometry, rotated, in a wider space (zero-padded), rescaled.
    wide = torch.cat([t, torch.zeros(n, 8, dtype=torch.float64)], dim=1) @ rand_orthogonal(d + 8, g) * 7.0
    assert dist(wide, t).item() == pytest.approx(0.0, abs=1e-9)
    assert dist(t @ rand_orthogonal(d, g), wide).item() == pytest.approx(0.0, abs=1e-9)


def test_procrustes_zero_exactly_when_fg_zero():
    g = gen(7)
    n, d = 80, 12
    t = torch.randn(n, d, generator=g, dtype=torch.float64)
    copy = t @ rand_orthogonal(d, g)
    for eps in (0.0, 1e-3, 1e-1, 1.0):
        s = copy + eps * torch.randn(n, d, generator=g, dtype=torch.float64)
        dp, dfg = procrustes_distance(s, t).item(), feature_gram_distance(s, t).item()
        if eps == 0.0:
            assert dp < 1e-12 and dfg < 1e-12
        else:
            assert dp > 1e-8 and dfg > 1e-8, (eps, dp, dfg)


@pytest.mark.parametrize("dist", DISTANCES)
@pytest.mark.parametrize("side", ["student", "teacher"])
def test_invariant_to_orthogonal_transform_of_either_side(dist, side):
    g = gen(8)
    s, t = torch.randn(60, 10, generator=g), torch.randn(60, 20, generator=g)
    before = dist(s, t).item()
    if side == "student":
        after = dist(s @ rand_orthogonal(10, g, torch.float32), t).item()
    else:
        after = dist(s, t @ rand_orthogonal(20, g, torch.float32)).item()
    assert after == pytest.approx(before, abs=1e-5)


def test_cka_cannot_tell_apart_configurations_that_procrustes_and_fg_separate():
    """The paper's Theorem 1 setting: n vectors in two antiparallel groups (+u and -u); some are perturbed along
    distinct orthogonal directions. The student is an exact copy of the unperturbed configuration in one
    dimension. Teacher A perturbs one vector by 0.6; teacher B perturbs four vectors (two per group) by the eps
    that gives exactly A's CKA. CKA scores A and B identically against the student; their geometry differs, and
    D_P and D_FG say so."""
    n, d_t = 16, 8
    signs = torch.tensor([1.0] * (n // 2) + [-1.0] * (n // 2), dtype=torch.float64)
    student = signs[:, None]

    def teacher(rows: list[int], eps: float) -> torch.Tensor:
        t = torch.zeros(n, d_t, dtype=torch.float64)
        t[:, 0] = signs
        for j, row in enumerate(rows):
            t[row, 1 + j] = eps
        return t

    a = teacher([0], 0.6)
    target = cka_distance(student, a).item()
    lo, hi = 0.0, 0.6  # 1 - CKA grows with eps: bisect for B's eps
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cka_distance(student, teacher([0, 1, 8, 9], mid)).item() < target else (lo, mid)
    b = teacher([0, 1, 8, 9], lo)
    assert target > 1e-4  # CKA does see that both differ from the student ...
    assert cka_distance(student, b).item() == pytest.approx(target, rel=1e-9)  # ... but not from each other
    assert feature_gram_distance(a, b, squared=False).item() > 1e-2  # A and B really have different geometry
    for dist in (procrustes_distance, feature_gram_distance):
        da, db = dist(student, a, squared=False).item(), dist(student, b, squared=False).item()
        assert abs(da - db) > 0.2 * max(da, db), (dist.__name__, da, db)


def test_projection_mse_reaches_zero_without_matching_geometry():
    g = gen(9)
    n, ds, dt = 200, 8, 16
    s = torch.randn(n, ds, generator=g)
    a = torch.randn(ds, dt, generator=g) @ torch.diag(torch.linspace(4, 0.1, dt))  # far from orthogonal
    t = s @ a
    proj = ProjectionMSE(ds, dt)
    rs, rt = normalize_features(s), normalize_features(t)
    with torch.no_grad():
        proj.proj.weight.copy_(torch.linalg.lstsq(rs, rt).solution.T)
    assert proj(s, t).item() < 1e-8
    assert feature_gram_distance(s, t).item() > 0.05
    assert procrustes_distance(s, t).item() > 0.05


# --- robustness ------------------------------------------------------------------------------------------------
def _finite_loss_and_grad(s, t):
    for f in (procrustes_distance, feature_gram_distance, cka_distance):
        x = s.clone().requires_grad_(True)
        loss = f(x, t)
        loss.backward()
        assert torch.isfinite(loss), f.__name__
        assert torch.isfinite(x.grad).all(), f.__name__
    x = s.clone().float().requires_grad_(True)
    loss = ProjectionMSE(s.shape[1], t.shape[1])(x, t)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


@pytest.mark.parametrize(
    "case", ["rank_deficient", "repeated_singular_values", "identical_rows", "single_row", "bf16", "zeros"]
)
def test_no_nan_or_inf_on_degenerate_inputs(case):
    g = gen(10)
    n, ds, dt = 40, 8, 16
    s, t = torch.randn(n, ds, generator=g), torch.randn(n, dt, generator=g)
    if case == "rank_deficient":
        s = torch.randn(n, 2, generator=g) @ torch.randn(2, ds, generator=g)
        t = torch.randn(n, 3, generator=g) @ torch.randn(3, dt, generator=g)
    elif case == "repeated_singular_values":
        s = rand_orthogonal(n, g, torch.float32)[:, :ds] * 2.0  # all singular values equal
        t = torch.cat([s, torch.zeros(n, dt - ds)], dim=1)
    elif case == "identical_rows":
        s, t = s[:1].repeat(n, 1), t[:1].repeat(n, 1)
    elif case == "single_row":
        s, t = s[:1], t[:1]
    elif case == "bf16":
        s, t = s.bfloat16(), t.bfloat16()
    elif case == "zeros":
        s = torch.zeros(n, ds)
    _finite_loss_and_grad(s, t)


def test_half_precision_inputs_give_fp32_results_of_float64_math():
    g = gen(11)
    s, t = torch.randn(50, 8, generator=g), torch.randn(50, 16, generator=g)
    sb, tb = s.bfloat16(), t.bfloat16()
    for f in DISTANCES:
        out = f(sb, tb)
        assert out.dtype == torch.float32
        exact = f(sb.double(), tb.double())
        assert exact.dtype == torch.float64
        assert out.item() == pytest.approx(exact.item(), rel=1e-7)


def test_no_gradient_reaches_the_teacher():
    g = gen(12)
    s = torch.randn(30, 4, generator=g, requires_grad=True)
    t = torch.randn(30, 6, generator=g, requires_grad=True)
    for f in DISTANCES:
        f(s, t).backward()
    assert t.grad is None and s.grad is not None


@pytest.mark.parametrize("dist", DISTANCES)
def test_mask_excludes_padding_exactly(dist):
    g = gen(13)
    b, seq, ds, dt = 3, 7, 5, 9
    s, t = torch.randn(b, seq, ds, generator=g), torch.randn(b, seq, dt, generator=g)
    lengths = torch.tensor([7, 4, 2])
    mask = torch.arange(seq)[None, :] < lengths[:, None]
    s_pad, t_pad = s.clone(), t.clone()
    s_pad[~mask] = 1e6  # garbage in the padding must not leak in
    t_pad[~mask] = -3e5
    s_pad.requires_grad_(True)
    masked = dist(s_pad, t_pad, mask)
    rows = dist(s[mask], t[mask])
    assert masked.item() == pytest.approx(rows.item(), abs=1e-6)
    masked.backward()
    assert (s_pad.grad[~mask] == 0).all()


def test_mask_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="mask of shape"):
        procrustes_distance(torch.randn(2, 5, 4), torch.randn(2, 5, 6), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="no valid tokens"):
        feature_gram_distance(torch.randn(2, 5, 4), torch.randn(2, 5, 6), torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="same tokens"):
        cka_distance(torch.randn(5, 4), torch.randn(6, 4))


# --- the rank floor and logit KD ---------------------------------------------------------------------------------
def test_procrustes_floor_is_attained_by_the_truncated_teacher():
    g = gen(14)
    n, dt, ds = 120, 24, 6
    spectrum = torch.diag(torch.logspace(0, -1, dt, dtype=torch.float64))
    t = torch.randn(n, dt, generator=g, dtype=torch.float64) @ spectrum
    floor = procrustes_floor(t, ds).item()
    rt = normalize_features(t)
    u, sv, vh = torch.linalg.svd(rt, full_matrices=False)
    best = u[:, :ds] * sv[:ds]  # the truncated SVD, a width-ds student
    assert procrustes_distance(best, t).item() == pytest.approx(floor, abs=1e-6)
    for seed in range(3):
        other = torch.randn(n, ds, generator=gen(100 + seed), dtype=torch.float64)
        assert procrustes_distance(other, t).item() >= floor
    assert procrustes_floor(t, dt).item() == pytest.approx(0.0, abs=1e-7)


def test_logit_kd_is_forward_kl_over_valid_tokens():
    g = gen(15)
    s, t = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert logit_kd(t, t, mask).item() == pytest.approx(0.0, abs=1e-6)
    pt = torch.softmax(t[mask] / 2.0, -1)
    ref = (pt * (pt.log() - torch.log_softmax(s[mask] / 2.0, -1))).sum(-1).mean() * 4.0
    assert logit_kd(s, t, mask, temperature=2.0).item() == pytest.approx(ref.item(), rel=1e-5)
    s_garbage = s.clone()
    s_garbage[~mask] = 1e4
    assert logit_kd(s_garbage, t, mask).item() == pytest.approx(logit_kd(s, t, mask).item(), rel=1e-6)
