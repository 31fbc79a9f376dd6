"""Filling a feature store: the unit plan, length-grouped teacher batches, the low-rank fit, resume, and the manifest.

The work is a fixed list of units, contiguous ranges of samples in TokenDataset order cut at `shard_tokens`, fixed
by the data alone. Each unit becomes one shard; its batches are grouped by length within the unit only. So a unit's
bytes depend on the unit, never on how many ranks share the work (rank r takes units r, r+W, ...), nor on whether
the run was killed and resumed: a rerun keeps every unit whose shard and sidecar verify and recomputes the rest.
"""
from __future__ import annotations

import os
import shutil
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from safetensors import safe_open
from torch import Tensor

from pipeline.data import collate_batch
from pipeline.feature_store import (
    FORMAT_VERSION, KIND, LM_HEAD_FILE, LOWRANK_FILE, MANIFEST, PLAN, SHARD_DIR, TOKEN_RULE, Layer,
    StoreError, layer_key, parse_layer, read_metadata, shard_file, sidecar_file, write_shard,
)
from pipeline.io import read_json, sha256_file, sha256_json, write_json_atomic
from pipeline.models import capture_hidden_states

PLAN_KIND = "geokd.features.plan"
# Names a user recognises for the plan fields that make two runs incompatible.
FIELD_NAMES = {"teacher_fingerprint": "teacher", "tokenizer_fingerprint": "tokenizer", "data_fingerprint": "data"}


# ---------------------------------------------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------------------------------------------
def plan_units(lengths: np.ndarray, shard_tokens: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) position ranges, each closed once it holds at least `shard_tokens` tokens."""
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
    units, start, acc = [], 0, 0
    for i, n in enumerate(np.asarray(lengths).tolist()):
        acc += n
        if acc >= shard_tokens:
            units.append((start, i + 1))
            start, acc = i + 1, 0
    if start < len(lengths):
        units.append((start, len(lengths)))
    return units


def length_batches(lengths: np.ndarray, positions: Sequence[int], batch_tokens: int, max_batch_size: int
                   ) -> list[list[int]]:
    """Positions grouped into batches of similar length: longest first, each batch's padded size
    (size x its longest sample) within `batch_tokens` (a longer sample goes alone). Depends only on its inputs."""
    order = sorted(positions, key=lambda p: (-int(lengths[p]), p))
    batches: list[list[int]] = []
    for p in order:
        if batches:
            b = batches[-1]
            if len(b) < max_batch_size and (len(b) + 1) * int(lengths[b[0]]) <= batch_tokens:
                b.append(p)
                continue
        batches.append([p])
    return batches


def make_plan(content: dict[str, Any], units: list[tuple[int, int]], info: dict[str, Any]) -> dict[str, Any]:
    """`content` decides the shards' bytes (compared on resume); `info` only describes (paths, shapes)."""
    plan = {"kind": PLAN_KIND, "content": content, "units": [list(u) for u in units], "info": info}
    plan["fingerprint"] = sha256_json({"content": content, "units": plan["units"]})
    return plan


def plan_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    diffs = []
    for key in sorted(set(old["content"]) | set(new["content"])):
        a, b = old["content"].get(key), new["content"].get(key)
        if a != b:
            show = (lambda v: str(v)[:12]) if key in FIELD_NAMES else str
            diffs.append(f"{FIELD_NAMES.get(key, key)} (store: {show(a)}, this run: {show(b)})")
    if not diffs and old["units"] != new["units"]:
        diffs.append("unit split")
    return diffs


def check_output_folder(out: Path, plan: dict[str, Any]) -> str:
    """'new', 'resume' or 'complete' for this plan in `out`; refuses a folder holding anything else, naming why."""
    if out.exists() and not out.is_dir():
        raise StoreError(f"output {out} exists and is not a folder")
    # A run killed before its plan was written leaves at most a temp file: that folder is still "new".
    if not out.exists() or all(p.name.startswith(".") and p.name.endswith(".tmp") for p in out.iterdir()):
        return "new"
    if not (out / PLAN).is_file():
        raise StoreError(f"output folder {out} is not empty and holds no feature store; choose another --out")
    old = read_json(out / PLAN)
    if old.get("kind") != PLAN_KIND:
        raise StoreError(f"{out / PLAN}: not a feature-store plan")
    diffs = plan_differences(old, plan)
    if diffs:
        raise StoreError(f"{out} holds a feature store made with another " + "; ".join(diffs)
                         + ". Use another --out (nothing there was changed).")
    return "complete" if (out / MANIFEST).is_file() else "resume"


