"""Which rows an encoder's feature distances compare: every token of the batch (`--feature_rows tokens`) or one
[CLS] row per example (`cls`). Pairs, by training seed, the KD + feature-loss runs of a GLUE study (tokens, the
default) with a second study of the same teacher, student cut and seeds run with `--grid feature_rows=cls`:

    ./run.sh study --task cola --teacher runs/glue/cola_study/teacher/model --out runs/glue/cola_rows \\
        --methods kd kd_procrustes --grid feature_rows=cls --jobs 2
    .venv/bin/python bench/glue_rows.py runs/glue/cola_study runs/glue/cola_rows

Prints, per method, the task metric and the validation D_P / D_FG / D_CKA (measured over every token, whatever
the run trained on) for both row choices, and the paired difference cls - tokens with its t-test.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.experiments.stats import mean_ci, paired_t  # noqa: E402


def main(tokens_study: str, cls_study: str) -> None:
    a = json.loads(Path(tokens_study, "study.json").read_text())
    b = json.loads(Path(cls_study, "study.json").read_text())
    if a["seeds"] != b["seeds"]:
        raise SystemExit(f"the studies' seeds differ ({a['seeds']} vs {b['seeds']}): nothing to pair")
    fmt = lambda e: f"{e.mean:.2f} [{e.low:.2f}, {e.high:.2f}]"  # noqa: E731
    print(f"| method | {a['metric']} tokens | {a['metric']} cls | cls - tokens | paired t p | D_P tokens | D_P cls |")
    print("|---|---|---|---|---|---|---|")
    for name, row in b["methods"].items():
        method = name.split("__")[0]
        if "__feature_rowscls" not in name or method not in a["methods"]:
            continue
        tok, cls = a["methods"][method]["score_per_seed"], row["score_per_seed"]
        diff = [c - t for c, t in zip(cls, tok)]
        dp = lambda r: "-" if r["D_P"] is None else f"{r['D_P']['mean']:.4f}"  # noqa: E731
        print(f"| {method} | {fmt(mean_ci(tok))} | {fmt(mean_ci(cls))} | {fmt(mean_ci(diff))} | "
              f"{paired_t(diff):.3g} | {dp(a['methods'][method])} | {dp(row)} |")


if __name__ == "__main__":
    main(*sys.argv[1:3])
