"""Which quantized store to build: element error, token-rule flips, distance changes and KD drift per option, on a
real teacher's stored features (BENCHMARKS.md, "A quantized feature store").

    python bench/quant_options.py BF16_STORE PREPARED [--student DIR] [--out FILE.json]

BF16_STORE: a bf16 store of PREPARED's valid split with layers and `final` (e.g. layers 10 20 --final). For each
option (kind, group, rotation, mean removal) and layer, over micro-batches of 8 samples as training sees them:
  - bytes per row against bf16's 2 d;
  - relative Frobenius error of all rows and of the rows the token rule keeps (the rows the distances compare),
    and the worst relative error of a massive row (centred ratio > 4);
  - token-rule flips: rows the default rule (centred norm > 4x the median) decides differently;
  - the largest relative change over micro-batches of D_P / D_FG / CKA for a "close" student (the teacher's rows
    rotated into half the width plus 5% noise) and a "far" one (a real layer-cut student's hidden states,
    --student: layers 0,9,19,29 of SmolLM2, whose hidden states 2 and 3 stand for the teacher's 10 and 20);
  - for `final`: the KL(teacher || dequantized teacher) of the next-token distributions through the stored head;
  - the empirical entropy of the codes (bits per code): what an entropy coder could take off on top.
Mean removal subtracts a per-channel mean of the store's rows that the token rule keeps (in-sample, so slightly
optimistic) before quantizing and adds it back after.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline.data.prepared import PreparedData  # noqa: E402
from pipeline.features.quant import QuantSpec, dequantize, quantize, rotation_matrix  # noqa: E402
from pipeline.features.store import FeatureDataset, FeatureStore, collate_with_features  # noqa: E402
from pipeline.geometry import (  # noqa: E402
    DEFAULT_TOKEN_RULE, centred_norm_ratios, cka_distance, feature_gram_distance, procrustes_distance,
)
from pipeline.models import capture_hidden_states, load_model  # noqa: E402

OPTIONS = [  # (name, kind, group, rotate, remove mean)
    ("int8 g64", "int8", 64, False, False), ("int8 row", "int8", 0, False, False),
    ("int8 g64 rot", "int8", 64, True, False), ("int8 row rot", "int8", 0, True, False),
    ("fp8 g64", "fp8", 64, False, False), ("fp8 g64 rot", "fp8", 64, True, False),
    ("int4 g32", "int4", 32, False, False), ("int4 g32 rot", "int4", 32, True, False),
    ("int4 g32 rot mean", "int4", 32, True, True), ("int4 g64 rot", "int4", 64, True, False),
    ("int4 row rot", "int4", 0, True, False), ("int8 g64 rot mean", "int8", 64, True, True),
]


def entropy_bits(codes: torch.Tensor, kind: str) -> float:
    if kind == "int4":
        codes = torch.stack([codes & 0xF, codes >> 4], -1)
    vals = codes.reshape(-1).view(torch.uint8).long()
    p = torch.bincount(vals, minlength=256).double()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log2()).sum())


@torch.no_grad()
def main(store_dir: Path, prepared: Path, student_dir: Path | None, out: Path | None) -> None:
    torch.manual_seed(0)
    store = FeatureStore(store_dir)
    tokens = PreparedData(prepared).split(store.split)
    layers = [x for x in store.layers]
    joined = FeatureDataset(tokens, store, layers)
    batches = [collate_with_features([joined[p] for p in range(a, min(len(tokens), a + 8))], 0, torch.float32)
               for a in range(0, len(tokens), 8)]
    head = store.lm_head() if "final" in store.layers else None
    student = load_model(str(student_dir)).eval() if student_dir else None
    result: dict[str, dict] = {}
    far_cache: dict[tuple[int, int], torch.Tensor] = {}  # (batch, student layer) -> hidden states, run once
    for layer in layers:
        d = batches[0]["features"][layer].shape[-1]
        q_rot = rotation_matrix(d, 0)[0]
        proj = torch.linalg.qr(torch.randn(d, d // 2, generator=torch.Generator().manual_seed(1)))[0]
        all_rows = torch.cat([b["features"][layer][b["attention_mask"].bool()] for b in batches])
        kept = torch.cat([b["features"][layer][DEFAULT_TOKEN_RULE.select(b["features"][layer],
                                                                         b["attention_mask"].bool())[0]]
                          for b in batches])
        mean = kept.mean(0)
        far_layer = {10: 2, 20: 3}.get(layer) if isinstance(layer, int) else None
        for name, kind, group, rotate, center in OPTIONS:
            spec = QuantSpec(kind, group, rotate)
            acc = {k: [] for k in ("close D_P", "close D_FG", "close CKA", "far D_P", "far D_FG", "far CKA", "kl")}
            err_num = err_den = kept_num = kept_den = 0.0
            flips = massive = 0
            worst_massive = 0.0
            ent = []
            for bi, b in enumerate(batches):
                mask = b["attention_mask"].bool()
                h = b["features"][layer]
                rows = h[mask]
                x = rows @ q_rot if rotate else rows
                m = (mean @ q_rot if rotate else mean) if center else torch.zeros(d)
                codes, scale = quantize(x - m, spec)
                if bi < 4:
                    ent.append(entropy_bits(codes, kind))
                y = dequantize(codes, scale, spec) + m
                y = y @ q_rot.T if rotate else y  # back to the teacher's channels to compare element by element
                err_num += float((y - rows).square().sum())
                err_den += float(rows.square().sum())
                hq = torch.zeros_like(h)
                hq[mask] = y
                keep = DEFAULT_TOKEN_RULE.select(h, mask)[0]
                kept_num += float((hq - h)[keep].square().sum())
                kept_den += float(h[keep].square().sum())
                r_exact, r_q = centred_norm_ratios(h, mask), centred_norm_ratios(hq, mask)
                big = mask & (r_exact > 4)
                massive += int(big.sum())
                if big.any():
                    rel = ((hq - h)[big].norm(dim=-1) / h[big].norm(dim=-1)).max()
                    worst_massive = max(worst_massive, float(rel))
                flips += int(((r_exact > 4) != (r_q > 4))[mask].sum())
                if layer == "final":
                    lp, lq = head.logits(rows).float().log_softmax(-1), head.logits(y).float().log_softmax(-1)
                    acc["kl"].append(float((lp.exp() * (lp - lq)).sum(-1).mean()))
                    continue
                gen = torch.Generator().manual_seed(bi)
                close = h @ proj + 0.05 * h[mask].std() * torch.randn(*h.shape[:2], d // 2, generator=gen)
                students = {"close": close}
                if student is not None and far_layer is not None:
                    if (bi, far_layer) not in far_cache:
                        far_cache[bi, far_layer] = capture_hidden_states(student, b["input_ids"], b["attention_mask"],
                                                                         [far_layer])[far_layer]
                    students["far"] = far_cache[bi, far_layer]
                for who, s in students.items():
                    for dn, fn in (("D_P", procrustes_distance), ("D_FG", feature_gram_distance),
                                   ("CKA", cka_distance)):
                        a, c = float(fn(s, h, mask, squared=False)), float(fn(s, hq, mask, squared=False))
                        acc[f"{who} {dn}"].append((c - a) / a)
            row = {"bytes_ratio": 2 * d / spec.bytes_per_row(d), "rel_error": (err_num / err_den) ** 0.5,
                   "kept_rel_error": (kept_num / kept_den) ** 0.5,
                   "massive_rows": massive, "worst_massive_rel_error": worst_massive, "rule_flips": flips,
                   "rows": int(all_rows.shape[0]), "code_entropy_bits": sum(ent) / len(ent)}
            for k, v in acc.items():
                if v:
                    row[k] = sum(v) / len(v) if k == "kl" else max(v, key=abs)
            result.setdefault(str(layer), {})[name] = row
            print(f"layer {layer:>5} {name:<18} x{row['bytes_ratio']:.2f} err {100 * row['rel_error']:5.2f}% "
                  f"kept {100 * row['kept_rel_error']:5.2f}% "
                  f"flips {flips}/{row['rows']} massive {massive} worst {100 * worst_massive:.2f}% "
                  f"H {row['code_entropy_bits']:.2f}b "
                  + " ".join(f"{k} {100 * v:+.3f}%" if k != "kl" else f"KL {v:.2e}"
                             for k, v in row.items() if k in acc), flush=True)
    if out:
        out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    a = sys.argv[1:]
    opt = lambda flag: Path(a[a.index(flag) + 1]) if flag in a else None  # noqa: E731
    main(Path(a[0]), Path(a[1]), opt("--student"), opt("--out"))
