"""Quantized feature stores: the codecs' error bounds (zeros exact, massive rows kept), the invariances that let a
store keep rotated rows (every distance, the token rule, exact-KD logits), and the cache stage end to end with a
tiny teacher: values against an fp32 store, the rotated LM head, un-rotation for analyze, verification of codes
and scales, and clear refusals."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from pipeline.errors import StoreError
from pipeline.features.quant import QMAX, QuantSpec, dequantize, quantize, rotation_matrix
from pipeline.features.store import FeatureStore
from pipeline.geometry import (
    DEFAULT_TOKEN_RULE, centred_norm_ratios, cka_distance, feature_gram_distance, procrustes_distance,
)
from pipeline.models.teacher import LMHead
from stages.cache import main as cache
from test_feature_store import flip_byte


def rows_with_outliers(n: int = 64, d: int = 128, seed: int = 0) -> torch.Tensor:
    """Gaussian rows plus what real teachers have: a massive first row (100x), a large constant channel, a zero
    row and an exactly zero channel."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    x[0] *= 100.0
    x[:, 7] += 40.0
    x[5] = 0.0
    x[:, 3] = 0.0
    return x


@pytest.mark.parametrize("kind,group", [("int8", 64), ("int8", 0), ("fp8", 64), ("int4", 32), ("int4", 0)])
def test_codes_round_trip_within_half_a_step_and_keep_zeros(kind, group):
    x = rows_with_outliers()
    spec = QuantSpec(kind, group)
    codes, scale = quantize(x, spec)
    d = x.shape[1]
    assert scale.dtype == torch.bfloat16 and scale.shape == (x.shape[0], spec.groups(d))
    assert codes.numel() * codes.element_size() + scale.numel() * 2 == x.shape[0] * spec.bytes_per_row(d)
    y = dequantize(codes, scale, spec).double()
    step = scale.double().repeat_interleave(d // spec.groups(d), dim=1)  # each element's quantization step
    if kind == "fp8":  # 3 mantissa bits: half an ulp is 1/16 of the value, or of the smallest normal's step
        bound = torch.maximum(x.abs() / 16, step * 2.0 ** -9)
    else:
        bound = step / 2
    assert bool(((y - x).abs() <= bound * 1.0001 + 1e-12).all())
    assert bool((y[5] == 0).all()) and bool((y[:, 3] == 0).all())  # exact zeros stay exact
    # Every row has its own scales: the massive row (100x) keeps the codec's accuracy, and so do the rows beside it
    # (what they lose is to channel 7, which sets their groups' scales: the error --rotate removes).
    rel = (y - x).norm(dim=1) / x.norm(dim=1).clamp_min(1e-300)
    assert float(rel[0]) < {"int8": 0.01, "fp8": 0.04, "int4": 0.15}[kind]
    assert float(rel.max()) < {"int8": 0.03, "fp8": 0.04, "int4": 0.4}[kind]
    # The code range is used: each non-zero group's largest entry lands within 1% of the top code.
    top = dequantize(codes, scale, spec).abs().reshape(x.shape[0], spec.groups(d), -1).amax(-1)
    nonzero = top > 0
    assert bool((top[nonzero] / scale.float()[nonzero] >= QMAX[kind] * 0.99 / (1 + 2.0 ** -7)).all())


def test_int4_packs_every_code_two_per_byte():
    x = torch.arange(-7, 8, dtype=torch.float32).repeat(2)[None, :30]  # every code, an even width
    spec = QuantSpec("int4", 0)
    codes, scale = quantize(x * 0.5, spec)
    assert codes.dtype == torch.uint8 and codes.shape == (1, 15)
    torch.testing.assert_close(dequantize(codes, scale, spec), x * 0.5, rtol=0, atol=0.5 * float(scale) / 2 + 1e-6)


def test_rotation_leaves_every_distance_the_rule_and_exact_logits_unchanged():
    x = rows_with_outliers(n=96, d=128)
    mask = torch.ones(96, dtype=torch.bool)
    mask[90:] = False
    student = torch.randn(96, 48, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    head = LMHead(torch.randn(50, 128, generator=torch.Generator().manual_seed(4), dtype=torch.float64))
    for d, name in ((128, "randomized_hadamard"), (96, "random_orthogonal")):
        q, kind = rotation_matrix(d, seed=5, dtype=torch.float64)
        assert kind == name
        torch.testing.assert_close(q @ q.T, torch.eye(d, dtype=torch.float64), rtol=0, atol=1e-12)
        assert torch.equal(q, rotation_matrix(d, seed=5, dtype=torch.float64)[0])
    q = rotation_matrix(128, seed=5, dtype=torch.float64)[0]
    assert DEFAULT_TOKEN_RULE.select(x, mask)[1] == 1  # the massive row is left out, rotated or not
    torch.testing.assert_close(centred_norm_ratios(x @ q, mask), centred_norm_ratios(x, mask), rtol=1e-6, atol=0)
    for fn in (procrustes_distance, feature_gram_distance, cka_distance):
        torch.testing.assert_close(fn(student, x @ q, mask), fn(student, x, mask), rtol=1e-10, atol=1e-12)
    rotated_head = LMHead(head.weight @ q)
    torch.testing.assert_close(rotated_head.logits(x @ q), head.logits(x), rtol=1e-10, atol=1e-10)


@pytest.fixture(scope="module")
def quant_stores(prepared_tiny, tiny_pair, tmp_path_factory):
    """The valid split at layer 2 and the final state: exact fp32, int8 and fp8 (centred, not rotated), and the
    default store's int4 counterpart (rotated, centred)."""
    root = tmp_path_factory.mktemp("quant")
    common = ["--data", str(prepared_tiny), "--teacher", str(tiny_pair.teacher), "--split", "valid",
              "--layers", "2", "--final", "--progress", "false", "--shard_tokens", "1500"]
    for name, extra in (("fp32", ["--dtype", "fp32", "--quant", "none"]),
                        ("int8", ["--quant", "int8", "--rotate", "false", "--dtype", "fp32"]),
                        ("fp8", ["--quant", "fp8", "--rotate", "false"]), ("int4rot", ["--quant", "int4"])):
        assert cache(common + ["--out", str(root / name), *extra]) == 0
    return root


def test_quantized_stores_read_back_the_teachers_features(quant_stores, capsys):
    exact = FeatureStore(quant_stores / "fp32")
    int8, fp8, int4 = (FeatureStore(quant_stores / name) for name in ("int8", "fp8", "int4rot"))
    real = FeatureStore(quant_stores / "int4rot", unrotate=True)
    assert int8.manifest["format_version"] == 2 and int8.manifest["quant"]["centered"]
    assert int4.manifest["quant"]["rotated"] and int4.manifest["quant_params"]["file"] == "quant.safetensors"
    assert "quant" not in exact.manifest and "quant_params" not in exact.manifest  # plain stores as before
    assert exact.manifest["format_version"] == 1
    b = int4.manifest["stats"]["bytes_per_token"]
    assert b["feat.2"] == 128 / 2 and b["scale.2"] == 2 * 128 / 32
    err = {k: [0.0, 0.0] for k in ("int8", "fp8", "int4 unrotated")}
    head_x, head_r = exact.lm_head(), int4.lm_head()
    for sid in exact.sample_ids.tolist():
        x = exact.get(sid)
        for name, store in (("int8", int8), ("fp8", fp8), ("int4 unrotated", real)):
            y = store.get(sid)
            for layer in (2, "final"):
                err[name][0] += float((y[layer].float() - x[layer]).square().sum())
                err[name][1] += float(x[layer].square().sum())
        rot = int4.get(sid)["final"]
        assert rot.dtype == torch.bfloat16  # read back in the store's --dtype
        # Exact KD through the rotated head: the logits of the rotated rows are those of the un-rotated ones.
        torch.testing.assert_close(head_r.logits(rot.float()), real.lm_head().logits(real.get(sid)["final"].float()),
                                   rtol=0, atol=2e-2)
        assert float((head_r.logits(rot.float()) - head_x.logits(x["final"])).abs().max()) < 0.3
    rel = {k: (a / b) ** 0.5 for k, (a, b) in err.items()}
    assert rel["int8"] < 0.01 and rel["fp8"] < 0.04 and 0.01 < rel["int4 unrotated"] < 0.12, rel
    # Verification covers the codes and the scales; a flipped scale bit is named by the reader and by --verify.
    damaged = quant_stores.parent / "damaged"
    shutil.copytree(quant_stores / "int8", damaged)
    flip_byte(damaged / "shards/unit-00000.safetensors", "scale.2")
    assert cache(["--verify", "--out", str(damaged)]) == 1
    assert "unit-00000.safetensors: sha256 mismatch" in capsys.readouterr().err
    with pytest.raises(StoreError, match="checksum mismatch in scale.2 of sample"):
        for sid in FeatureStore(damaged).sample_ids.tolist():
            FeatureStore(damaged).get(sid)
    # A manifest from a newer format is refused by name, not misread.
    m = json.loads((damaged / "manifest.json").read_text())
    (damaged / "manifest.json").write_text(json.dumps({**m, "format_version": 3}))
    with pytest.raises(StoreError, match="version 3, expected 'geokd.features' version 1 or 2"):
        FeatureStore(damaged)


def test_units_made_with_other_quantization_parameters_are_recomputed(quant_stores, prepared_tiny, tiny_pair,
                                                                     tmp_path, capsys):
    """A resumed store whose quant.safetensors changed (deleted and refitted elsewhere, say) must not mix shards
    quantized around two different means: every unit is recomputed with the file that is there."""
    from pipeline.features.format import QUANT_FILE, read_quant_params, write_quant_params

    store = tmp_path / "int8"
    shutil.copytree(quant_stores / "int8", store)
    (store / "manifest.json").unlink()
    rotations, means = read_quant_params(store / QUANT_FILE)
    write_quant_params(store / QUANT_FILE, rotations, {k: m + 1.0 for k, m in means.items()}, {})
    capsys.readouterr()
    assert cache(["--data", str(prepared_tiny), "--teacher", str(tiny_pair.teacher), "--split", "valid",
                  "--layers", "2", "--final", "--progress", "false", "--shard_tokens", "1500", "--out", str(store),
                  "--quant", "int8", "--rotate", "false", "--dtype", "fp32"]) == 0
    assert "0 of this rank's" in capsys.readouterr().out
    exact, redone = FeatureStore(quant_stores / "fp32"), FeatureStore(store, verify=True)
    for sid in exact.sample_ids.tolist()[:5]:
        x, y = exact.get(sid)[2], redone.get(sid)[2]
        # A poor mean costs precision (2.5% here), never correctness: stale units decoded with it would be off by
        # the whole shift (~100%).
        assert float((y - x).norm() / x.norm()) < 0.05


@pytest.mark.parametrize("extra,message", [
    (["--quant", "int3"], "--quant 'int3': choose int8, fp8, int4, none or auto"),
    (["--quant", "none", "--quant_group", "32"], "--quant_group applies to quantized stores"),
    (["--quant", "int8", "--lowrank_k", "4"], "--quant and low-rank storage do not combine"),
    (["--quant", "int4", "--quant_group", "48"], "layer 2 has width 128, not a multiple of the quantization group 48"),
])
def test_bad_quantization_options_are_refused_with_exit_2(prepared_tiny, tiny_pair, tmp_path, capsys, extra,
                                                          message):
    args = ["--data", str(prepared_tiny), "--teacher", str(tiny_pair.teacher), "--layers", "2", "--out",
            str(tmp_path / "s"), "--progress", "false", *extra]
    assert cache(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