def prepare_output_folder(out: Path, plan: dict[str, Any], needed_bytes: int) -> None:
    """Create `out`, write the plan, drop temp files of killed runs; clean errors when it cannot be written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreError(f"cannot create output folder {out}: {e.strerror or e}") from e
    check_free_space(out, needed_bytes)
    try:
        if not (out / PLAN).is_file():  # first, so a folder with anything of ours in it always has its plan
            write_json_atomic(out / PLAN, plan)
        (out / SHARD_DIR).mkdir(exist_ok=True)
    except OSError as e:
        raise StoreError(f"cannot write to output folder {out}: {e.strerror or e}") from e
    for stale in list(out.glob(".*.tmp")) + list((out / SHARD_DIR).glob(".*.tmp")):
        stale.unlink(missing_ok=True)


def check_free_space(out: Path, needed_bytes: int) -> None:
    free = shutil.disk_usage(out).free
    if needed_bytes > free:
        raise StoreError(f"output folder {out}: the store needs about {needed_bytes / 1e9:.2f} GB more, only "
                         f"{free / 1e9:.2f} GB are free")


# ---------------------------------------------------------------------------------------------------------------
# Teacher
# ---------------------------------------------------------------------------------------------------------------
def teacher_placement(param_bytes: int, gpu_bytes: int | None, n_gpus: int, world_size: int,
                      have_accelerate: bool) -> str:
    """'cpu', 'gpu' (one replica per rank) or 'device_map' (one process spreading the teacher over all GPUs)."""
    if gpu_bytes is None or n_gpus == 0:
        return "cpu"
    # Activations of a batch and the allocator's slack need room beside the weights.
    if param_bytes <= 0.85 * gpu_bytes:
        return "gpu"
    need = f"the teacher's weights take {param_bytes / 2**30:.1f} GiB, one GPU has {gpu_bytes / 2**30:.1f} GiB"
    if not have_accelerate:
        raise StoreError(f"{need}; install accelerate to spread it over GPUs with device_map='auto'")
    if world_size > 1:
        raise StoreError(f"{need}; run a single process (not torchrun) so device_map='auto' can spread one copy "
                         f"over all {n_gpus} GPUs")
    if param_bytes > 0.85 * gpu_bytes * n_gpus:
        raise StoreError(f"{need}, and all {n_gpus} GPUs together are too small for it")
    return "device_map"


def checkpoint_param_bytes(model_dir: Path, dtype: torch.dtype) -> int | None:
    """Parameter bytes at `dtype` of a saved safetensors checkpoint, read from file headers (no weights loaded)."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        return None
    n = 0
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            n += sum(int(np.prod(h.get_slice(k).get_shape())) for k in h.keys())
    return n * torch.finfo(dtype).bits // 8


# ---------------------------------------------------------------------------------------------------------------
# Running the teacher
# ---------------------------------------------------------------------------------------------------------------
LowRank = dict[Layer, tuple[Tensor, Tensor]]  # layer -> (basis [d, k], mean [d]) on the teacher's device


@torch.no_grad()
def teacher_rows(model: Any, input_ids: Tensor, attention_mask: Tensor, layers: Sequence[int], *, final: bool,
                 topk: int, store_dtype: torch.dtype, lowrank: LowRank, device: torch.device
                 ) -> tuple[dict[str, Tensor], dict[str, list[float]]]:
    """The valid tokens' stored tensors of one batch (rows in batch order, on the CPU) and low-rank energy sums."""
    hs = capture_hidden_states(model, input_ids.to(device), attention_mask.to(device), list(layers),
                               final=final or topk > 0)
    return extract_rows(hs, attention_mask, layers, final=final, topk=topk, store_dtype=store_dtype, lowrank=lowrank,
                        head=model.get_output_embeddings() if topk else None)


