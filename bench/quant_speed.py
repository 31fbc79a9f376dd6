"""What quantizing costs the cache stage and the reader, against bf16, measured in one process (one thread).

    python bench/quant_speed.py DIR [--samples 200]

DIR as for bench/quant_students.py (prepared `dolly/`, train stores `bf16/`, `int8/`, `int8rot/`, `int4rot/` of
layers 10, 20 and final). Cache side: the teacher's forward over micro-batches of 8 samples (hidden states only),
then the stored rows made from the same hidden states for each option (cast, or rotate + centre + quantize), as a
fraction of the forward. Reader side: `FeatureDataset` items plus collate (what a DataLoader worker does) over the
first SAMPLES samples of each store, in tokens/s, interleaved round-robin so machine noise hits all alike.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline.data.prepared import PreparedData, collate_batch  # noqa: E402
from pipeline.features.cache import extract_rows  # noqa: E402
from pipeline.features.format import QUANT_FILE, read_quant_params  # noqa: E402
from pipeline.features.quant import QuantSpec  # noqa: E402
from pipeline.features.store import FeatureDataset, FeatureStore, collate_with_features  # noqa: E402
from pipeline.models import capture_hidden_states, load_model  # noqa: E402

STORES = {"bf16": None, "int8": QuantSpec("int8", 64, False, True), "int8rot": QuantSpec("int8", 64, True, True),
          "int4rot": QuantSpec("int4", 32, True, True)}
LAYERS = [10, 20]


@torch.no_grad()
def main(d: Path, samples: int) -> None:
    torch.set_num_threads(1)
    data = PreparedData(d / "dolly")
    tokens = data.split("train")
    teacher = load_model(FeatureStore(d / "bf16").manifest["teacher"]["spec"]).eval()
    params = {name: read_quant_params(d / name / QUANT_FILE) for name, spec in STORES.items() if spec}
    forward, extract = 0.0, {name: 0.0 for name in STORES}
    n_tok = 0
    for a in range(0, 48, 8):
        batch = collate_batch([tokens[p] for p in range(a, a + 8)], 0)
        t0 = time.perf_counter()
        hs = capture_hidden_states(teacher, batch["input_ids"], batch["attention_mask"], LAYERS, final=True)
        forward += time.perf_counter() - t0
        n_tok += int(batch["attention_mask"].sum())
        for name, spec in STORES.items():
            t0 = time.perf_counter()
            extract_rows(hs, batch["attention_mask"], LAYERS, final=True, topk=0, store_dtype=torch.bfloat16,
                         lowrank={}, quant=spec, params=params.get(name))
            extract[name] += time.perf_counter() - t0
    print(f"teacher forward (SmolLM2-135M, 1 thread): {n_tok / forward:.0f} tok/s")
    for name in STORES:
        print(f"  rows for the {name} store: {100 * extract[name] / forward:.1f}% of the forward "
              f"({n_tok / extract[name] / 1e3:.0f}k tok/s)")
    stores = {name: FeatureDataset(tokens, FeatureStore(d / name), [*LAYERS, "final"]) for name in STORES}
    read = {name: 0.0 for name in STORES}
    n_tok = 0
    for a in range(0, samples, 8):
        positions = range(a, min(samples, a + 8))
        n_tok += sum(int(tokens.lengths[p]) for p in positions)
        for name, ds in stores.items():
            t0 = time.perf_counter()
            collate_with_features([ds[p] for p in positions], 0)
            read[name] += time.perf_counter() - t0
    for name in STORES:
        print(f"reader {name}: {n_tok / read[name] / 1e3:.1f}k tok/s ({read[name] / read['bf16']:.2f}x bf16's time)")


if __name__ == "__main__":
    a = sys.argv[1:]
    main(Path(a[0]), int(a[a.index("--samples") + 1]) if "--samples" in a else 200)
