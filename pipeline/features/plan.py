"""Planning a feature store: the unit split, length-grouped batches, the output folder, and the manifest.

The work is a fixed list of units, contiguous ranges of samples in TokenDataset order cut at `shard_tokens`, fixed
by the data alone. Each unit becomes one shard; its batches are grouped by length within the unit only. So a unit's
bytes depend on the unit, never on how many ranks share the work (rank r takes units r, r+W, ...), nor on whether
the run was killed and resumed: a rerun keeps every unit whose shard and sidecar verify and recomputes the rest.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from pipeline.errors import StoreError
from pipeline.features.format import (
    FORMAT_VERSION, KIND, LOWRANK_FILE, MANIFEST, PLAN, QUANT_FORMAT_VERSION, SHARD_DIR, SIDE_FILES, TOKEN_RULE,
    read_lowrank_report, shard_file, sidecar_file,
)
from pipeline.features.quant import QuantSpec
from pipeline.io import read_json, sha256_file, sha256_json, write_json_atomic

PLAN_KIND = "geokd.features.plan"
# Names a user recognises for the plan fields that make two runs incompatible.
FIELD_NAMES = {"teacher_fingerprint": "teacher", "tokenizer_fingerprint": "tokenizer", "data_fingerprint": "data"}


def plan_units(lengths: np.ndarray, shard_tokens: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) position ranges, each closed once it holds at least `shard_tokens` tokens."""
    if shard_tokens < 1:
        raise StoreError(f"shard_tokens must be positive, got {shard_tokens}")
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
    if not (out / MANIFEST).is_file():
        return "resume"
    # Complete by its manifest: still, a truncated or missing file must not be taken for a finished store.
    manifest = read_json(out / MANIFEST)
    files = list(manifest.get("shards", [])) + [manifest[k] for k in SIDE_FILES if manifest.get(k)]
    damaged = [f"{f['file']} ({'missing' if not (out / f['file']).is_file() else 'size differs'})" for f in files
               if not (out / f["file"]).is_file() or (out / f["file"]).stat().st_size != f["bytes"]]
    if damaged:
        raise StoreError(f"{out} is a finished store with damaged files: {', '.join(damaged[:5])}"
                         f"{', ...' if len(damaged) > 5 else ''}; to repair, delete {out / MANIFEST} and rerun the "
                         f"same cache command (damaged units are recomputed, sound ones kept)")
    return "complete"


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
        "kind": KIND, "format_version": QUANT_FORMAT_VERSION if c.get("quant") else FORMAT_VERSION,
        "teacher": {"fingerprint": c["teacher_fingerprint"], **info["teacher"]},
        "tokenizer_fingerprint": c["tokenizer_fingerprint"],
        "data": {"fingerprint": c["data_fingerprint"], "split": c["split"], "path": info["data_path"]},
        "layers": c["layers"], "dtype": c["dtype"], "compute_dtype": c["compute_dtype"], "token_rule": TOKEN_RULE,
        "topk_logits": ({"k": c["topk_logits"], "values": "log-probabilities float32", "indices": "int32"}
                        if c["topk_logits"] else None),
        "n_samples": sum(s["n_samples"] for s in shards), "n_tokens": n_tokens,
        "shards": shards, "plan_fingerprint": plan["fingerprint"],
    }
    if c.get("class_logits"):  # only an encoder's store: a causal LM's manifest reads as before
        manifest["class_logits"] = {"labels": c["class_logits"], "tensor": "sample.class_logits float32 [n, C]"}
    if c.get("quant"):
        manifest["quant"] = {**c["quant"],
                             "decode": "y = codes x scale.<layer> per group of `group` channels (0: per token; "
                                       "int4: two codes a byte, low nibble first, offset 8) + mean.<layer>; "
                                       "rows = y, or y Q^T in the teacher's channels (rotation.<layer>); both "
                                       "tensors in quant.safetensors when used"}
    for side, file in SIDE_FILES.items():
        if side == "quant_params" and not c.get("quant"):
            continue  # the key exists only in quantized stores, so other manifests read as before
        manifest[side] = None
        if (out / file).is_file():
            manifest[side] = {"file": file, "sha256": sha256_file(out / file), "bytes": (out / file).stat().st_size}
    dims = {layer: {"d": d["d"], "stored": d["d"]} for layer, d in info["dims"].items()}
    if manifest["lowrank"]:
        report = read_lowrank_report(out / LOWRANK_FILE)
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
    if q := manifest.get("quant"):
        stored = sum(b for k, b in st["bytes_per_token"].items() if k.startswith(("feat.", "scale.")))
        bf16 = sum(2 * d["d"] for d in manifest["dims"].values())
        lines.append(f"  quantized {q['kind']}, " + (f"groups of {q['group']} channels" if q["group"] else
                                                      "one scale per token") + (", rotated" if q["rotated"] else "")
                     + f": {stored:.0f} bytes/token for the features, {bf16 / max(stored, 1e-9):.2f}x fewer than bf16")
    for layer, r in (manifest.get("lowrank") or {}).get("layers", {}).items():
        lines.append(f"  low-rank layer {layer}: k={r['k']} of d={r['d']}"
                     + (f" ({r['k_principal']} principal + {r['k_outlier']} for {r['outlier_tokens']} outlier "
                        f"tokens, their error {r['outlier_rel_error']:.1e})" if "k_outlier" in r else "")
                     + f", energy kept {r['energy_fit']:.4f} on the fit sample without outliers, "
                     f"{r.get('energy_store', float('nan')):.4f} over the store; k for energy "
                     + ", ".join(f"{e}: {k}" for e, k in r["k_for_energy"].items()))
    return "\n".join(lines)


def storage_estimate(n_tokens: int, dims: dict[str, dict[str, int]], store_dtype: torch.dtype, topk: int,
                     quant: QuantSpec | None = None) -> int:
    if quant is not None:
        per_token = sum(quant.bytes_per_row(d["d"]) for d in dims.values()) + topk * 8
    else:
        per_token = sum(d["d"] for d in dims.values()) * (torch.finfo(store_dtype).bits // 8) + topk * 8
    return int(n_tokens * per_token)
