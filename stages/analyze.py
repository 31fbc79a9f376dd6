"""Stage `analyze`: a teacher's feature geometry on a prepared split, per layer, with and without the token rule.

    ./run.sh analyze --teacher models/smollm2 --data runs/dolly --split valid --layers 5 10 20 30 --out runs/an
    ./run.sh analyze --features STORE --data runs/dolly --out runs/an       (a cached store instead of the teacher)

Writes OUT/analysis.json (per layer: top1_energy under the default rule, top1_energy_all_tokens, the token-norm
profile, the outlier tokens/positions/channels the rule leaves out, k for 90/99/99.9% energy, the Procrustes
floor for student widths 64 .. d, each with and without the outliers), OUT/analysis.md (a table) and
OUT/analysis.png (a panel per quantity, a line per layer). It tells which layers to map and how wide a student
must be: a floor near 0 over all tokens but far from 0 under the rule means one token's spike owns the layer.
The work: pipeline/features/analysis.py.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from pipeline.config import stage_main
from pipeline.data.prepared import PreparedData, collate_items
from pipeline.errors import ConfigError
from pipeline.geometry import DEFAULT_TOKEN_RULE
from pipeline.features.analysis import analyze_batches
from pipeline.features.store import FeatureDataset, FeatureStore, collate_with_features
from pipeline.io import atomic_dir, write_json_atomic
from pipeline.models import capture_hidden_states, model_shape
from pipeline.models.encoders import load_classifier
from pipeline.models.teacher import load_frozen_teacher
from pipeline.runtime import pick_device


@dataclass
class AnalyzeConfig:
    data: str = field(default="", metadata={"help": "prepared data folder"})
    split: str = field(default="valid", metadata={"help": "which prepared split"})
    teacher: str = field(default="", metadata={"help": "teacher model dir (or give --features)"})
    features: str = field(default="", metadata={"help": "a feature store of that split, instead of the teacher"})
    layers: list[int] = field(default_factory=list, metadata={
        "help": "hidden states to analyze (default: the store's, or 6 spread over the teacher's depth)"})
    samples: int = field(default=200, metadata={"help": "samples of the split to use at most (0 = all)"})
    micro_batch_size: int = field(default=8, metadata={"help": "samples per micro-batch, as in training"})
    out: str = field(default="", metadata={"help": "report folder to create"})

    def check(self) -> None:
        if not self.data or not self.out or bool(self.teacher) == bool(self.features):
            raise ConfigError("analyze needs --data, --out, and one of --teacher DIR or --features STORE")
        if Path(self.out).exists():
            raise ConfigError(f"--out {self.out} exists; analyze never overwrites a folder: choose another --out")
        if self.micro_batch_size < 1 or self.samples < 0:
            raise ConfigError("--micro_batch_size must be >= 1 and --samples >= 0")


def teacher_batches(cfg: AnalyzeConfig, tokens: Any, tok: Any, layers: list[int], task: dict | None
                    ) -> Iterator[tuple]:
    if task is not None:  # an encoder on a classification task: a base encoder will do, its head is not used
        device = pick_device()
        model = load_classifier(cfg.teacher, task["labels"], option="teacher").to(device).eval()
    else:
        model, device = load_frozen_teacher(cfg.teacher, tokenizer=tok, dtype=torch.float32, device=pick_device())
    pad_id = tok.pad_token_id
    for positions in _chunks(len(tokens), cfg):
        batch = collate_items([tokens[p] for p in positions], pad_id)
        types = batch.get("token_type_ids")
        with torch.no_grad():
            hidden = capture_hidden_states(model, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                           layers, token_type_ids=None if types is None else types.to(device))
        yield {k: v.cpu() for k, v in hidden.items()}, batch["attention_mask"], batch["input_ids"]


def store_batches(cfg: AnalyzeConfig, tokens: Any, pad_id: int, layers: list[Any]) -> Iterator[tuple]:
    # Channels are reported, so a rotated (quantized) store is read back in the teacher's own channels.
    joined = FeatureDataset(tokens, FeatureStore(cfg.features, unrotate=True), layers)
    for positions in _chunks(len(tokens), cfg):
        batch = collate_with_features([joined[p] for p in positions], pad_id, torch.float32)
        yield batch["features"], batch["attention_mask"], batch["input_ids"]


def _chunks(n: int, cfg: AnalyzeConfig) -> Iterator[range]:
    n = min(n, cfg.samples) if cfg.samples else n
    for a in range(0, n, cfg.micro_batch_size):
        yield range(a, min(n, a + cfg.micro_batch_size))


def markdown(report: dict[str, Any]) -> str:
    widths = list(next(iter(report.values()))["procrustes_floor"]["rule"])
    head = ("| layer | centred norm / median: p99 / max | first-token centred norm / median | rows left out | "
            "top-1 energy (rule / all) | k for 90/99/99.9% (rule) | k for 99% (all) | "
            + " | ".join(f"D_P floor w={w} (rule / all)" for w in widths) + " |")
    lines = [head, "|" + " --- |" * (7 + len(widths))]
    for layer, r in report.items():
        k = r["k_for_energy"]
        floors = " | ".join(f"{r['procrustes_floor']['rule'][w]:.3f} / {r['procrustes_floor']['all_tokens'][w]:.3f}"
                            for w in widths)
        first = r["first_token_norm_ratio"]
        lines.append(f"| {layer} | {r['norm_ratio_quantiles']['0.99']:.2f} / {r['max_norm_ratio']:.1f} | "
                     f"{first:.1f} | {r['outlier_tokens']} ({100 * r['outlier_fraction']:.2f}%) | "
                     f"{r['top1_energy']:.3f} / {r['top1_energy_all_tokens']:.3f} | "
                     f"{k['0.9']} / {k['0.99']} / {k['0.999']} | {r['k_for_energy_all_tokens']['0.99']} | {floors} |")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 4, figsize=(20, 4.5))
    for layer, r in report.items():
        pos = sorted(r["norm_ratio_by_position"], key=int)
        ax[0].plot([int(p) for p in pos], [r["norm_ratio_by_position"][p] for p in pos], label=f"layer {layer}")
        for name, style in (("rule", "-"), ("all_tokens", ":")):
            s = r["spectrum"][name]
            ax[1].plot(range(1, len(s) + 1), s, style, color=ax[0].lines[-1].get_color())
            fl = r["procrustes_floor"][name]
            ax[2].plot([int(w) for w in fl], list(fl.values()), style + "o", color=ax[0].lines[-1].get_color())
    names = list(report)
    x = range(len(names))
    ax[3].bar([i - 0.2 for i in x], [report[n]["top1_energy"] for n in names], 0.4, label="default rule")
    ax[3].bar([i + 0.2 for i in x], [report[n]["top1_energy_all_tokens"] for n in names], 0.4, label="all tokens")
    ax[3].set_xticks(list(x), [f"layer {n}" for n in names])
    titles = ["centred token norm / micro-batch median, by position",
              "energy share per direction (solid: rule, dotted: all)",
              "D_P floor vs student width (solid: rule, dotted: all)", "top direction's share of the energy"]
    for a, t in zip(ax, titles):
        a.set_title(t, fontsize=10)
    ax[0].set_yscale("log"), ax[1].set_yscale("log"), ax[1].set_xscale("log"), ax[2].set_xscale("log", base=2)
    ax[0].set_xlabel("position"), ax[1].set_xlabel("direction"), ax[2].set_xlabel("student width")
    ax[0].legend(fontsize=8), ax[3].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run(cfg: AnalyzeConfig) -> None:
    out = Path(cfg.out)
    data = PreparedData(cfg.data)
    tok = data.tokenizer()
    tokens = data.split(cfg.split)
    if cfg.features:
        store = FeatureStore(cfg.features)
        layers = list(cfg.layers) or [x for x in store.layers if x != "final"]
        missing = [x for x in layers if x not in store.layers]
        if missing:
            raise ConfigError(f"--layers {missing}: not in {cfg.features} (it has {store.layers})")
        batches = store_batches(cfg, tokens, tok.pad_token_id, layers)
    else:
        depth = model_shape(cfg.teacher, "teacher", classifier=data.task is not None)[1]
        layers = list(cfg.layers) or sorted({max(1, round(depth * f)) for f in (1 / 6, 1 / 3, 1 / 2, 2 / 3, 5 / 6, 1)})
        bad = [x for x in layers if not 0 <= x <= depth]
        if bad:
            raise ConfigError(f"--layers {bad}: the teacher's hidden states are 0..{depth}")
        batches = teacher_batches(cfg, tokens, tok, layers, data.task)
    report = analyze_batches(batches, layers, lambda i: tok.decode([i]))
    with atomic_dir(out) as tmp:
        write_json_atomic(tmp / "analysis.json", {"source": cfg.features or cfg.teacher, "data": cfg.data,
                                                   "split": cfg.split, "samples": cfg.samples,
                                                   "micro_batch_size": cfg.micro_batch_size,
                                                   "token_rule": str(DEFAULT_TOKEN_RULE), "layers": report})
        (tmp / "analysis.md").write_text(markdown(report))
        plot(report, tmp / "analysis.png")
    print(markdown(report))
    print(f"[analyze] wrote {out}/analysis.json, analysis.md, analysis.png")


def main(argv: list[str] | None = None) -> int:
    return stage_main("analyze", AnalyzeConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
