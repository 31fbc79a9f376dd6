"""Where ordinary tokens end and massive rows begin, per layer, for real teachers of two families (BENCHMARKS.md: "The
token rule on two families").

    python bench/token_rule_families.py OUT.json NAME=PREPARED:MODEL [NAME=PREPARED:MODEL ...]

Every hidden state of every layer, over PREPARED's valid split in micro-batches of 8 (as training reads them): each
valid row's norm over its micro-batch's median row norm, measured two ways, "raw" (the row as it is) and "centred"
(the row minus the micro-batch's mean row, as the distances centre rows; the token rule's measure). Reported per
layer: the first position's ratios (min, median) and the other positions' (p99.9, max), so a threshold separates
the two when it lies between the others' max and the first rows' min.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline.data.prepared import PreparedData, collate_batch  # noqa: E402
from pipeline.geometry import centred_norm_ratios  # noqa: E402
from pipeline.models import capture_hidden_states, load_model, num_decoder_layers  # noqa: E402


def ratios(h: torch.Tensor, mask: torch.Tensor, centred: bool) -> torch.Tensor:
    """Each valid row's norm over the micro-batch median: the token rule's own measure, or the raw norm."""
    if centred:
        return centred_norm_ratios(h, mask)
    norms = h.float().norm(dim=-1)
    return torch.where(mask, norms / norms[mask].median(), torch.zeros_like(norms))


@torch.no_grad()
def profile(prepared: Path, model_dir: Path) -> dict:
    model = load_model(str(model_dir), dtype=torch.float32).eval()
    n = num_decoder_layers(model)
    tokens = PreparedData(prepared).split("valid")
    pad = PreparedData(prepared).tokenizer().pad_token_id or 0
    seen: dict[int, dict[str, dict[str, list[torch.Tensor]]]] = {
        i: {kind: {"first": [], "other": []} for kind in ("raw", "centred")} for i in range(1, n + 1)}
    for a in range(0, len(tokens), 8):
        batch = collate_batch([tokens[p] for p in range(a, min(len(tokens), a + 8))], pad)
        mask = batch["attention_mask"].bool()
        hs = capture_hidden_states(model, batch["input_ids"], batch["attention_mask"], list(range(1, n + 1)))
        first = torch.zeros_like(mask)
        first[:, 0] = True  # right-padded: position 0 is each sample's first token
        for i, h in hs.items():
            for kind in ("raw", "centred"):
                r = ratios(h.float(), mask, kind == "centred")
                seen[i][kind]["first"].append(r[first & mask])
                seen[i][kind]["other"].append(r[~first & mask])
    layers = {}
    for i, kinds in seen.items():
        layers[i] = {}
        for kind, parts in kinds.items():
            f, o = torch.cat(parts["first"]), torch.cat(parts["other"])
            layers[i][kind] = {"first_min": float(f.min()), "first_median": float(f.median()),
                               "other_p999": float(torch.quantile(o, 0.999)), "other_max": float(o.max()),
                               "other_above_4": int((o > 4).sum()), "first_at_most_4": int((f <= 4).sum())}
    return {"model": str(model_dir), "layers": n, "samples": len(tokens),
            "tokens": int(sum(len(tokens[p]["input_ids"]) for p in range(len(tokens)))), "by_layer": layers}


def main(out: Path, specs: list[str]) -> None:
    report = {}
    for spec in specs:
        name, _, paths = spec.partition("=")
        prepared, _, model = paths.partition(":")
        report[name] = profile(Path(prepared), Path(model))
        for i, kinds in report[name]["by_layer"].items():
            r, c = kinds["raw"], kinds["centred"]
            print(f"{name} layer {i:2d}  raw: first {r['first_min']:7.1f}-{r['first_median']:7.1f}  others max "
                  f"{r['other_max']:5.2f}   centred: first {c['first_min']:7.1f}-{c['first_median']:7.1f}  others "
                  f"max {c['other_max']:5.2f}", flush=True)
    out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
