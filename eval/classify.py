"""Scoring classifiers: each model over a prepared classification split (./run.sh prepare --task), with the task's
own metric (CoLA: Matthews correlation; RTE: accuracy; MRPC: F1 and accuracy), x100 as GLUE tables print them.

The same outputs as the instruction-following eval (scores.json, scores.md, scores.png), one column per task, and
predictions/<model>.json (each example's predicted and gold class); a classifier's prediction is deterministic, so
there are no seeds, and a rerun rescores (seconds) and merges.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from eval.metrics import PRIMARY, task_scores
from eval.report import bar_chart
from pipeline.data.prepared import PreparedData, collate_classification
from pipeline.errors import ConfigError
from pipeline.io import atomic_path, check_folder_is_ours, read_json, write_json_atomic
from pipeline.models import quick_model_fingerprint
from pipeline.models.encoders import load_frozen_classifier

FILES = {"scores.json", "scores.md", "scores.png", "predictions"}


@torch.no_grad()
def predict(model: Any, dataset: Any, pad_id: int, batch_size: int, device: torch.device) -> list[int]:
    """Predicted class of every sample, in dataset order (length-sorted batches: a result never depends on its
    batch-mates, since padding is masked)."""
    order = sorted(range(len(dataset)), key=lambda i: int(dataset.lengths[i]))
    preds = [0] * len(dataset)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        batch = collate_classification([dataset[i] for i in chunk], pad_id)
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                       token_type_ids=batch["token_type_ids"].to(device)).logits
        for i, p in zip(chunk, logits.argmax(-1).tolist()):
            preds[i] = p
    return preds


def score_classifiers(models: list[str], names: list[str], data_dir: str, split: str, out: str,
                      batch_size: int = 32) -> dict[str, Any]:
    """Score every model dir on `split` of the prepared data; write and return the merged scores.json."""
    data = PreparedData(data_dir)
    task = data.task
    if task is None:
        raise ConfigError(f"--data {data_dir} is instruction data; classifiers are scored on data prepared with "
                          f"--task (instruction following is scored with --benchmarks)")
    dataset, tok = data.split(split), data.tokenizer()
    gold = [int(dataset[i]["label"]) for i in range(len(dataset))]
    out_dir = Path(out)
    check_folder_is_ours(out_dir, "eval", FILES, "geokd.eval")
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    paths: dict[str, str] = {}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for model_dir, name in zip(models, names):
        model = load_frozen_classifier(model_dir, task["labels"], dtype=torch.float32, device=device, option="models")
        started = time.perf_counter()
        preds = predict(model, dataset, tok.pad_token_id, batch_size, device)
        scores = task_scores(task["metric"], preds, gold)
        results[name] = {task["name"]: {
            "mean": scores[PRIMARY[task["metric"]]], "std": 0.0, "n_samples": len(gold), "mode": "classification",
            "per_seed": [], "metric": PRIMARY[task["metric"]], "scores": scores, "split": split,
            "wall_s": round(time.perf_counter() - started, 2)}}
        paths[name] = str(Path(model_dir).resolve())
        # Per-example predictions: what a paired bootstrap over examples needs (the study's), and an error analysis.
        write_json_atomic(out_dir / "predictions" / f"{name}.json", {
            "task": task["name"], "split": split, "labels": task["labels"], "sample_ids":
            [int(dataset.sample_ids[i]) for i in range(len(dataset))], "predictions": preds, "gold": gold})
        print(f"[eval] {name}: {task['name']} {split} " + ", ".join(f"{k} {v:.2f}" for k, v in scores.items()))
    return write_classification_reports(out_dir, results, paths, {"data": str(Path(data_dir).resolve()),
                                                                  "data_fingerprint": data.fingerprint,
                                                                  "split": split, "task": task},
                                        {p: quick_model_fingerprint(Path(p)) for p in paths.values()})


def write_classification_reports(out: Path, results: dict[str, Any], paths: dict[str, str], protocol: dict[str, Any],
                                 fingerprints: dict[str, str]) -> dict[str, Any]:
    merged: dict[str, Any] = {"protocol": protocol, "models": {}, "results": {}, "fingerprints": {}}
    if (out / "scores.json").is_file():
        previous = read_json(out / "scores.json")
        if previous.get("protocol", {}).get("data_fingerprint") == protocol["data_fingerprint"]:
            for key in ("models", "results", "fingerprints"):
                merged[key].update(previous.get(key, {}))
    merged["models"].update(paths)
    merged["results"].update(results)
    merged["fingerprints"].update(fingerprints)
    merged["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    write_json_atomic(out / "scores.json", merged)
    metrics: list[str] = []
    for per_task in merged["results"].values():
        for r in per_task.values():
            metrics += [m for m in r["scores"] if m not in metrics]
    lines = ["| model | task | " + " | ".join(metrics) + " | n |", "| --- | --- |" + " --- |" * (len(metrics) + 1)]
    for model, per_task in merged["results"].items():
        for task_name, r in per_task.items():
            cells = [f"{r['scores'][m]:.2f}" if m in r["scores"] else "-" for m in metrics]
            lines.append(f"| {model} | {task_name} | " + " | ".join(cells) + f" | {r['n_samples']} |")
    note = (f"\n{protocol['task']['name']} ({protocol['split']} split of {protocol['data']}), x100; primary metric "
            f"{PRIMARY[protocol['task']['metric']]}.\n")
    with atomic_path(out / "scores.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n" + note, encoding="utf-8")
    bar_chart(merged["results"], out / "scores.png", ylabel=f"{PRIMARY[protocol['task']['metric']]} (x100)")
    return merged
