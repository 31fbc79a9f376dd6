"""Feature-cache benchmarks: cache vs forward-only throughput, bytes/token full vs low-rank, how much low-rank
storage moves D_P and D_FG on real batches, and reader throughput.

    .venv/bin/python bench/cache.py --data PREPARED_DIR [--teacher preset:tiny-teacher] [--layers 2 4]
        [--max_tokens 60000] [--lowrank_k 64 32] [--reps 5] [--work /tmp/geokd-bench-cache]

Works on the first units of the prepared split (as the stage cuts them) up to `--max_tokens`. Prints markdown for
BENCHMARKS.md. Throughput: "forward only" runs `capture_hidden_states` on the same pre-collated batches and
nothing else; "cache" is the stage's own `cache_units` (collate, forward, valid-token extraction, dtype cast,
CRCs, safetensors write, fsync, sha256), both alternated `--reps` times; the best and the median are reported.
"""
from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.features import cache  # noqa: E402
from pipeline.features import plan as store_plan  # noqa: E402
from pipeline.features.lowrank import fit_lowrank, load_lowrank  # noqa: E402
from pipeline.data.prepared import PreparedData, collate_batch  # noqa: E402
from pipeline.features.format import DTYPES, LOWRANK_FILE, write_lowrank  # noqa: E402
from pipeline.features.store import FeatureDataset, FeatureStore, collate_with_features  # noqa: E402
from pipeline.geometry import feature_gram_distance, procrustes_distance  # noqa: E402
from pipeline.io import sha256_file  # noqa: E402
from pipeline.models import capture_hidden_states, layer_map, load_model, num_decoder_layers  # noqa: E402


def make_store(out: Path, model, ds, units, args, tok, lowrank_k: int = 0) -> tuple[float, dict]:
    """Cache `units` into `out` with the stage's functions; (seconds spent caching, manifest)."""
    shutil.rmtree(out, ignore_errors=True)
    content = {"teacher_fingerprint": "bench", "tokenizer_fingerprint": "bench", "data_fingerprint": "bench",
               "split": args.split, "layers": args.layers, "dtype": args.dtype, "compute_dtype": "float32",
               "topk_logits": 0, "lowrank": {"k": lowrank_k} if lowrank_k else None,
               "shard_tokens": args.shard_tokens, "batch_tokens": args.batch_tokens, "max_batch_size": 64}
    dims = {str(k): {"d": int(model.config.hidden_size)} for k in args.layers}
    plan = store_plan.make_plan(content, units, {"teacher": {"spec": args.teacher, "n_layers": 0, "vocab_size": 0},
                                                 "data_path": args.data, "dims": dims, "config": {}})
    store_plan.prepare_output_folder(out, plan, 0)
    lowrank, side_sha = {}, None
    if lowrank_k:
        bases, report = fit_lowrank(model, ds, args.layers, k=lowrank_k, energy=0.0, fit_tokens=args.fit_tokens,
                                    seed=0, pad_id=tok.pad_token_id, batch_tokens=args.batch_tokens,
                                    max_batch_size=64, device=torch.device("cpu"))
        write_lowrank(out / LOWRANK_FILE, bases, {"plan": plan["fingerprint"], "report": report})
        lowrank, side_sha = load_lowrank(out / LOWRANK_FILE, torch.device("cpu")), sha256_file(out / LOWRANK_FILE)
    t0 = time.perf_counter()
    cache.cache_units(model, ds, out, units, range(len(units)), plan_fp=plan["fingerprint"], side_sha=side_sha,
                      layers=args.layers, final=False, topk=0, store_dtype=DTYPES[args.dtype], lowrank=lowrank,
                      pad_id=tok.pad_token_id, batch_tokens=args.batch_tokens, max_batch_size=64,
                      device=torch.device("cpu"))
    seconds = time.perf_counter() - t0
    return seconds, store_plan.finalize_store(out, plan, config={}, wall_s=seconds)


