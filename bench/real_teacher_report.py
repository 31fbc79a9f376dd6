"""The real-teacher benchmark's table (bench/real_teacher.sh): ROUGE-L from its eval folders, and for every student
(the layer-subset init and each trained one) the same validation measures computed here the same way: response-
token CE and D_P / D_FG / D_CKA at the mapped layers against the cached teacher, under the default token rule
and over all tokens.

    python bench/real_teacher_report.py runs/real_bench      -> report.md, report.json in that folder
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.data.prepared import PreparedData  # noqa: E402
from pipeline.features.store import FeatureDataset, FeatureStore, collate_with_features  # noqa: E402
from pipeline.geometry import ALL_TOKENS, DEFAULT_TOKEN_RULE, cka_distance, feature_gram_distance  # noqa: E402
from pipeline.geometry import procrustes_distance  # noqa: E402
from pipeline.models import capture_hidden_states, load_model  # noqa: E402
from pipeline.experiments.stats import paired_bootstrap  # noqa: E402
from pipeline.experiments.steps import per_prompt_scores  # noqa: E402

PAIRS = [(4, 20), (6, 30)]
STUDENTS = {"init": "student_init", "sft": "sft/model", "kd": "kd/model", "kd_procrustes": "kd_procrustes/model",
            "kd_procrustes_all": "kd_procrustes_all/model"}
LABELS = {"init": "6-of-30-layer student, untrained", "sft": "SFT", "kd": "KD", "kd_procrustes":
          "KD + Procrustes, default rule (outliers:4)", "kd_procrustes_all": "KD + Procrustes, all tokens"}


@torch.no_grad()
def valid_measures(model_dir: Path, data: PreparedData, store: FeatureStore, pad_id: int) -> dict[str, float]:
    model = load_model(str(model_dir)).eval()
    tokens = data.split("valid")
    joined = FeatureDataset(tokens, store, [t for _, t in PAIRS])
    sums: dict[str, float] = {}
    ce_sum, ce_n, batches = 0.0, 0, 0
    for a in range(0, len(tokens), 8):
        batch = collate_with_features([joined[p] for p in range(a, min(len(tokens), a + 8))], pad_id, torch.float32)
        mask = batch["attention_mask"].bool()
        hidden = capture_hidden_states(model, batch["input_ids"], batch["attention_mask"], [s for s, _ in PAIRS],
                                       final=True)
        logits = model.get_output_embeddings()(hidden["final"][:, :-1]).float()
        labels = batch["labels"][:, 1:]
        ce_sum += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                          ignore_index=-100, reduction="sum"))
        ce_n += int((labels != -100).sum())
        for s, t in PAIRS:
            teacher = batch["features"][t]
            for suffix, rule in (("", DEFAULT_TOKEN_RULE), ("_all", ALL_TOKENS)):
                for name, fn in (("D_P", procrustes_distance), ("D_FG", feature_gram_distance),
                                 ("D_CKA", cka_distance)):
                    key = f"{name}{suffix}/s{s}_t{t}"
                    sums[key] = sums.get(key, 0.0) + float(fn(hidden[s], teacher, mask, squared=False, rule=rule))
        batches += 1
    out = {k: v / batches for k, v in sums.items()}
    out["valid_ce"] = ce_sum / ce_n
    return out


def train_minutes(root: Path) -> dict[str, float]:
    text = (root / "logs/steps.log").read_text() if (root / "logs/steps.log").is_file() else ""
    return {m.group(1): int(m.group(2)) / 60 for m in re.finditer(r"done train_(\w+) in (\d+) s", text)}


def main(root: Path) -> None:
    data = PreparedData(root / "dolly")
    tok = data.tokenizer()
    store = FeatureStore(root / "feat_valid")
    teacher = json.loads((root / "eval_teacher/scores.json").read_text())["results"]["teacher"]
    students = json.loads((root / "eval_students/scores.json").read_text())["results"]
    minutes = train_minutes(root)
    seeds = [int(x) for x in students["kd"]["dolly"]["per_seed"]]
    prompts = {n: np.asarray([per_prompt_scores(root / "eval_students", n, "dolly", seeds)]) for n in STUDENTS}
    rows = {}
    for name, rel in STUDENTS.items():
        diff, p = paired_bootstrap(prompts[name], prompts["kd"])
        rows[name] = {"rouge_l_dolly": students[name]["dolly"]["mean"],
                      "n_prompts": students[name]["dolly"]["n_samples"],
                      "vs_kd": {"mean": diff.mean, "low": diff.low, "high": diff.high, "bootstrap_p": p},
                      "train_minutes": minutes.get(name), **valid_measures(root / rel, data, store, tok.pad_token_id)}
    report = {"teacher": {k: {"rouge_l": v["mean"], "n_prompts": v["n_samples"], "mean_new_tokens":
                              v.get("mean_new_tokens")} for k, v in teacher.items()}, "students": rows}
    chat = root / "eval_teacher_chat/scores.json"
    if chat.is_file():
        v = json.loads(chat.read_text())["results"]["teacher"]["dolly"]
        report["teacher"]["dolly, chat template"] = {"rouge_l": v["mean"], "n_prompts": v["n_samples"],
                                                     "mean_new_tokens": v.get("mean_new_tokens")}
    (root / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["| teacher: SmolLM2-135M-Instruct | " + " | ".join(report["teacher"]) + " |",
             "| --- |" + " --- |" * len(report["teacher"]),
             "| ROUGE-L (prompts) | " + " | ".join(f"{v['rouge_l']:.2f} ({v['n_prompts']})"
                                                  for v in report["teacher"].values()) + " |", ""]
    keys = [f"{m}{sfx}/s{s}_t{t}" for s, t in PAIRS for m in ("D_P", "D_FG", "D_CKA") for sfx in ("", "_all")]
    lines.append("| student | Dolly ROUGE-L | vs KD, paired over prompts [95% CI], p | valid CE | "
                 + " | ".join(keys) + " | train min |")
    lines.append("| --- |" + " --- |" * (len(keys) + 4))
    for name, r in rows.items():
        mins = f"{r['train_minutes']:.1f}" if r["train_minutes"] else "-"
        d = r["vs_kd"]
        vs = "-" if name == "kd" else f"{d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}], {d['bootstrap_p']:.2f}"
        lines.append(f"| {LABELS[name]} | {r['rouge_l_dolly']:.2f} | {vs} | {r['valid_ce']:.3f} | "
                     + " | ".join(f"{r[k]:.3f}" for k in keys) + f" | {mins} |")
    (root / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/real_bench"))
