"""`evaluate(config)`: generate, score and report, resumable, on one process or several ranks under torchrun.

Output layout (all under `config.out`):
    protocol.json                                  settings every result in this folder shares
    generations/<model>/<set>/identity.json        fingerprints of the model, tokenizer and data behind the files
    generations/<model>/<set>/seed<N>.jsonl        one line per sample (greedy.jsonl in greedy mode)
    scores.json, scores.md, scores.png, tensorboard/<model>/
A seed file appears only when complete (atomic rename), so a rerun regenerates exactly the missing ones.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from eval.benchmarks import Benchmark, load_benchmark
from eval.config import EvalConfig
from eval.generate import GenerationSettings, encode_prompts, generate_all, plan_batches
from eval.report import write_reports
from eval.scoring import aggregate, score_all
from pipeline.data.prompts import chat_prompt
from pipeline.data.tokenizer import load_tokenizer, tokenizer_fingerprint
from pipeline.errors import ConfigError, DataError
from pipeline.io import atomic_path, check_folder_is_ours, read_json, write_json_atomic
from pipeline.models import check_causal_lm_dir, load_model, quick_model_fingerprint
from pipeline.runtime import (
    barrier, broadcast_object, destroy_process_group, dist_info, gather_lists, init_process_group, pick_device,
    torch_dtype,
)

EVAL_FILES = {"protocol.json", "generations", "scores.json", "scores.md", "scores.png", "tensorboard"}


def model_names(paths: Sequence[str]) -> list[str]:
    """Per model, the shortest path suffix no other model shares ('a__final', 'b__final', 'c')."""
    parts = [Path(p).resolve().parts[1:] for p in paths]
    if len(set(parts)) != len(parts):
        raise ConfigError(f"models: the same directory is listed twice in {list(paths)}")
    names = []
    for i, p in enumerate(parts):
        k = 1
        while k < len(p) and any(q[-k:] == p[-k:] for j, q in enumerate(parts) if j != i):
            k += 1
        names.append("__".join(p[-k:]))
    if len(set(names)) != len(names):  # only when a folder's own name contains "__"
        names = ["__".join(p) for p in parts]
    return names


def load_model_and_tokenizer(model_dir: str, tokenizer_dir: str, dtype: torch.dtype, device: torch.device,
                             tokenizer: Any = None):
    tokenizer = tokenizer or load_tokenizer(tokenizer_dir or model_dir)
    model = load_model(model_dir, tokenizer=tokenizer, dtype=dtype)
    return model.to(device).eval(), tokenizer


def _run_file(folder: Path, seed: int | None) -> Path:
    return folder / ("greedy.jsonl" if seed is None else f"seed{seed}.jsonl")


def read_run(path: Path, bench: Benchmark) -> list[float]:
    """Scores of a finished seed file, after checking it covers exactly this set's samples in order."""
    scores = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            try:
                record = json.loads(line)
                scores.append(float(record["score"]))
                index = record["index"]
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise DataError(f"{path}:{lineno}: not a generation record ({e})") from e
            if index != lineno - 1:
                raise DataError(f"{path}:{lineno}: sample index {index}, expected {lineno - 1}")
    if len(scores) != len(bench.samples):
        raise DataError(
            f"{path}: {len(scores)} generations but {bench.name} has {len(bench.samples)} samples; "
            "generations and references must match (remove the file to regenerate it)"
        )
    return scores


def _check_record(path: Path, want: dict[str, Any], what: str, has_results: bool,
                  compare: dict[str, Any] | None = None) -> None:
    """Write `want` to `path`, after checking that results already there were made under the same values.

    `compare` (default: all of `want`) are the values that must match; with no results yet, nothing is at stake.
    """
    compare = want if compare is None else compare
    if path.exists() and has_results:
        have = read_json(path)
        diff = sorted(k for k in compare if have.get(k) != compare[k])
        if diff:
            raise ConfigError(
                f"{path}: earlier results in this folder were made with a different {what} "
                f"(differs in: {', '.join(diff)}); use another --out, or delete the old results"
            )
    write_json_atomic(path, want)


