"""The feature store on synthetic tensors: format round trip, corruption caught and named, compatibility refusals,
resume bookkeeping, low-rank bases, and clean failures on unwritable or full output folders."""
from __future__ import annotations

import json
import os
import pickle
import resource
import signal
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.features import cache
from pipeline.features import plan as store_plan
from pipeline.features import lowrank
from pipeline.errors import StoreError
from pipeline.features.format import shard_file, sidecar_file, verify_files, write_shard
from pipeline.features.store import FeatureStore, pad_features
from pipeline.geometry import feature_gram_distance, procrustes_distance

FP = {"teacher_fingerprint": "t" * 64, "tokenizer_fingerprint": "k" * 64, "data_fingerprint": "d" * 64}


def build_store(root: Path, *, n: int = 23, d: int = 16, layers=(2, "final"), dtype: str = "bf16",
                shard_tokens: int = 40, seed: int = 0):
    """A store written by the stage's own writer/finalizer from random features; returns {sample_id: {layer: t}}."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 12, (n,), generator=g).numpy()
    ids = (1000 + 7 * torch.randperm(n, generator=g)).tolist()  # unordered, non-contiguous ids
    feats = {sid: {layer: torch.randn(int(L), d, generator=g) for layer in layers} for sid, L in zip(ids, lengths)}
    units = store_plan.plan_units(lengths, shard_tokens)
    content = {**FP, "split": "train", "layers": list(layers), "dtype": dtype, "compute_dtype": "float32",
               "topk_logits": 0, "lowrank": None, "shard_tokens": shard_tokens, "batch_tokens": 64,
               "max_batch_size": 8}
    info = {"teacher": {"spec": "synthetic", "n_layers": 4, "vocab_size": 10}, "data_path": "synthetic",
            "dims": {str(layer): {"d": d} for layer in layers}, "config": {}}
    plan = store_plan.make_plan(content, units, info)
    store_plan.prepare_output_folder(root, plan, 0)
    store_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    for u, (a, b) in enumerate(units):
        unit_ids = ids[a:b]
        offsets = torch.zeros(b - a + 1, dtype=torch.int64)
        offsets[1:] = torch.as_tensor(np.cumsum(lengths[a:b]))
        tensors = {f"feat.{layer}": torch.cat([feats[s][layer] for s in unit_ids]).to(store_dtype) for layer in layers}
        cache.write_unit(root, u, {"sample_ids": torch.tensor(unit_ids), "offsets": offsets, "tensors": tensors,
                                "energy": {}}, plan["fingerprint"], None)
    store_plan.finalize_store(root, plan, config={}, wall_s=0.0)
    return feats, plan, store_dtype


def flip_byte(path: Path, tensor: str, at: float = 0.5) -> None:
    """Flip one bit inside the data of `tensor` of a safetensors file (at a fraction of its byte range)."""
    raw = bytearray(path.read_bytes())
    (hlen,) = struct.unpack("<Q", raw[:8])
    start, end = json.loads(raw[8 : 8 + hlen])[tensor]["data_offsets"]
    raw[8 + hlen + start + int((end - start) * at)] ^= 0x10
    path.write_bytes(bytes(raw))


def test_round_trip_by_sample_id_across_shards(tmp_path):
    feats, plan, dt = build_store(tmp_path)
    store = FeatureStore(tmp_path)
    assert len(plan["units"]) > 3 and len(store.manifest["shards"]) == len(plan["units"])
    assert store.layers == [2, "final"] and len(store) == len(feats)
    for sid in reversed(list(feats)):  # random access, not file order
        got = store.get(sid)
        for layer, want in feats[sid].items():
            assert got[layer].dtype == dt and torch.equal(got[layer], want.to(dt))
    assert store.get(next(iter(feats)), layers=["final"]).keys() == {"final"}
    with pytest.raises(KeyError, match="sample id 5 is not in"):
        store.get(5)
    m = store.manifest
    assert m["n_tokens"] == sum(t[2].shape[0] for t in feats.values())
    assert m["stats"]["bytes_per_token"]["feat.2"] == 16 * 2  # bf16, d = 16
    # Picklable for DataLoader workers (handles are reopened there), same answers after the round trip.
    clone = pickle.loads(pickle.dumps(store))
    sid = next(iter(feats))
    assert torch.equal(clone.get(sid)[2], store.get(sid)[2])


def test_identical_content_gives_identical_bytes(tmp_path):
    # Shard checksums are how resume and multi-rank runs prove equality, so bytes must depend on content only.
    t = {"feat.2": torch.randn(5, 3).bfloat16(), "feat.final": torch.randn(5, 3)}
    for name in ("a", "b"):
        write_shard(tmp_path / name, sample_ids=torch.tensor([4, 9]), offsets=torch.tensor([0, 2, 5]), tensors=t,
                    metadata={"unit": "0", "plan": "p", "more": "x"})
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()


def test_plan_units_and_length_batches_are_partitions():
    lengths = np.array([5, 1, 9, 3, 3, 7, 2, 8, 1, 4])
    units = store_plan.plan_units(lengths, 10)
    assert units[0][0] == 0 and units[-1][1] == len(lengths)
    assert all(a[1] == b[0] for a, b in zip(units, units[1:]))
    assert all(lengths[a:b].sum() >= 10 for a, b in units[:-1])
    batches = store_plan.length_batches(lengths, range(len(lengths)), batch_tokens=12, max_batch_size=3)
    assert sorted(p for b in batches for p in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= 3 and (len(b) == 1 or len(b) * max(lengths[b]) <= 12)
    # The batches of a unit depend on the unit alone: the same positions in any order give the same batches.
    assert store_plan.length_batches(lengths, [4, 3, 2], 12, 3) == store_plan.length_batches(lengths, [2, 3, 4], 12, 3)


def test_truncated_shard_is_named_by_reader_and_verify(tmp_path):
    build_store(tmp_path)
    victim = tmp_path / shard_file(2)
    victim.write_bytes(victim.read_bytes()[:-100])
    with pytest.raises(StoreError, match=r"unit-00002\.safetensors.*truncated"):
        FeatureStore(tmp_path)
    problems = verify_files(tmp_path, json.loads((tmp_path / "manifest.json").read_text()))
    assert len(problems) == 1 and "unit-00002.safetensors" in problems[0]


def test_bit_flip_in_features_is_caught_on_read_and_by_verify(tmp_path):
    feats, _, _ = build_store(tmp_path)
    victim = tmp_path / shard_file(1)
    flip_byte(victim, "feat.final")
    store = FeatureStore(tmp_path)  # the quick check passes: same size
    errors = []
    for sid in feats:
        store.get(sid, layers=[2])  # the other layer of the same samples is intact
        try:
            store.get(sid)
        except StoreError as e:
            errors.append(str(e))
    assert len(errors) == 1 and "unit-00001.safetensors" in errors[0] and "checksum mismatch in feat.final" in errors[0]
    with pytest.raises(StoreError, match=r"unit-00001\.safetensors: sha256 mismatch"):
        FeatureStore(tmp_path, verify=True)
    # With per-sample checks off the reader is blind to it: the CRCs are what protect training.
    unchecked = FeatureStore(tmp_path, check_samples=False)
    assert sum(not torch.equal(unchecked.get(s)["final"], feats[s]["final"].bfloat16()) for s in feats) == 1


def test_bit_flip_in_index_is_caught_on_open(tmp_path):
    build_store(tmp_path)
    flip_byte(tmp_path / shard_file(0), "offsets", at=0.3)
    with pytest.raises(StoreError, match=r"unit-00000\.safetensors: sample_ids/offsets checksum mismatch"):
        FeatureStore(tmp_path)


def test_incompatible_store_is_refused_naming_what_differs(tmp_path):
    build_store(tmp_path)
    store = FeatureStore(tmp_path)
    store.check_compatible(teacher_fingerprint="t" * 64, data_fingerprint="d" * 64, tokenizer_fingerprint="k" * 64,
                           layers=[2, "final"])
    for kwargs, what in (({"teacher_fingerprint": "x" * 64}, "teacher"), ({"data_fingerprint": "x" * 64}, "data"),
                         ({"tokenizer_fingerprint": "x" * 64}, "tokenizer"),
                         ({"layers": [2, 3]}, r"layers: store lacks \[3\]")):
        with pytest.raises(StoreError, match=f"does not match this run: {what}"):
            store.check_compatible(**kwargs)


def test_resume_bookkeeping(tmp_path):
    _, plan, _ = build_store(tmp_path)
    fp = plan["fingerprint"]
    assert all(cache.unit_done(tmp_path, u, fp, None) for u in range(len(plan["units"])))
    assert not cache.unit_done(tmp_path, 0, "another plan", None)
    (tmp_path / sidecar_file(1)).unlink()  # killed between the shard's rename and its sidecar
    flip_byte(tmp_path / shard_file(2), "feat.2")  # damaged on disk after it was written
    assert not cache.unit_done(tmp_path, 1, fp, None) and not cache.unit_done(tmp_path, 2, fp, None)
    assert store_plan.pending_units(tmp_path, plan) == [1]
    with pytest.raises(StoreError, match=r"1 of \d+ units are not cached yet \(first: shards/unit-00001"):
        store_plan.finalize_store(tmp_path, plan, config={}, wall_s=0.0)
    # A killed writer's temp file is cleared by the next run; the plan already there is kept.
    stale = tmp_path / "shards" / ".unit-00001.safetensors.abc.tmp"
    stale.write_bytes(b"partial")
    assert store_plan.check_output_folder(tmp_path, plan) == "complete"  # manifest from the first finalize still there
    store_plan.prepare_output_folder(tmp_path, plan, 0)
    assert not stale.exists()


def test_output_folder_refusals(tmp_path):
    _, plan, _ = build_store(tmp_path / "store")
    other = store_plan.make_plan({**plan["content"], "layers": [2, 4], "teacher_fingerprint": "z" * 64},
                                 plan["units"], {})
    with pytest.raises(StoreError, match=r"another layers \(store: \[2, 'final'\], this run: \[2, 4\]\); teacher"):
        store_plan.check_output_folder(tmp_path / "store", other)
    # A run killed while writing its plan left only the plan's temp file: the folder counts as new.
    (tmp_path / "early").mkdir()
    (tmp_path / "early" / ".plan.json.x1.tmp").write_text("{")
    assert store_plan.check_output_folder(tmp_path / "early", plan) == "new"
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not empty and holds no feature store"):
        store_plan.check_output_folder(tmp_path / "busy", plan)


def test_unwritable_output_fails_cleanly(tmp_path):
    t = {"feat.2": torch.zeros(3, 4)}
    ids, offsets = torch.tensor([1]), torch.tensor([0, 3])
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    # A path below a regular file cannot be created, whoever runs the test (root ignores permission bits).
    with pytest.raises(StoreError, match=r"cannot write .*a_file/store/x\.safetensors"):
        write_shard(blocker / "store" / "x.safetensors", sample_ids=ids, offsets=offsets, tensors=t, metadata={})
    with pytest.raises(StoreError, match="cannot create output folder .*a_file/store"):
        store_plan.prepare_output_folder(blocker / "store", {"units": []}, 0)
    ro = tmp_path / "readonly"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as root: permission bits do not stop writes")
        with pytest.raises(StoreError, match="cannot write"):
            write_shard(ro / "x.safetensors", sample_ids=ids, offsets=offsets, tensors=t, metadata={})
    finally:
        ro.chmod(0o700)


def test_full_disk_fails_cleanly_without_partial_files(tmp_path):
    # The kernel's file-size limit makes writes fail mid-file (EFBIG) exactly like a full disk (ENOSPC) would.
    t = {"feat.2": torch.randn(4096, 64)}
    ids, offsets = torch.tensor([7]), torch.tensor([0, 4096])
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        with pytest.raises(StoreError, match=r"cannot write .*x\.safetensors"):
            write_shard(tmp_path / "x.safetensors", sample_ids=ids, offsets=offsets, tensors=t, metadata={})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert list(tmp_path.iterdir()) == []  # neither the shard nor its temp file
    with pytest.raises(StoreError, match="needs about .* GB more"):
        store_plan.check_free_space(tmp_path, 10**18)


def test_pca_basis_energy_and_rotation_invariant_losses():
    g = torch.Generator().manual_seed(0)
    n, d = 400, 32
    scales = torch.tensor([10.0, 8.0, 6.0, 4.0] + [0.1] * (d - 4), dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    x = (torch.randn(n, d, generator=g, dtype=torch.float64) * scales) @ q.T + 3.0
    basis, mean, kept = lowrank.pca_basis(x.sum(0), x.T @ x, n, energy=0.99)
    assert basis.shape == (d, 4)  # the four large directions hold > 99% of the variance
    assert torch.allclose(basis.T @ basis, torch.eye(4), atol=1e-5)
    xc = (x - x.mean(0)).float()
    coeffs = (x.float() - mean) @ basis
    recon = coeffs @ basis.T + mean
    dropped = ((xc - (recon - mean)) ** 2).sum() / (xc**2).sum()
    assert abs((1 - kept) - float(dropped)) < 1e-4
    assert lowrank.pca_basis(x.sum(0), x.T @ x, n, k=6)[0].shape == (d, 6)
    # Coefficients and reconstruction give the same geometry losses, so training may use coefficients directly.
    student = torch.randn(n, 8, generator=g)
    for loss in (procrustes_distance, feature_gram_distance):
        assert torch.allclose(loss(student, coeffs), loss(student, recon), atol=1e-5)


def test_lowrank_fits_without_massive_rows_and_keeps_them_faithfully():
    """A real teacher's first token (100x the median norm, the same direction in every sample) must neither own
    the PCA basis nor be lost by it."""
    g = torch.Generator().manual_seed(1)
    n, d = 2000, 48
    scales = torch.linspace(3.0, 0.3, d, dtype=torch.float64)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * scales + 1.0
    spike_dir = torch.randn(d, generator=g, dtype=torch.float64)
    spike_dir /= spike_dir.norm()
    first = torch.arange(0, n, 100)  # one "first token" per 100-token sample
    x[first] = 100 * x.norm(dim=1).median() * spike_dir + 0.01 * torch.randn(len(first), d, generator=g,
                                                                             dtype=torch.float64)
    keep = torch.ones(n, dtype=torch.bool)
    keep[first] = False
    # What fit_lowrank does: PCA of the rows the rule keeps, then directions for the rows it leaves out.
    assert lowrank.DEFAULT_TOKEN_RULE.select(x)[1] == len(first)
    basis, mean, kept = lowrank.pca_basis(x[keep].sum(0), x[keep].T @ x[keep], int(keep.sum()), energy=0.9)
    all_k = lowrank.pca_basis(x.sum(0), x.T @ x, n, energy=0.9)[0].shape[1]
    assert all_k <= 2 < basis.shape[1]  # fitted on every row, the spike alone "explains" 90%
    extra, err = lowrank.outlier_directions(x[first], basis.double(), mean.double())
    assert 1 <= extra.shape[1] <= 3 and err < 1e-3
    full = torch.cat([basis.double(), extra], dim=1)
    assert torch.allclose(full.T @ full, torch.eye(full.shape[1], dtype=torch.float64), atol=1e-6)  # fp32 basis
    recon = ((x - mean.double()) @ full) @ full.T + mean.double()
    rel = (recon[first] - x[first]).norm(dim=1) / x[first].norm(dim=1)
    assert float(rel.max()) < 1e-3  # the massive rows come back as they were
    assert lowrank.energy_kept(x[keep].sum(0), x[keep].T @ x[keep], int(keep.sum()), full, mean.double()) >= kept


def test_pad_features_aligns_with_right_padding():
    items = [{"features": {2: torch.ones(3, 4)}}, {"features": {2: 2 * torch.ones(1, 4)}}]
    out = pad_features(items, T=5, dtype=torch.float32)[2]
    assert out.shape == (2, 5, 4)
    assert out[0, :3].eq(1).all() and out[0, 3:].eq(0).all() and out[1, 0].eq(2).all() and out[1, 1:].eq(0).all()