@torch.no_grad()
def forward_only(model, batches, layers) -> float:
    t0 = time.perf_counter()
    for b in batches:
        capture_hidden_states(model, b["input_ids"], b["attention_mask"], layers)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="train")
    p.add_argument("--teacher", default="preset:tiny-teacher")
    p.add_argument("--student", default="preset:tiny-student")
    p.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--max_tokens", type=int, default=60_000)
    p.add_argument("--shard_tokens", type=int, default=16_384)
    p.add_argument("--batch_tokens", type=int, default=8192)
    p.add_argument("--lowrank_k", type=int, nargs="*", default=[64, 32])
    p.add_argument("--fit_tokens", type=int, default=20_000)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--micro_batch", type=int, default=8, help="samples per batch for the D_P / D_FG comparison")
    p.add_argument("--work", default="/tmp/geokd-bench-cache")
    args = p.parse_args()
    work = Path(args.work)

    data = PreparedData(args.data)
    ds, tok = data.split(args.split), data.tokenizer()
    teacher = load_model(args.teacher, tokenizer=tok, seed=0).eval()
    units = store_plan.plan_units(ds.lengths, args.shard_tokens)
    cum = np.cumsum([ds.lengths[a:b].sum() for a, b in units])
    units = units[: int(np.searchsorted(cum, args.max_tokens)) + 1]
    n_tokens = int(sum(ds.lengths[a:b].sum() for a, b in units))
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
          f"{platform.processor() or 'cpu'}; teacher {args.teacher} (d={teacher.config.hidden_size}, "
          f"{num_decoder_layers(teacher)} layers), layers {args.layers}, {args.dtype}, {len(units)} units, "
          f"{n_tokens} tokens of {args.data}:{args.split}\n")

    # 1. Throughput: forward only vs the whole cache path, alternated.
    batches = [collate_batch([ds[i] for i in b], tok.pad_token_id) for a, c in units
               for b in store_plan.length_batches(ds.lengths, range(a, c), args.batch_tokens, 64)]
    forward_only(teacher, batches[:1], args.layers)  # warm-up
    fwd, cached = [], []
    for _ in range(args.reps):
        fwd.append(forward_only(teacher, batches, args.layers))
        cached.append(make_store(work / "full", teacher, ds, units, args, tok)[0])
    # On a shared machine other jobs only ever add time, so the best rep is the cleanest estimate.
    print(f"| path | best of {args.reps} (s) | median (s) | tok/s (best) |\n|---|---|---|---|")
    print(f"| teacher forward only | {min(fwd):.2f} | {statistics.median(fwd):.2f} | {n_tokens / min(fwd):,.0f} |")
    print(f"| cache (forward + extract + write + checksums) | {min(cached):.2f} | {statistics.median(cached):.2f} | "
          f"{n_tokens / min(cached):,.0f} |")
    print(f"\ncache / forward-only throughput: **{min(fwd) / min(cached):.3f}** from the best reps, "
          f"{statistics.median(fwd) / statistics.median(cached):.3f} from the medians (all reps: fwd "
          f"{[round(x, 2) for x in fwd]}, cache {[round(x, 2) for x in cached]})\n")

    # The cache's own work timed apart from the forward: short, repeatable, so the best rep is robust to other jobs.
    masks = [b["attention_mask"] for b in batches]
    with torch.no_grad():
        captured = [capture_hidden_states(teacher, b["input_ids"], m, args.layers) for b, m in zip(batches, masks)]
    extract = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        for hs, m in zip(captured, masks):
            cache.extract_rows(hs, m, args.layers, final=False, topk=0, store_dtype=DTYPES[args.dtype], lowrank={})
        extract.append(time.perf_counter() - t0)
    del captured
    results = [cache.compute_unit(teacher, ds, a, b, layers=args.layers, final=False, topk=0,
                               store_dtype=DTYPES[args.dtype], lowrank={}, pad_id=tok.pad_token_id,
                               batch_tokens=args.batch_tokens, max_batch_size=64, device=torch.device("cpu"))
               for a, b in units]
    write = []
    for _ in range(args.reps):
        shutil.rmtree(work / "write", ignore_errors=True)
        (work / "write" / "shards").mkdir(parents=True)
        t0 = time.perf_counter()
        for u, r in enumerate(results):
            cache.write_unit(work / "write", u, r, "bench", None)
        write.append(time.perf_counter() - t0)
    us = lambda seconds: 1e6 * seconds / n_tokens  # noqa: E731
    fw, ex, wr = us(min(fwd)), us(min(extract)), us(min(write))
    stored_mb = sum(t.numel() * t.element_size() for r in results for t in r["tensors"].values()) / 1e6
    print("| step (best of %d) | us/token |\n|---|---|" % args.reps)
    print(f"| teacher forward | {fw:.2f} |\n| valid-row extraction + cast + copy to host | {ex:.3f} |")
    print(f"| shard write: CRCs, safetensors, fsync, sha256, sidecar ({stored_mb:.1f} MB, "
          f"{stored_mb / min(write):.0f} MB/s) | {wr:.3f} |")
    print(f"\nratio if nothing overlapped: {fw / (fw + ex + wr):.3f}; the writer thread overlaps the write with "
          f"the next unit's forward where cores are free (a GPU run)\n")
    del results

    # 2. Bytes per token, full vs low-rank; 3. D_P / D_FG on real batches with full vs low-rank teacher features.
    _, full_manifest = make_store(work / "full", teacher, ds, units, args, tok)
    full = FeatureStore(work / "full")
    student = load_model(args.student, tokenizer=tok, seed=1).eval()
    pairs = layer_map(num_decoder_layers(student), num_decoder_layers(teacher), n_pairs=len(args.layers))
    pairs = [(s, t) for (s, _), t in zip(pairs, args.layers)]
    positions = [i for a, b in units for i in range(a, b)]
    groups = [positions[i : i + args.micro_batch] for i in range(0, len(positions), args.micro_batch)]
    rows = ["| store | layer | k / d | bytes/token | x smaller | energy kept | k for 90/99/99.9% | "
            "D_P rel. change (mean / max) | D_FG rel. change (mean / max) | D_P(full, low-rank) |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for layer in args.layers:
        b = full_manifest["stats"]["bytes_per_token"][f"feat.{layer}"]
        rows.append(f"| full | {layer} | {teacher.config.hidden_size} | {b:.0f} | 1 | 1 | | 0 | 0 | 0 |")
    for k in args.lowrank_k:
        _, m = make_store(work / f"k{k}", teacher, ds, units, args, tok, lowrank_k=k)
        low = FeatureStore(work / f"k{k}")
        stats = {t: {"p": [], "fg": [], "floor": []} for _, t in pairs}
        with torch.no_grad():
            for g in groups:
                batch = collate_batch([ds[i] for i in g], tok.pad_token_id)
                mask = batch["attention_mask"].bool()
                hs = capture_hidden_states(student, batch["input_ids"], batch["attention_mask"], [s for s, _ in pairs])
                for s, t in pairs:
                    rs = hs[s][mask]
                    tf = torch.cat([full.get(int(ds.sample_ids[i]), [t])[t].float() for i in g])
                    tl = torch.cat([low.get(int(ds.sample_ids[i]), [t])[t].float() for i in g])
                    for key, loss in (("p", procrustes_distance), ("fg", feature_gram_distance)):
                        a, bb = loss(rs, tf, squared=False), loss(rs, tl, squared=False)
                        stats[t][key].append(float((bb - a).abs() / a))
                    stats[t]["floor"].append(float(procrustes_distance(tl, tf, squared=False)))
        for _, t in pairs:
            r = m["lowrank"]["layers"][str(t)]
            b = m["stats"]["bytes_per_token"][f"feat.{t}"]
            fb = full_manifest["stats"]["bytes_per_token"][f"feat.{t}"]
            sp, sfg = stats[t]["p"], stats[t]["fg"]
            rows.append(f"| low-rank | {t} | {r['k']} / {r['d']} | {b:.0f} | {fb / b:.1f} | {r['energy_store']:.4f} | "
                        f"{' / '.join(str(x) for x in r['k_for_energy'].values())} | "
                        f"{100 * np.mean(sp):.2f}% / {100 * np.max(sp):.2f}% | {100 * np.mean(sfg):.2f}% / "
                        f"{100 * np.max(sfg):.2f}% | {np.mean(stats[t]['floor']):.4f} |")
    print("\n".join(rows))
    print(f"\n(D over {len(groups)} batches of {args.micro_batch} samples, student {args.student} seed 1, layer pairs "
          f"{pairs}; bytes/token excludes the per-sample CRCs, {8 * full.manifest['n_samples'] / max(n_tokens, 1):.2f} "
          f"bytes/token per layer at this sample length)\n")

    # 4. Reader throughput (files just written, so from the page cache).
    order = np.random.default_rng(0).permutation(full.sample_ids)
    print("| reader | tok/s | GB/s of features |\n|---|---|---|")
    bytes_per_token = sum(full_manifest["stats"]["bytes_per_token"][f"feat.{x}"] for x in args.layers)
    for check in (True, False):
        store = FeatureStore(work / "full", check_samples=check)
        t0 = time.perf_counter()
        n = sum(next(iter(store.get(int(s)).values())).shape[0] for s in order)
        dt = time.perf_counter() - t0
        print(f"| get(sample_id), random order, CRC check {'on' if check else 'off'} | {n / dt:,.0f} | "
              f"{n * bytes_per_token / dt / 1e9:.2f} |")
    loader = torch.utils.data.DataLoader(
        FeatureDataset(ds, FeatureStore(work / "full")), batch_size=16, num_workers=2, sampler=positions,
        collate_fn=lambda items: collate_with_features(items, tok.pad_token_id))  # stored dtype, as training does
    batches_iter = iter(loader)
    next(batches_iter)  # worker start-up (fork, first opens) is a once-per-epoch cost, not throughput
    t0 = time.perf_counter()
    n = sum(int(b["attention_mask"].sum()) for b in batches_iter)
    dt = time.perf_counter() - t0
    print(f"| DataLoader, 2 workers, batches of 16 padded to [B,T,d] {args.dtype}, after the first batch | "
          f"{n / dt:,.0f} | {n * bytes_per_token / dt / 1e9:.2f} |")


if __name__ == "__main__":
    main()
