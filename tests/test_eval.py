"""eval/: ROUGE-L scoring, benchmark parsing, reproducible keyed sampling, resumable reports, 2 ranks == 1 rank."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eval.benchmarks import REGISTRY, BenchmarkError, load_benchmark, read_jsonl
from eval.config import EvalConfig
from eval.generate import (GenerationSettings, KeyedSampler, encode_prompts, generate_all, keyed_uniform,
                           plan_batches)
from eval.runner import evaluate, model_names
from multinode.hosts import can_run_here
from eval.scoring import aggregate, rouge_l, score_all
from pipeline.config import parse_config
from pipeline.errors import ConfigError
from pipeline.data.prompts import render_prompt
from pipeline.runtime import free_port
from helpers import ROOT



def reference_rouge(generation: str, references: list[str]) -> float:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return 100 * max(scorer.score(r, generation)["rougeL"].fmeasure for r in references)


# ---------------------------------------------------------------- scoring

@pytest.mark.parametrize("generation, references", [
    ("the cat sat on the mat", ["the cat sat on the mat"]),
    ("the cat sat", ["a dog ran away", "the cat sat on the mat", "cat"]),
    ("", ["the cat sat on the mat"]),
    ("Running quickly, the runners ran.", ["The runner runs quick"]),
    ("Zürich straße café — 東京", ["zurich strasse cafe tokyo", "Zürich café"]),
    ("   ", [""]),
])
def test_rouge_l_equals_rouge_score(generation, references):
    assert rouge_l(generation, references) == pytest.approx(reference_rouge(generation, references), abs=1e-12)


def test_rouge_l_values_by_hand():
    # LCS 3 of 3 generated / 6 reference tokens: P 1, R 1/2, F 2/3; the best of several references counts.
    assert rouge_l("the cat sat", ["the cat sat on the mat"]) == pytest.approx(200 / 3)
    assert rouge_l("the cat sat", ["dog", "the cat sat on the mat", "the cat sat"]) == pytest.approx(100.0)
    assert rouge_l("", ["anything at all"]) == 0.0
    # Stemming: "runs" and "running" share the stem "run".
    assert rouge_l("runs", ["running"]) == pytest.approx(100.0)


def test_count_mismatch_is_an_error():
    with pytest.raises(ValueError, match="2 generations but 3 reference sets"):
        score_all(["a", "b"], [["a"], ["b"], ["c"]])


def test_aggregate_mean_then_std_over_seeds():
    result = aggregate({"10": [10.0, 20.0], "20": [30.0, 40.0]})
    assert result["per_seed"] == {"10": 15.0, "20": 35.0}
    assert result["mean"] == pytest.approx(25.0)
    assert result["std"] == pytest.approx(10.0)  # population std of (15, 35)
    with pytest.raises(ValueError, match="different numbers of samples"):
        aggregate({"10": [1.0], "20": [1.0, 2.0]})


# ---------------------------------------------------------------- benchmarks

@pytest.mark.parametrize("name, count", [("dolly", 500), ("self_inst", 242), ("vicuna", 80), ("sinst", 1694),
                                         ("uinst", 1050)])
def test_registry_files_parse(shared_data, name, count):
    bench = load_benchmark(name, shared_data)
    assert len(bench.samples) == count
    assert [s.index for s in bench.samples] == list(range(count))
    with open(shared_data / REGISTRY[name][0], encoding="utf-8") as f:
        first = json.loads(f.readline())
    assert bench.samples[0].prompt == first["prompt"]
    refs = first["output"] if isinstance(first["output"], list) else [first["output"]]
    assert list(bench.samples[0].references) == refs
    assert all(s.prompt.endswith("### Response:\n") and s.references for s in bench.samples)
    if name == "sinst":
        assert max(len(s.references) for s in bench.samples) > 1
    assert len(load_benchmark(name, shared_data, max_samples=7).samples) == 7


def test_jsonl_with_field_map_and_rendered_prompts(tmp_path):
    path = tmp_path / "qa.jsonl"
    rows = [{"question": "Name a colour.", "context": "", "answers": ["red", "blue"]},
            {"question": "Add the numbers.", "context": "2 and 3", "answers": "5"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    bench = load_benchmark(str(path), tmp_path, {"instruction": "question", "input": "context", "output": "answers"})
    assert bench.name == "qa"
    assert bench.samples[0].prompt == render_prompt("Name a colour.")
    assert bench.samples[0].references == ("red", "blue")
    assert bench.samples[1].prompt == render_prompt("Add the numbers.", "2 and 3")
    assert "### Input:\n2 and 3" in bench.samples[1].prompt


@pytest.mark.parametrize("line, message", [
    ('{"instruction": "x", "output": "y"', "qa.jsonl:2: not valid JSON"),
    ('{"instruction": "x"}', "qa.jsonl:2: record has no field 'output'"),
    ('{"instruction": "x", "output": []}', "qa.jsonl:2: field 'output' must be a string or a non-empty list"),
    ('{"input": "x", "output": "y"}', "qa.jsonl:2: record has no field 'instruction' (nor a 'prompt'"),
    ('["x", "y"]', "qa.jsonl:2: expected one JSON object per line"),
])
def test_bad_records_name_file_line_and_field(tmp_path, line, message):
    path = tmp_path / "qa.jsonl"
    path.write_text('{"prompt": "p", "output": "o"}\n' + line + "\n")
    with pytest.raises(BenchmarkError, match=message.replace("(", r"\(").replace("[", r"\[")):
        read_jsonl(path, {})


def test_unknown_and_missing_benchmarks_are_clear(tmp_path, monkeypatch):
    with pytest.raises(BenchmarkError, match="unknown benchmark 'dolly2'"):
        load_benchmark("dolly2", tmp_path)
    with pytest.raises(BenchmarkError, match="dolly_test.jsonl not found; pass --data-dir"):
        load_benchmark("dolly", tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(BenchmarkError, match="offline"):
        load_benchmark("hub:nobody/no-such-set", tmp_path)


# ---------------------------------------------------------------- generation

def test_keyed_sampler_draws_from_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.2, 0.0])
    scores = probs.log().expand(4000, 4).contiguous()
    sampler = KeyedSampler(seed=10, indices=range(4000), prompt_width=5)
    out = sampler(torch.zeros(4000, 7, dtype=torch.long), scores.clone())
    tokens = out.argmax(-1)
    assert torch.equal((out == float("inf")).sum(-1), torch.ones(4000, dtype=torch.long))  # one pick per row
    freq = torch.bincount(tokens, minlength=4).double() / 4000
    assert torch.allclose(freq, probs.double(), atol=0.03)
    assert freq[3] == 0  # banned tokens are never drawn
    again = KeyedSampler(seed=10, indices=range(4000), prompt_width=5)(torch.zeros(4000, 7, dtype=torch.long),
                                                                      scores.clone())
    assert torch.equal(out, again)
    later = sampler(torch.zeros(4000, 8, dtype=torch.long), scores.clone()).argmax(-1)  # next step, new noise
    agree = (later == tokens).double().mean().item()
    assert agree == pytest.approx(0.38, abs=0.03)  # independent draws agree with probability sum(p^2) = 0.38
    assert keyed_uniform(10, 3, 2) != keyed_uniform(20, 3, 2) != keyed_uniform(10, 4, 2)


@pytest.fixture(scope="module")
def student(tiny_pair):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_pair.student, local_files_only=True).eval()
    return model, AutoTokenizer.from_pretrained(tiny_pair.student, local_files_only=True)


def test_prompt_truncation_keeps_bos_and_the_response_cue(student):
    _, tok = student
    text = "word " * 400 + "### Response:\n"
    full = tok(text)["input_ids"]
    (left,) = encode_prompts(tok, [(0, text)], 32, "left")
    (right,) = encode_prompts(tok, [(0, text)], 32, "right")
    assert len(left.ids) == len(right.ids) == 32 and left.truncated == right.truncated == len(full) - 32
    assert left.ids[0] == tok.bos_token_id and list(left.ids[1:]) == full[-31:]
    assert list(right.ids) == full[:32]
    (short,) = encode_prompts(tok, [(0, "hi")], 32)
    assert list(short.ids) == tok("hi")["input_ids"] and short.truncated == 0


def test_generation_is_reproducible_and_independent_of_batching(student):
    model, tok = student
    prompts = [(i, render_prompt(f"Write item {i}." + " more" * (3 * i))) for i in range(5)]
    encoded = encode_prompts(tok, prompts, 64)
    settings = GenerationSettings(max_new_tokens=5)

    def run(batch_size, seed):
        records = generate_all(model, tok, plan_batches(encoded, batch_size), settings, seed)
        return {r["index"]: r["generation"] for r in records}

    a = run(2, 10)
    assert sorted(a) == list(range(5))
    assert run(2, 10) == a
    assert run(1, 10) == a  # per-sample noise: batch-mates do not matter
    assert run(2, 20) != a
    assert run(1, None) == run(5, None)  # greedy
    assert plan_batches(encoded, 2)[0][0].index == 4  # longest first


# ---------------------------------------------------------------- end to end

def _tiny_sets(tmp_path: Path) -> list[str]:
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"instruction": f"Say {w}.", "output": [w, f"{w} {w}"]}) + "\n"
                          for w in ["yes", "no", "maybe", "red", "blue"]))
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"prompt": render_prompt(f"Tell me about {w}."), "output": f"{w} is fine"})
                            + "\n" for w in ["cats", "dogs", "rain"]))
    return [str(qa), str(chat)]


def _config(models, out, sets, **kw) -> EvalConfig:
    base = dict(models=[str(m) for m in models], benchmarks=sets, out=str(out), seeds=[10, 20], batch_size=2,
                max_new_tokens=4)
    return EvalConfig(**{**base, **kw})


def test_evaluate_writes_reports_and_resumes(tiny_pair, tmp_path, monkeypatch):
    sets = _tiny_sets(tmp_path)
    out = tmp_path / "out"
    import eval.runner as runner

    calls = []
    real = runner.generate_all

    def flaky(*args, **kwargs):  # the second generation pass dies, like a killed job
        calls.append(args[4])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "generate_all", flaky)
    with pytest.raises(KeyboardInterrupt):
        evaluate(_config([tiny_pair.student], out, sets), progress=False)
    qa_dir = out / "generations" / "student" / "qa"
    assert sorted(p.name for p in qa_dir.iterdir()) == ["identity.json", "seed10.jsonl"]  # no partial seed20

    calls.clear()
    monkeypatch.setattr(runner, "generate_all", lambda *a, **k: calls.append(a[4]) or real(*a, **k))
    scores = evaluate(_config([tiny_pair.student], out, sets), progress=False)
    assert calls == [20, 10, 20]  # qa seed 20, then chat's two seeds; qa seed 10 was kept

    rows = [json.loads(line) for line in (qa_dir / "seed20.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(5)) and {r["seed"] for r in rows} == {20}
    for r in rows:
        assert r["score"] == pytest.approx(reference_rouge(r["generation"], r["references"]))
        assert set(r) >= {"prompt", "references", "generation", "score", "seed", "index"}
    per_seed = {}
    for seed in (10, 20):
        lines = (qa_dir / f"seed{seed}.jsonl").read_text().splitlines()
        per_seed[seed] = sum(json.loads(x)["score"] for x in lines) / len(lines)
    qa = scores["results"]["student"]["qa"]
    assert qa["mean"] == pytest.approx((per_seed[10] + per_seed[20]) / 2)
    assert qa["per_seed"] == {"10": pytest.approx(per_seed[10]), "20": pytest.approx(per_seed[20])}
    assert json.loads((out / "scores.json").read_text())["results"]["student"]["chat"]["n_samples"] == 3
    table = (out / "scores.md").read_text()
    assert (out / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| model | qa | chat |" in table and f"| student | {qa['mean']:.2f} ± {qa['std']:.2f} |" in table

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard" / "student"))
    acc.Reload()
    assert acc.Scalars("rougeL/qa")[0].value == pytest.approx(qa["mean"], abs=1e-4)
    assert [e.step for e in acc.Scalars("rougeL_seed/qa")] == [10, 20]
    assert "samples/qa/text_summary" in acc.Tags()["tensors"]

    # A finished run is skipped; a second model is added to the same table and chart.
    calls.clear()
    both = evaluate(_config([tiny_pair.student, tiny_pair.teacher], out, sets), progress=False)
    assert calls == [10, 20, 10, 20]  # only the teacher generated
    assert set(both["results"]) == {"student", "teacher"}
    assert "| teacher |" in (out / "scores.md").read_text()

    # Changed settings must not mix with the results already there.
    with pytest.raises(ConfigError, match="differs in: max_new_tokens"):
        evaluate(_config([tiny_pair.student], out, sets, max_new_tokens=5), progress=False)
    seed10 = qa_dir / "seed10.jsonl"  # a hand-edited file no longer matches the set's references
    seed10.write_text("".join(seed10.read_text().splitlines(keepends=True)[:4]))
    with pytest.raises(ValueError, match="4 generations but qa has 5 samples"):
        evaluate(_config([tiny_pair.student], out, sets), progress=False)


def test_cli_config_and_names(tmp_path):
    yaml_path = tmp_path / "eval.yaml"
    yaml_path.write_text("benchmarks: [vicuna]\nseeds: [1, 2]\nbatch_size: 3\n")
    config = parse_config(EvalConfig, ["--config", str(yaml_path), "--model", "a", "b", "--max-samples", "4",
                                       "--greedy"])
    assert config.models == ["a", "b"] and config.benchmarks == ["vicuna"] and config.seeds == [1, 2]
    assert config.greedy and config.runs() == [None] and config.batch_size == 3 and config.max_samples == 4
    assert config.budget() == 256
    with pytest.raises(ConfigError, match="dtype"):
        parse_config(EvalConfig, ["--models", "a", "--dtype", "fp8"]).check()
    assert model_names(["/r/a/final", "/r/b/final", "/r/c"]) == ["a__final", "b__final", "c"]
    named = parse_config(EvalConfig, ["--models", "x/model", "y/model", "--names", "teacher", "student"])
    assert named.names == ["teacher", "student"]
    with pytest.raises(ConfigError, match="names"):
        parse_config(EvalConfig, ["--models", "a", "b", "--names", "only-one"]).check()


@pytest.mark.skipif(can_run_here(), reason="shown across two hosts by tests/test_multinode.py on this machine")
def test_two_ranks_equal_one_rank(tiny_pair, tmp_path):
    sets = _tiny_sets(tmp_path)
    one = evaluate(_config([tiny_pair.student], tmp_path / "one", sets), progress=False)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "stages.eval", "--models", str(tiny_pair.student), "--benchmarks", *sets,
           "--out", str(tmp_path / "two"),
           "--seeds", "10", "20", "--batch-size", "2", "--max-new-tokens", "4"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "scores.json").read_text())
    assert two["results"] == json.loads(json.dumps(one["results"]))
    for bench in ("qa", "chat"):
        for seed in (10, 20):
            rel = Path("generations", "student", bench, f"seed{seed}.jsonl")
            assert (tmp_path / "two" / rel).read_text() == (tmp_path / "one" / rel).read_text()
