"""Reports of an eval folder: scores.json, a markdown table, TensorBoard scalars and text, a bar chart
(sets x models, one bar per model per set).

scores.json accumulates: results for models or sets scored by earlier runs into the same folder (same protocol,
which the runner enforces) are kept, so evaluating one model after another builds up one comparison table.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from pipeline.io import atomic_path, read_json, write_json_atomic


def markdown_table(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    """Models as rows, sets as columns, cells 'mean ± std' of ROUGE-L over seeds."""
    benches: list[str] = []
    for per_bench in results.values():
        benches += [b for b in per_bench if b not in benches]
    lines = ["| model | " + " | ".join(benches) + " |", "| --- |" + " --- |" * len(benches)]
    for model, per_bench in results.items():
        cells = [f"{per_bench[b]['mean']:.2f} ± {per_bench[b]['std']:.2f}" if b in per_bench else "-"
                 for b in benches]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def bar_chart(results: dict[str, dict[str, dict[str, Any]]], path: Path,
              ylabel: str = "ROUGE-L (mean ± std over seeds)") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benches: list[str] = []
    for per_bench in results.values():
        benches += [b for b in per_bench if b not in benches]
    models = list(results)
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(benches) + 2), 4))
    for i, model in enumerate(models):
        xs = [j + (i - (len(models) - 1) / 2) * width for j in range(len(benches))]
        means = [results[model].get(b, {}).get("mean", 0.0) for b in benches]
        stds = [results[model].get(b, {}).get("std", 0.0) for b in benches]
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=model)
    ax.set_xticks(range(len(benches)))
    ax.set_xticklabels(benches)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize="small")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def _samples_markdown(path: Path, n: int = 3) -> str:
    parts = []
    with open(path, encoding="utf-8") as f:
        for line, _ in zip(f, range(n)):
            r = json.loads(line)
            parts.append(f"**sample {r['index']}** (ROUGE-L {r['score']:.1f})\n\n"
                         f"generation: {r['generation']!r}\n\nreference: {r['references'][0]!r}")
    return "\n\n---\n\n".join(parts)


def write_tensorboard(out: Path, results: dict[str, dict[str, dict[str, Any]]]) -> None:
    """One run per model: `rougeL/<set>` (mean over seeds), `rougeL_seed/<set>` (step = seed), sample text."""
    from torch.utils.tensorboard import SummaryWriter

    for model, per_bench in results.items():
        writer = SummaryWriter(log_dir=str(out / "tensorboard" / model))
        for bench, r in per_bench.items():
            writer.add_scalar(f"rougeL/{bench}", r["mean"], 0)
            for seed, value in r["per_seed"].items():
                writer.add_scalar(f"rougeL_seed/{bench}", value, int(seed) if seed.isdigit() else 0)
            first = next(iter(r["per_seed"]))
            run_file = out / "generations" / model / bench / (
                "greedy.jsonl" if first == "greedy" else f"seed{first}.jsonl")
            writer.add_text(f"samples/{bench}", _samples_markdown(run_file), 0)
        writer.add_text("scores", markdown_table({model: per_bench}), 0)
        writer.close()


def write_reports(out: Path, results: dict[str, dict[str, dict[str, Any]]], model_paths: dict[str, str],
                  protocol: dict[str, Any], wall_s: float) -> dict[str, Any]:
    """Merge this run's results into scores.json and rewrite the table and chart; returns the merged scores."""
    scores_path = out / "scores.json"
    merged: dict[str, Any] = {"protocol": protocol, "models": {}, "results": {}}
    if scores_path.exists():
        previous = read_json(scores_path)
        merged["models"].update(previous.get("models", {}))
        for model, per_bench in previous.get("results", {}).items():
            merged["results"].setdefault(model, {}).update(per_bench)
    merged["models"].update(model_paths)
    for model, per_bench in results.items():
        merged["results"].setdefault(model, {}).update(per_bench)
    merged["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    merged["last_run_wall_s"] = round(wall_s, 2)
    write_json_atomic(scores_path, merged)

    table = markdown_table(merged["results"])
    runs = sorted({f"{r['mode']} ({', '.join(r['per_seed'])})" for per_bench in merged["results"].values()
                   for r in per_bench.values()})
    note = (f"\nROUGE-L (x100), mean ± std (population) over {'; '.join(runs)}; "
            f"max {protocol['max_new_tokens']} new tokens, prompts <= {protocol['max_prompt_length']} tokens, "
            f"no_repeat_ngram_size {protocol['no_repeat_ngram_size']}, {protocol['dtype']}"
            f"{', first %d samples per set' % protocol['max_samples'] if protocol['max_samples'] else ''}.\n")
    with atomic_path(out / "scores.md") as tmp:
        tmp.write_text(table + note, encoding="utf-8")
    # Written for one model too: the "done" check wants a picture of a single model's scores.
    bar_chart(merged["results"], out / "scores.png")
    write_tensorboard(out, results)
    return merged