def _write_run(path: Path, bench: Benchmark, records: list[dict[str, Any]], seed: int | None,
               prompts: dict[int, str]) -> list[float]:
    records = sorted(records, key=lambda r: r["index"])
    if [r["index"] for r in records] != list(range(len(bench.samples))):
        raise RuntimeError(f"{path}: gathered {len(records)} generations for {len(bench.samples)} samples")
    scores = score_all([r["generation"] for r in records], [s.references for s in bench.samples])
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for r, s, score in zip(records, bench.samples, scores):
            row = {"index": s.index, "seed": seed, "prompt": prompts[s.index], "references": list(s.references),
                   "generation": r["generation"], "score": score, "new_tokens": r["new_tokens"],
                   "prompt_tokens": r["prompt_tokens"], "prompt_truncated": r["prompt_truncated"]}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return scores


def _summary(folder: Path, bench: Benchmark, config: EvalConfig) -> dict[str, Any]:
    """Aggregate a (model, set) pair from its seed files on disk: resumed and fresh seeds alike."""
    per_seed, tokens, truncated = {}, [], 0
    for seed in config.runs():
        path = _run_file(folder, seed)
        per_seed["greedy" if seed is None else str(seed)] = read_run(path, bench)
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f]
        tokens.extend(r["new_tokens"] for r in rows)
        truncated = sum(1 for r in rows if r["prompt_truncated"])  # the same prompts in every seed
    result = aggregate(per_seed)
    result.update(mode="greedy" if config.greedy else "sampling", source=bench.source,
                  mean_new_tokens=sum(tokens) / len(tokens), prompts_truncated=truncated)
    if bench.left_out:
        result["left_out"] = bench.left_out
    return result


def prompt_texts(samples: Sequence[Any], template: str, tokenizer: Any) -> list[tuple[int, str]]:
    """(index, prompt text) for one model: the Alpaca prompt, or the model's chat template around the
    instruction (around the given prompt text for records that carry only a prompt)."""
    if template == "alpaca":
        return [(s.index, s.prompt) for s in samples]
    return [(s.index, chat_prompt(tokenizer, s.instruction, s.input) if s.instruction else
             chat_prompt(tokenizer, s.prompt)) for s in samples]


def _plan(config: EvalConfig, names: list[str], benches: list[Benchmark], protocol: dict[str, Any],
          out: Path, tokenizers: dict[str, Any]) -> dict[str, dict[str, list[int | None]]]:
    """Check what is already in `out` against this run and list the passes still to generate, per model and set;
    the tokenizers it loads are kept in `tokenizers` by model dir (a 262,144-token one takes seconds to load)."""
    check_folder_is_ours(out, "eval", EVAL_FILES, "geokd.eval")
    _check_record(out / "protocol.json", protocol, "generation protocol", (out / "generations").exists())
    pending: dict[str, dict[str, list[int | None]]] = {}
    for model_dir, name in zip(config.models, names):
        tokenizer = tokenizers[model_dir] = load_tokenizer(config.tokenizer or model_dir)
        model_fp = quick_model_fingerprint(Path(model_dir))
        for bench in benches:
            folder = out / "generations" / name / bench.name
            identity = {"model_fingerprint": model_fp, "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
                        "data_fingerprint": bench.fingerprint, "n_samples": len(bench.samples)}
            # The model's path is recorded but not compared: a moved checkpoint is still the same model.
            _check_record(folder / "identity.json", {**identity, "model": str(Path(model_dir).resolve()),
                          "source": bench.source}, "model, tokenizer or data", any(folder.glob("*.jsonl")),
                          compare=identity)
            runs = [seed for seed in config.runs() if not _run_file(folder, seed).exists()]
            if runs:
                pending.setdefault(name, {})[bench.name] = runs
    return pending