def extract_rows(hs: dict[Any, Tensor], attention_mask: Tensor, layers: Sequence[int], *, final: bool, topk: int,
                 store_dtype: torch.dtype, lowrank: LowRank, head: Any = None
                 ) -> tuple[dict[str, Tensor], dict[str, list[float]]]:
    """Captured hidden states `[B, T, d]` -> the valid rows to store (projected, cast, on the CPU)."""
    out: dict[str, Tensor] = {}
    energy: dict[str, list[float]] = {}
    for layer in list(layers) + (["final"] if final else []):
        h = hs[layer]
        h = h[attention_mask.to(h.device).bool()]
        if layer in lowrank:
            basis, mean = lowrank[layer]
            centered = h.float() - mean.to(h.device)
            h = centered @ basis.to(h.device)
            energy[layer_key(layer)] = [float(centered.double().square().sum()), float(h.double().square().sum())]
        out[f"feat.{layer_key(layer)}"] = h.to(store_dtype).cpu()
    if topk:
        final_h = hs["final"]
        final_h = final_h[attention_mask.to(final_h.device).bool()]
        values, indices = [], []
        for chunk in final_h.split(1024):  # vocabulary-sized logits only for a slice of tokens at a time
            logp = head(chunk).float().log_softmax(-1)
            v, i = logp.topk(topk, dim=-1)
            values.append(v.cpu())
            indices.append(i.to(torch.int32).cpu())
        out["topk.values"] = torch.cat(values)
        out["topk.indices"] = torch.cat(indices)
    return out, energy


def compute_unit(model: Any, dataset: Any, start: int, end: int, *, layers: Sequence[int], final: bool, topk: int,
                 store_dtype: torch.dtype, lowrank: LowRank, pad_id: int, batch_tokens: int, max_batch_size: int,
                 device: torch.device, on_tokens: Callable[[int], None] | None = None) -> dict[str, Any]:
    """One unit's shard content: the teacher over its samples in length-grouped batches, put back in unit order."""
    lengths = dataset.lengths
    per_sample: dict[int, dict[str, Tensor]] = {}
    energy: dict[str, list[float]] = {}
    for positions in length_batches(lengths, range(start, end), batch_tokens, max_batch_size):
        batch = collate_batch([dataset[p] for p in positions], pad_id)
        rows, e = teacher_rows(model, batch["input_ids"], batch["attention_mask"], layers, final=final, topk=topk,
                               store_dtype=store_dtype, lowrank=lowrank, device=device)
        sizes = [int(lengths[p]) for p in positions]
        split = {name: t.split(sizes) for name, t in rows.items()}
        for j, p in enumerate(positions):
            per_sample[p] = {name: parts[j] for name, parts in split.items()}
        for k, (total, kept) in e.items():
            acc = energy.setdefault(k, [0.0, 0.0])
            acc[0] += total
            acc[1] += kept
        if on_tokens is not None:
            on_tokens(sum(sizes))
    order = range(start, end)
    offsets = torch.zeros(end - start + 1, dtype=torch.int64)
    offsets[1:] = torch.as_tensor(np.cumsum([int(lengths[p]) for p in order]), dtype=torch.int64)
    names = list(per_sample[start])
    return {
        "sample_ids": torch.as_tensor([int(dataset.sample_ids[p]) for p in order], dtype=torch.int64),
        "offsets": offsets,
        "tensors": {name: torch.cat([per_sample[p][name] for p in order]) for name in names},
        "energy": energy,
    }


