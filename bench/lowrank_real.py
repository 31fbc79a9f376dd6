"""Bytes per token against the change of D_P / D_FG for low-rank stores of a real teacher (BENCHMARKS.md).

    python bench/lowrank_real.py PREPARED TEACHER OUT [--student DIR]

Caches PREPARED's valid split at layers 5, 10, 20, 30 in full (bf16, the default) and as low-rank stores
(k = d/4, d/8, and k by 99% / 99.9% energy, bases fitted on the same split without the token rule's outliers),
then for each store and layer the mean relative change of D_P and D_FG (default token rule, micro-batches of 8)
for two students: the layer-subset student's hidden states (far from the teacher) and a close student (the
teacher's own features rotated into half the width, plus 5% noise).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline.data.prepared import PreparedData  # noqa: E402
from pipeline.features.store import FeatureDataset, FeatureStore, collate_with_features  # noqa: E402
from pipeline.geometry import feature_gram_distance, procrustes_distance  # noqa: E402
from pipeline.models import capture_hidden_states, load_model  # noqa: E402

LAYERS = [5, 10, 20, 30]
STUDENT_LAYER = {5: 1, 10: 2, 20: 4, 30: 6}  # hidden states of the 0,6,12,18,24,29 student nearest in depth
VARIANTS = {"k=d/4": ["--lowrank_k", "144"], "k=d/8": ["--lowrank_k", "72"],
            "energy 0.99": ["--lowrank_energy", "0.99"], "energy 0.999": ["--lowrank_energy", "0.999"]}


def cache(prepared: Path, teacher: Path, out: Path, extra: list[str]) -> FeatureStore:
    if not (out / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "stages.cache", "--data", str(prepared), "--split", "valid",
                        "--teacher", str(teacher), "--out", str(out), "--layers", *map(str, LAYERS),
                        "--progress", "false", *extra], cwd=ROOT, check=True, capture_output=True)
    return FeatureStore(out)


def batches(prepared: Path, store: FeatureStore, layer: int):
    tokens = PreparedData(prepared).split("valid")
    joined = FeatureDataset(tokens, store, [layer])
    for a in range(0, len(tokens), 8):
        batch = collate_with_features([joined[p] for p in range(a, min(len(tokens), a + 8))], 2, torch.float32)
        yield batch, batch["features"][layer]


@torch.no_grad()
def main(prepared: Path, teacher: Path, out: Path, student_dir: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    full = cache(prepared, teacher, out / "full", ["--quant", "none"])
    stores = {name: cache(prepared, teacher, out / name.replace(" ", "_").replace("/", ""), args)
              for name, args in VARIANTS.items()}
    student = load_model(str(student_dir)).eval()
    q = torch.linalg.qr(torch.randn(576, 576, generator=torch.Generator().manual_seed(0)))[0][:, :288]
    result: dict[str, dict] = {"full": {"bytes_per_token": full.manifest["stats"]["bytes_per_token"]}}
    for name, st in stores.items():
        report = st.manifest["lowrank"]["layers"]
        row = {}
        for layer in LAYERS:
            changes = {"far D_P": [], "far D_FG": [], "close D_P": [], "close D_FG": []}
            for (batch, h_full), (_, h_low) in zip(batches(prepared, full, layer), batches(prepared, st, layer)):
                mask = batch["attention_mask"].bool()
                far = capture_hidden_states(student, batch["input_ids"], batch["attention_mask"],
                                            [STUDENT_LAYER[layer]])[STUDENT_LAYER[layer]]
                close = h_full @ q + 0.05 * h_full.std() * torch.randn(*h_full.shape[:2], 288,
                                                                       generator=torch.Generator().manual_seed(1))
                for who, s in (("far", far), ("close", close)):
                    for dn, fn in (("D_P", procrustes_distance), ("D_FG", feature_gram_distance)):
                        a, b = float(fn(s, h_full, mask, squared=False)), float(fn(s, h_low, mask, squared=False))
                        changes[f"{who} {dn}"].append(abs(b - a) / a)
            r = report[str(layer)]
            row[str(layer)] = {"k": r["k"], "k_outlier": r["k_outlier"], "energy_fit": r["energy_fit"],
                               "energy_fit_all_tokens": r["energy_fit_all_tokens"],
                               "bytes_per_token": st.manifest["stats"]["bytes_per_token"][f"feat.{layer}"],
                               **{k: sum(v) / len(v) for k, v in changes.items()}}
        result[name] = row
    (out / "lowrank_real.json").write_text(json.dumps(result, indent=2) + "\n")
    full_b = full.manifest["stats"]["bytes_per_token"]
    print("| store | layer | k (outlier dirs) | bytes/token (full bf16) | energy kept w/o / with outliers | "
          "far student: D_P / D_FG change | close student: D_P / D_FG change |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in VARIANTS:
        for layer, r in result[name].items():
            print(f"| {name} | {layer} | {r['k']} ({r['k_outlier']}) | {r['bytes_per_token']:.0f} "
                  f"({full_b[f'feat.{layer}']:.0f}) | {r['energy_fit']:.4f} / {r['energy_fit_all_tokens']:.4f} | "
                  f"{100 * r['far D_P']:.2f}% / {100 * r['far D_FG']:.2f}% | "
                  f"{100 * r['close D_P']:.2f}% / {100 * r['close D_FG']:.2f}% |")


if __name__ == "__main__":
    args = sys.argv[1:]
    student = Path(args[args.index("--student") + 1]) if "--student" in args else ROOT / "runs/real_bench/student_init"
    main(Path(args[0]), Path(args[1]), Path(args[2]), student)