def evaluate(config: EvalConfig, progress: bool = True) -> dict[str, Any]:
    """Score every model on every benchmark; returns scores.json's content (on rank 0; {} on other ranks)."""
    config.check()  # a library entry point too (`evaluate(EvalConfig(...))`), not only the stage's
    if not config.models:
        raise ConfigError("models: give at least one model directory (--models DIR [DIR ...])")
    for model_dir in config.models:
        check_causal_lm_dir(model_dir, need_tokenizer=not config.tokenizer)
    info = dist_info()
    started_dist = init_process_group(info.world_size)
    device = pick_device(info.local_rank)
    dtype = torch_dtype(config.dtype, device)
    out = Path(config.out)
    names = config.names or model_names(config.models)
    benches = [load_benchmark(s, config.data_dir, config.fields(), config.max_samples) for s in config.benchmarks]
    seen = [b.name for b in benches]
    for b in benches:
        if b.left_out and info.is_main:
            print(f"[eval] {b.name}: {b.left_out}; {len(b.samples)} scored")
    if len(set(seen)) != len(seen):
        raise ConfigError(f"benchmarks: two sets share a name in {seen}")
    settings = GenerationSettings(
        max_new_tokens=config.budget(), max_prompt_length=config.max_prompt_length,
        prompt_truncation=config.prompt_truncation, temperature=config.temperature, top_k=config.top_k,
        top_p=config.top_p, no_repeat_ngram_size=config.no_repeat_ngram_size,
    )
    protocol = {**settings.__dict__, "dtype": str(dtype).removeprefix("torch."), "max_samples": config.max_samples,
                "field_map": config.fields(), "metric": "rougeL F1 x100, rouge_score stemmer, max over references",
                "template": config.template,
                "prompt_encoding": "the tokenizer's default special tokens (OPT's start token prepended), as "
                                   "MiniLLM's evaluation encodes prompts" if config.template == "alpaca" else
                                   "each model's chat template around the instruction, its special tokens as "
                                   "written by the template (none added)",
                "prompt_truncation_rule": {"right": "the first max_prompt_length tokens are kept (MiniLLM)",
                                           "left": "leading special tokens and the last tokens are kept"}[
                    config.prompt_truncation]}
    del protocol["min_new_tokens"]

    t0 = time.time()
    # Rank 0 alone reads and writes the output folder; the other ranks learn the plan, or its error, from it.
    plan: dict[str, Any] = {}
    tokenizers: dict[str, Any] = {}
    if info.is_main:
        try:
            plan = {"pending": _plan(config, names, benches, protocol, out, tokenizers)}
        except (ConfigError, DataError, ValueError, OSError) as e:
            plan = {"error": e}
    plan = broadcast_object(plan, info.world_size)
    if "error" in plan:
        raise plan["error"]

    for model_dir, name in zip(config.models, names):
        pending = plan["pending"].get(name)
        if not pending:
            continue
        model, tokenizer = load_model_and_tokenizer(model_dir, config.tokenizer, dtype, device,
                                                    tokenizers.get(model_dir))
        for bench in benches:
            if bench.name not in pending:
                continue
            texts = prompt_texts(bench.samples, config.template, tokenizer)
            encoded = encode_prompts(tokenizer, texts,
                                     config.max_prompt_length, config.prompt_truncation,
                                     add_special_tokens=config.template == "alpaca")
            batches = plan_batches(encoded, config.batch_size)
            for seed in pending[bench.name]:
                label = "greedy" if seed is None else f"seed {seed}"
                t = time.time()
                mine = generate_all(model, tokenizer, batches, settings, seed, info.rank, info.world_size,
                                    progress=f"{name}/{bench.name} {label}" if progress and info.is_main else "")
                records = gather_lists(mine, info.world_size)
                if info.is_main:
                    scores = _write_run(_run_file(out / "generations" / name / bench.name, seed), bench, records,
                                        seed, dict(texts))
                    print(f"[eval] {name} / {bench.name} / {label}: ROUGE-L {sum(scores) / len(scores):.2f} "
                          f"({len(scores)} samples, {time.time() - t:.1f}s)", flush=True)
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    results: dict[str, Any] = {}
    if info.is_main:
        summaries = {name: {b.name: _summary(out / "generations" / name / b.name, b, config) for b in benches}
                     for name in names}
        model_paths = {name: str(Path(p).resolve()) for name, p in zip(names, config.models)}
        results = write_reports(out, summaries, model_paths, protocol, wall_s=time.time() - t0)
    barrier(info.world_size)
    if started_dist:
        destroy_process_group()
    return results