def write_unit(out: Path, unit: int, result: dict[str, Any], plan_fp: str, lowrank_sha: str | None) -> None:
    """Shard first, then its sidecar: a sidecar exists only beside a complete shard and names its sha256."""
    path = out / shard_file(unit)
    write_shard(path, sample_ids=result["sample_ids"], offsets=result["offsets"], tensors=result["tensors"],
                metadata={"unit": str(unit), "plan": plan_fp})
    ids = result["sample_ids"]
    sidecar = {
        "unit": unit, "plan": plan_fp, "lowrank_sha256": lowrank_sha, "file": shard_file(unit),
        "sha256": sha256_file(path), "bytes": path.stat().st_size,
        "n_samples": int(ids.numel()), "n_tokens": int(result["offsets"][-1]),
        "first_sample_id": int(ids[0]), "last_sample_id": int(ids[-1]),
        "tensor_bytes": {name: t.numel() * t.element_size() for name, t in result["tensors"].items()},
        "energy": result["energy"],
    }
    try:
        write_json_atomic(out / sidecar_file(unit), sidecar)
    except OSError as e:
        raise StoreError(f"cannot write {out / sidecar_file(unit)}: {e.strerror or e}") from e


def default_writer_threads() -> int:
    """Writer threads: CRCs, serialization and sha256 run at ~0.4-1 GB/s per core, below what a GPU teacher makes
    (an H100 teacher's forward needs 1.75 GB/s for two 2048-wide bf16 layers), so use several where cores allow;
    on a small CPU machine one, since the teacher itself needs the cores."""
    return max(1, min(4, (os.cpu_count() or 1) // 4))


def cache_units(model: Any, dataset: Any, out: Path, units: Sequence[tuple[int, int]], todo: Sequence[int], *,
                plan_fp: str, lowrank_sha: str | None, writers: int = 1, **unit_kwargs: Any) -> None:
    """Compute and write the units `todo`. Shards are written by `writers` threads while the teacher computes the
    next unit; at most `writers` finished units wait in memory. Each shard's bytes depend on its unit only, so
    the thread count never changes the store."""
    with ThreadPoolExecutor(max_workers=writers) as pool:
        pending: deque[Future] = deque()
        for u in todo:
            result = compute_unit(model, dataset, *units[u], **unit_kwargs)
            while len(pending) >= writers:
                pending.popleft().result()
            pending.append(pool.submit(write_unit, out, u, result, plan_fp, lowrank_sha))
        while pending:
            pending.popleft().result()


def unit_done(out: Path, unit: int, plan_fp: str, lowrank_sha: str | None) -> bool:
    """True when the unit's shard is complete, belongs to this plan and hashes to what its sidecar says."""
    side, path = out / sidecar_file(unit), out / shard_file(unit)
    if not side.is_file() or not path.is_file():
        return False
    try:
        info = read_json(side)
    except ValueError:  # a sidecar is written atomically, so this is damage: recompute the unit
        return False
    return (info.get("plan") == plan_fp and info.get("lowrank_sha256") == lowrank_sha
            and path.stat().st_size == info.get("bytes") and sha256_file(path) == info.get("sha256"))


# ---------------------------------------------------------------------------------------------------------------
# Low-rank bases
# ---------------------------------------------------------------------------------------------------------------
def fit_positions(lengths: np.ndarray, fit_tokens: int, seed: int) -> list[int]:
    """A seeded random subset of samples holding at least `fit_tokens` tokens (all samples if there are fewer)."""
    perm = np.random.default_rng(seed).permutation(len(lengths))
    cum = np.cumsum(np.asarray(lengths)[perm])
    m = min(len(perm), int(np.searchsorted(cum, fit_tokens)) + 1)
    return sorted(int(p) for p in perm[:m])


@torch.no_grad()
def fit_lowrank(model: Any, dataset: Any, layers: Sequence[int], *, k: int, energy: float, fit_tokens: int,
                seed: int, pad_id: int, batch_tokens: int, max_batch_size: int, device: torch.device
                ) -> tuple[dict[str, Tensor], dict[str, dict[str, float]]]:
    """Per-layer PCA of the teacher's features on a sample of the data: tensors for lowrank.safetensors and a
    report {layer: {"k", "d", "energy_fit", "fit_tokens"}}. k is fixed, or the least k keeping `energy` of the
    variance. Accumulated in float64 so the basis does not depend on batch order beyond rounding of the sums."""
    positions = fit_positions(dataset.lengths, fit_tokens, seed)
    s1: dict[int, Tensor] = {}
    s2: dict[int, Tensor] = {}
    n = 0
    for batch_pos in length_batches(dataset.lengths, positions, batch_tokens, max_batch_size):
        batch = collate_batch([dataset[p] for p in batch_pos], pad_id)
        hs = capture_hidden_states(model, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                   list(layers))
        for layer in layers:
            h = hs[layer][batch["attention_mask"].to(hs[layer].device).bool()].double()
            s1[layer] = s1.get(layer, 0) + h.sum(0)
            s2[layer] = s2.get(layer, 0) + h.T @ h
        n += int(batch["attention_mask"].sum())
    tensors: dict[str, Tensor] = {}
    report: dict[str, dict[str, float]] = {}
    for layer in layers:
        basis, mean, kept = pca_basis(s1[layer].cpu(), s2[layer].cpu(), n, k=k, energy=energy)
        tensors[f"basis.{layer}"], tensors[f"mean.{layer}"] = basis, mean
        report[layer_key(layer)] = {"k": basis.shape[1], "d": basis.shape[0], "energy_fit": kept, "fit_tokens": n,
                                    "k_for_energy": k_for_energy(s1[layer].cpu(), s2[layer].cpu(), n)}
    return tensors, report


def pca_basis(s1: Tensor, s2: Tensor, n: int, *, k: int = 0, energy: float = 0.0) -> tuple[Tensor, Tensor, float]:
    """PCA from the moments sum(x) [d] and sum(x x^T) [d, d] of n rows: (basis [d, k] fp32 with orthonormal
    columns, mean [d] fp32, fraction of the variance the k directions keep). k is fixed, or the least k keeping
    `energy` of the variance."""
    mean = s1.double() / n
    cov = s2.double() / n - torch.outer(mean, mean)
    evals, evecs = torch.linalg.eigh(cov)
    evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
    # One sign per eigenvector (largest entry positive) so the basis is reproducible across LAPACK builds.
    signs = torch.sign(evecs.gather(0, evecs.abs().argmax(0, keepdim=True)))
    evecs = evecs * torch.where(signs == 0, 1.0, signs)
    frac = torch.cumsum(evals, 0) / evals.sum().clamp_min(1e-300)
    kk = k if k else int(torch.searchsorted(frac, torch.tensor([energy - 1e-12], dtype=frac.dtype))) + 1
    kk = max(1, min(kk, evals.numel()))
    return evecs[:, :kk].float().contiguous(), mean.float(), float(frac[kk - 1])


def k_for_energy(s1: Tensor, s2: Tensor, n: int, levels: Sequence[float] = (0.9, 0.99, 0.999)) -> dict[str, int]:
    """How many principal directions keep each energy level: the spectrum in three numbers, to choose k by."""
    return {str(e): pca_basis(s1, s2, n, energy=e)[0].shape[1] for e in levels}


def load_lowrank(path: Path, device: torch.device) -> LowRank:
    from safetensors.torch import load_file

    t = load_file(str(path))
    return {parse_layer(k[6:]): (t[k].to(device), t[f"mean.{k[6:]}"].to(device)) for k in t if k.startswith("basis.")}


# ---------------------------------------------------------------------------------------------------------------
# Finishing
# ---------------------------------------------------------------------------------------------------------------
def pending_units(out: Path, plan: dict[str, Any]) -> list[int]:
    """Units without a sidecar of this plan (a quick look; `unit_done` is the full check)."""
    missing = []
    for u in range(len(plan["units"])):
        side = out / sidecar_file(u)
        try:
            ok = side.is_file() and read_json(side).get("plan") == plan["fingerprint"]
        except ValueError:
            ok = False
        if not ok:
            missing.append(u)
    return missing


def finalize_store(out: Path, plan: dict[str, Any], *, config: dict[str, Any], wall_s: float) -> dict[str, Any]:
    """Write manifest.json from the plan and the units' sidecars once every unit is there."""
    missing = pending_units(out, plan)
    if missing:
        raise StoreError(f"{out}: {len(missing)} of {len(plan['units'])} units are not cached yet (first: "
                         f"{shard_file(missing[0])}); rerun the same cache command to finish them")
    shards, tensor_bytes, energy = [], {}, {}
    for u in range(len(plan["units"])):
        s = read_json(out / sidecar_file(u))
        shards.append({k: s[k] for k in ("file", "sha256", "bytes", "n_samples", "n_tokens", "first_sample_id",
                                          "last_sample_id")})
        for name, b in s["tensor_bytes"].items():
            tensor_bytes[name] = tensor_bytes.get(name, 0) + b
        for layer, (total, kept) in s["energy"].items():
            acc = energy.setdefault(layer, [0.0, 0.0])
            acc[0] += total
            acc[1] += kept
    c, info = plan["content"], plan["info"]
    n_tokens = sum(s["n_tokens"] for s in shards)
    manifest: dict[str, Any] = {
        "kind": KIND, "format_version": FORMAT_VERSION,
        "teacher": {"fingerprint": c["teacher_fingerprint"], **info["teacher"]},
        "tokenizer_fingerprint": c["tokenizer_fingerprint"],
        "data": {"fingerprint": c["data_fingerprint"], "split": c["split"], "path": info["data_path"]},
        "layers": c["layers"], "dtype": c["dtype"], "compute_dtype": c["compute_dtype"], "token_rule": TOKEN_RULE,
        "topk_logits": ({"k": c["topk_logits"], "values": "log-probabilities float32", "indices": "int32"}
                        if c["topk_logits"] else None),
        "n_samples": sum(s["n_samples"] for s in shards), "n_tokens": n_tokens,
        "shards": shards, "plan_fingerprint": plan["fingerprint"],
    }
    for side, file in (("lowrank", LOWRANK_FILE), ("lm_head", LM_HEAD_FILE)):
        manifest[side] = None
        if (out / file).is_file():
            manifest[side] = {"file": file, "sha256": sha256_file(out / file), "bytes": (out / file).stat().st_size}
    dims = {layer: {"d": d["d"], "stored": d["d"]} for layer, d in info["dims"].items()}
    if manifest["lowrank"]:
        with safe_open(str(out / LOWRANK_FILE), framework="pt") as f:
            report = read_metadata(f)["report"]
        for layer, (total, kept) in energy.items():
            report[layer]["energy_store"] = kept / total if total else 1.0
        for layer, r in report.items():
            dims[layer]["stored"] = r["k"]
        manifest["lowrank"]["layers"] = report
    manifest["dims"] = dims
    manifest["stats"] = {
        "bytes": sum(s["bytes"] for s in shards),
        "bytes_per_token": {name: b / max(n_tokens, 1) for name, b in sorted(tensor_bytes.items())},
        "wall_s_last_run": wall_s,
    }
    manifest["config"] = config
    write_json_atomic(out / MANIFEST, manifest)
    return manifest


def summary(manifest: dict[str, Any], wall_s: float, computed_tokens: int | None = None) -> str:
    st, n = manifest["stats"], manifest["n_tokens"]
    lines = [f"feature store: {manifest['n_samples']} samples, {n} tokens, {len(manifest['shards'])} shards, "
             f"{st['bytes'] / 1e6:.1f} MB"]
    if computed_tokens is not None:
        lines[0] += (f"; this run computed {computed_tokens} tokens in {wall_s:.1f} s wall "
                     f"({computed_tokens / max(wall_s, 1e-9):.0f} tok/s, start-up included)")
    for name, b in st["bytes_per_token"].items():
        if not name.startswith("crc."):
            lines.append(f"  {name:<14} {b:10.1f} bytes/token")
    for layer, r in (manifest.get("lowrank") or {}).get("layers", {}).items():
        lines.append(f"  low-rank layer {layer}: k={r['k']} of d={r['d']}, energy kept {r['energy_fit']:.4f} on the "
                     f"fit sample, {r.get('energy_store', float('nan')):.4f} over the store; k for energy "
                     + ", ".join(f"{e}: {k}" for e, k in r["k_for_energy"].items()))
    return "\n".join(lines)


def storage_estimate(n_tokens: int, dims: dict[str, dict[str, int]], store_dtype: torch.dtype, topk: int) -> int:
    per_token = sum(d["d"] for d in dims.values()) * (torch.finfo(store_dtype).bits // 8) + topk * 8
    return n_tokens * per_token


