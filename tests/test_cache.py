"""The cache stage end to end with a tiny teacher: features equal the teacher's, a SIGKILL and a rerun give the
same shards as an uninterrupted run, two torchrun ranks give the same shards as one, corruption and mismatches
are refused naming what is wrong, and the store feeds a DataLoader with workers."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.models.teacher import teacher_placement
from pipeline.data.prepared import PreparedData
from pipeline.errors import StoreError
from pipeline.features.format import shard_file
from pipeline.features.store import FeatureDataset, FeatureStore, collate_with_features
from pipeline.models import capture_hidden_states, load_model, model_fingerprint
from stages.cache import main
from multinode.hosts import can_run_here
from helpers import ROOT, clean_env

# Units of ~3k tokens: the 36k-token train split makes 12 shards, so a kill after the first lands mid-run.
# Layers 0 and 1: two stored states for the cost of one decoder layer (the forward stops after layer 1).
BIG_ARGS = ["--layers", "0", "1", "--shard_tokens", "3000", "--batch_tokens", "4096", "--progress", "false"]


def cache_args(data: Path, teacher: Path, out: Path, *extra: str) -> list[str]:
    return ["--data", str(data), "--teacher", str(teacher), "--out", str(out), *extra]


def shard_checksums(out: Path) -> list[tuple[str, str]]:
    m = json.loads((out / "manifest.json").read_text())
    return [(s["file"], s["sha256"]) for s in m["shards"]]


@pytest.fixture(scope="module")
def reference(prepared_tiny, tiny_pair, tmp_path_factory):
    """An uninterrupted single-process store of the train split."""
    out = tmp_path_factory.mktemp("cache") / "reference"
    assert main(cache_args(prepared_tiny, tiny_pair.teacher, out, *BIG_ARGS)) == 0
    return out


def test_sigkill_then_rerun_gives_the_same_store(reference, prepared_tiny, tiny_pair, tmp_path, capsys):
    out = tmp_path / "killed"
    env = clean_env()
    proc = subprocess.Popen([sys.executable, "-m", "stages.cache",
                             *cache_args(prepared_tiny, tiny_pair.teacher, out, *BIG_ARGS)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = out / "shards" / "unit-00000.json"
    deadline = time.monotonic() + 120
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    n_units = len(json.loads((reference / "plan.json").read_text())["units"])
    done = len(list((out / "shards").glob("unit-*.json")))
    assert not (out / "manifest.json").exists() and 1 <= done < n_units  # really killed mid-run
    with pytest.raises(StoreError, match="caching did not finish"):
        FeatureStore(out)

    # Resumed with 3 writer threads (the killed run had 1): thread count must not change a byte either.
    assert main(cache_args(prepared_tiny, tiny_pair.teacher, out, *BIG_ARGS, "--writer_threads", "3")) == 0
    assert f"{done} of this rank's {n_units} already done" in capsys.readouterr().out
    assert shard_checksums(out) == shard_checksums(reference)
    assert not list(out.rglob("*.tmp"))
    store, tokens = FeatureStore(out, verify=True), PreparedData(prepared_tiny).split("train")
    assert sorted(store.sample_ids.tolist()) == sorted(tokens.sample_ids.tolist())  # none missing, none twice


@pytest.mark.skipif(can_run_here(), reason="shown across two hosts by tests/test_multinode.py on this machine")
def test_two_torchrun_ranks_give_the_same_store(reference, prepared_tiny, tiny_pair, tmp_path):
    out = tmp_path / "two_ranks"
    env = clean_env(OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "stages.cache", *cache_args(prepared_tiny, tiny_pair.teacher, out, *BIG_ARGS)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert shard_checksums(out) == shard_checksums(reference)
    plan = lambda root: json.loads((root / "plan.json").read_text())  # noqa: E731
    assert plan(out)["fingerprint"] == plan(reference)["fingerprint"]


def test_features_match_the_teacher_and_feed_dataloader_workers(reference, prepared_tiny, tiny_pair):
    data = PreparedData(prepared_tiny)
    tokens = data.split("train")
    teacher = load_model(str(tiny_pair.teacher)).eval()
    store = FeatureStore(reference)
    store.check_compatible(teacher_fingerprint=model_fingerprint(tiny_pair.teacher), data_fingerprint=data.fingerprint,
                           tokenizer_fingerprint=data.tokenizer_fingerprint, layers=[0, 1])
    # The default store: int8 codes after a rotation, read back in bf16.
    assert store.manifest["dtype"] == "bf16" and store.layers == [0, 1]
    assert store.manifest["quant"]["kind"] == "int8" and store.manifest["quant"]["rotated"]
    real = FeatureStore(reference, unrotate=True)
    for pos in (0, 137, len(tokens) - 1):  # each sample alone, unpadded: the store must hold the same rows
        item = tokens[pos]
        ids = item["input_ids"][None]
        with torch.no_grad():
            want = capture_hidden_states(teacher, ids, torch.ones_like(ids), [0, 1])
        got = real.get(item["sample_id"])
        for layer in (0, 1):
            assert got[layer].shape == want[layer][0].shape
            rel = (got[layer].float() - want[layer][0]).norm(dim=1) / want[layer][0].norm(dim=1)
            assert float(rel.max()) < 0.015, (layer, float(rel.max()))  # int8 with bf16 reads: ~0.6%

    ds = FeatureDataset(tokens, store, layers=[1])
    pad = data.tokenizer().pad_token_id
    loader = torch.utils.data.DataLoader(ds, batch_size=16, num_workers=2,
                                         collate_fn=lambda items: collate_with_features(items, pad, torch.float32))
    seen = 0
    for batch in loader:
        feats, mask = batch["features"][1], batch["attention_mask"].bool()
        assert feats.shape[:2] == batch["input_ids"].shape and feats.dtype == torch.float32
        assert feats[~mask].eq(0).all() and feats[mask].abs().sum(-1).gt(0).all()
        for b, sid in enumerate(batch["sample_ids"].tolist()):
            n = int(mask[b].sum())
            assert torch.equal(feats[b, :n], store.get(sid)[1].float())
        seen += len(batch["sample_ids"])
    assert seen == len(tokens)


def test_final_state_topk_and_lowrank(prepared_tiny, tiny_pair, tmp_path):
    full, low = tmp_path / "full", tmp_path / "low"
    common = ["--split", "valid", "--progress", "false", "--shard_tokens", "1500"]
    assert main(cache_args(prepared_tiny, tiny_pair.teacher, full, "--layers", "2", "--final", "--topk_logits", "5",
                           "--dtype", "fp32", "--quant", "none", *common)) == 0
    assert main(cache_args(prepared_tiny, tiny_pair.teacher, low, "--layers", "2", "--lowrank_k", "16",
                           "--dtype", "fp32", *common)) == 0
    tokens = PreparedData(prepared_tiny).split("valid")
    teacher = load_model(str(tiny_pair.teacher)).eval()
    fs, ls = FeatureStore(full), FeatureStore(low, reconstruct=True)
    w = fs.lm_head_weight()
    item = tokens[3]
    with torch.no_grad():
        logits = teacher(input_ids=item["input_ids"][None]).logits[0]
    final = fs.get(item["sample_id"])["final"]
    torch.testing.assert_close(final @ w.T, logits, atol=1e-4, rtol=1e-4)  # exact logits without the teacher
    values, indices = fs.get_topk(item["sample_id"])
    want_v, want_i = logits.log_softmax(-1).topk(5)
    torch.testing.assert_close(values, want_v, atol=1e-4, rtol=1e-4)
    assert torch.equal(indices.long(), want_i)

    report = ls.manifest["lowrank"]["layers"]["2"]
    k = report["k"]
    assert report["k_principal"] == 16 and k == 16 + report["k_outlier"]
    assert ls.feature_dim(2) == 128 and FeatureStore(low, reconstruct=False).feature_dim(2) == k
    assert ls.manifest["stats"]["bytes_per_token"]["feat.2"] == k * 4
    # The energy the manifest reports is the energy the stored coefficients really keep.
    err = tot = 0.0
    mean = ls.lowrank_basis(2)[1]
    for sid in tokens.sample_ids.tolist():
        x, r = fs.get(sid)[2], ls.get(sid)[2]
        err += float(((x - r) ** 2).sum())
        tot += float(((x - mean) ** 2).sum())
    assert abs((1 - err / tot) - report["energy_store"]) < 1e-3 and 0 < report["energy_store"] < 1


def test_mismatched_rerun_is_refused_naming_what_differs(reference, prepared_tiny, tiny_pair, tmp_path, capsys):
    before = shard_checksums(reference)
    assert main(cache_args(prepared_tiny, tiny_pair.teacher, reference, "--layers", "0", "3",
                           *BIG_ARGS[3:])) == 2
    assert "another layers (store: [0, 1], this run: [0, 3])" in capsys.readouterr().err
    assert main(cache_args(prepared_tiny, tiny_pair.student, reference, *BIG_ARGS)) == 2
    assert "another teacher" in capsys.readouterr().err
    assert main(cache_args(prepared_tiny, tiny_pair.teacher, reference, *BIG_ARGS, "--split", "valid")) == 2
    assert "another split" in capsys.readouterr().err
    assert shard_checksums(reference) == before  # nothing was touched
    assert main(cache_args(prepared_tiny, tiny_pair.teacher, reference, *BIG_ARGS)) == 0  # same run: complete
    assert "already holds this store" in capsys.readouterr().out

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert main(cache_args(prepared_tiny, tiny_pair.teacher, blocker / "out", *BIG_ARGS)) == 2
    assert "cannot create output folder" in capsys.readouterr().err


def test_verify_names_damaged_shards_and_rerun_repairs(reference, prepared_tiny, tiny_pair, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(reference, out)
    # Killed after the last shard but before the manifest: --finalize (or a rerun) completes it from the sidecars.
    (out / "manifest.json").unlink()
    assert main(["--verify", "--out", str(out)]) == 2
    assert "not finished, 0 of" in capsys.readouterr().err
    assert main(["--finalize", "--out", str(out)]) == 0
    assert shard_checksums(out) == shard_checksums(reference)
    assert main(["--verify", "--out", str(out)]) == 0
    assert "OK" in capsys.readouterr().out
    n_units = len(shard_checksums(out))
    flipped, cut = out / shard_file(3), out / shard_file(7)
    raw = bytearray(flipped.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    flipped.write_bytes(bytes(raw))
    cut.write_bytes(cut.read_bytes()[:-1])
    assert main(["--verify", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "2 problem(s)" in err and "unit-00003.safetensors: sha256 mismatch" in err
    assert "unit-00007.safetensors: " in err and "truncated" in err
    assert "delete" in err and "manifest.json" in err  # how to repair
    # The repair it describes: the damaged units are recomputed, the others kept, the result is the reference.
    (out / "manifest.json").unlink()
    assert main(cache_args(prepared_tiny, tiny_pair.teacher, out, *BIG_ARGS)) == 0
    assert f"{n_units - 2} of this rank's {n_units} already done" in capsys.readouterr().out
    assert shard_checksums(out) == shard_checksums(reference)


def test_teacher_placement_decisions():
    gib = 2**30
    assert teacher_placement(10 * gib, None, 0, 1, True) == "cpu"
    assert teacher_placement(10 * gib, 80 * gib, 1, 4, True) == "gpu"
    assert teacher_placement(100 * gib, 80 * gib, 2, 1, True) == "device_map"
    with pytest.raises(StoreError, match="run a single process"):
        teacher_placement(100 * gib, 80 * gib, 2, 2, True)
    with pytest.raises(StoreError, match="install accelerate"):
        teacher_placement(100 * gib, 80 * gib, 2, 1, False)
    with pytest.raises(StoreError, match="all 1 GPUs together are too small"):
        teacher_placement(100 * gib, 80 * gib, 1, 1, True)


def test_an_untied_llama_head_is_stored_and_gives_exact_logits(prepared_tiny, tmp_path):
    """Llama-family teachers with their own LM head (not the embedding): the store keeps that head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.data.tokenizer import load_tokenizer

    tok = load_tokenizer("builtin-tiny")
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    model.save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")
    out = tmp_path / "store"
    assert main(cache_args(prepared_tiny, tmp_path / "llama", out, "--layers", "2", "--final", "--split", "valid",
                           "--dtype", "fp32", "--quant", "none", "--progress", "false")) == 0
    store = FeatureStore(out)
    assert torch.equal(store.lm_head_weight(), model.lm_head.weight.detach())
    item = PreparedData(prepared_tiny).split("valid")[0]
    with torch.no_grad():
        logits = model(input_ids=item["input_ids"][None]).logits[0]
        layer2 = capture_hidden_states(model, item["input_ids"][None], None, [2])[2][0]
    stored = store.get(item["sample_id"])
    torch.testing.assert_close(stored["final"] @ store.lm_head_weight().T, logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(stored[2], layer2, atol=1e-5, rtol=1e-5)
