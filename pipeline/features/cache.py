"""Filling a feature store: the teacher over each unit's samples, its valid rows, the shard writers, resume.

Planning and the manifest: pipeline/features/plan.py; the format: pipeline/features/format.py.
"""
from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from pipeline.data.prepared import collate_items
from pipeline.errors import StoreError
from pipeline.features.format import (
    CLASS_LOGITS, LM_HEAD_FILE, LOWRANK_FILE, PER_SAMPLE, QUANT_FILE, layer_key, parse_layer, read_quant_params,
    shard_file, sidecar_file, write_lm_head, write_lowrank, write_quant_params, write_shard,
)
from pipeline.features.lowrank import LowRank, fit_lowrank, fit_sample_states
from pipeline.features.quant import QuantSpec, quantize, rotation_matrix
from pipeline.features.plan import length_batches
from pipeline.geometry import DEFAULT_TOKEN_RULE
from pipeline.io import read_json, sha256_file, write_json_atomic
from pipeline.models import capture_hidden_states
from pipeline.models.encoders import encoder_forward, is_encoder
from pipeline.models.teacher import LMHead, lm_head_of

QuantParams = tuple[dict[Any, Tensor], dict[Any, Tensor]] | None  # (rotations, means) of a quantized store


@torch.no_grad()
def teacher_rows(model: Any, input_ids: Tensor, attention_mask: Tensor, layers: Sequence[int], *, final: bool,
                 topk: int, store_dtype: torch.dtype, lowrank: LowRank, device: torch.device,
                 quant: QuantSpec | None = None, params: QuantParams = None, token_type_ids: Tensor | None = None
                 ) -> tuple[dict[str, Tensor], dict[str, list[float]]]:
    """The valid tokens' stored tensors of one batch (rows in batch order, on the CPU) and low-rank energy sums;
    an encoder classifier's also hold its class logits (one row per sample)."""
    if is_encoder(model):
        tti = token_type_ids.to(device) if token_type_ids is not None else None
        hidden, logits = encoder_forward(model, input_ids.to(device), attention_mask.to(device), tti, list(layers))
        out, energy = extract_rows(hidden, attention_mask, layers, final=False, topk=0, store_dtype=store_dtype,
                                   lowrank=lowrank, quant=quant, params=params)
        out[CLASS_LOGITS] = logits.float().cpu()
        return out, energy
    hs = capture_hidden_states(model, input_ids.to(device), attention_mask.to(device), list(layers),
                               final=final or topk > 0)
    return extract_rows(hs, attention_mask, layers, final=final, topk=topk, store_dtype=store_dtype, lowrank=lowrank,
                        head=model.get_output_embeddings() if topk else None, quant=quant, params=params)


def extract_rows(hs: dict[Any, Tensor], attention_mask: Tensor, layers: Sequence[int], *, final: bool, topk: int,
                 store_dtype: torch.dtype, lowrank: LowRank, head: Any = None, quant: QuantSpec | None = None,
                 params: QuantParams = None) -> tuple[dict[str, Tensor], dict[str, list[float]]]:
    """Captured hidden states `[B, T, d]` -> the valid rows to store (projected or quantized, cast, on the CPU).
    Quantized rows come from the teacher's own precision (rotated and centred in float32 first when asked), never
    from a bf16 copy; `params` = (rotations, means) from quant.safetensors, on the rows' device."""
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
        if quant is not None:
            rotations, means = params or ({}, {})
            h = h.float()
            h = h @ rotations[layer].to(h.device) if layer in rotations else h
            h = h - means[layer].to(h.device) if layer in means else h
            codes, scale = quantize(h, quant)
            out[f"feat.{layer_key(layer)}"], out[f"scale.{layer_key(layer)}"] = codes.cpu(), scale.cpu()
            continue
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
                 device: torch.device, on_tokens: Callable[[int], None] | None = None,
                 quant: QuantSpec | None = None, params: QuantParams = None) -> dict[str, Any]:
    """One unit's shard content: the teacher over its samples in length-grouped batches, put back in unit order."""
    lengths = dataset.lengths
    per_sample: dict[int, dict[str, Tensor]] = {}
    energy: dict[str, list[float]] = {}
    for positions in length_batches(lengths, range(start, end), batch_tokens, max_batch_size):
        batch = collate_items([dataset[p] for p in positions], pad_id)
        rows, e = teacher_rows(model, batch["input_ids"], batch["attention_mask"], layers, final=final, topk=topk,
                               store_dtype=store_dtype, lowrank=lowrank, device=device, quant=quant,
                               params=params, token_type_ids=batch.get("token_type_ids"))
        sizes = [int(lengths[p]) for p in positions]
        split = {name: t.split(1 if name.startswith(PER_SAMPLE) else sizes) for name, t in rows.items()}
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


def write_unit(out: Path, unit: int, result: dict[str, Any], plan_fp: str, side_sha: str | None) -> None:
    """Shard first, then its sidecar: a sidecar exists only beside a complete shard and names its sha256."""
    path = out / shard_file(unit)
    write_shard(path, sample_ids=result["sample_ids"], offsets=result["offsets"], tensors=result["tensors"],
                metadata={"unit": str(unit), "plan": plan_fp})
    ids = result["sample_ids"]
    sidecar = {
        "unit": unit, "plan": plan_fp, "side_sha256": side_sha, "file": shard_file(unit),
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
                plan_fp: str, side_sha: str | None, writers: int = 1, **unit_kwargs: Any) -> None:
    """Compute and write the units `todo`. Shards are written by `writers` threads while the teacher computes the
    next unit; at most `writers` finished units wait in memory. Each shard's bytes depend on its unit only, so
    the thread count never changes the store."""
    with ThreadPoolExecutor(max_workers=writers) as pool:
        pending: deque[Future] = deque()
        for u in todo:
            result = compute_unit(model, dataset, *units[u], **unit_kwargs)
            while len(pending) >= writers:
                pending.popleft().result()
            pending.append(pool.submit(write_unit, out, u, result, plan_fp, side_sha))
        while pending:
            pending.popleft().result()


def unit_done(out: Path, unit: int, plan_fp: str, side_sha: str | None) -> bool:
    """True when the unit's shard is complete, belongs to this plan and hashes to what its sidecar says."""
    side, path = out / sidecar_file(unit), out / shard_file(unit)
    if not side.is_file() or not path.is_file():
        return False
    try:
        info = read_json(side)
    except ValueError:  # a sidecar is written atomically, so this is damage: recompute the unit
        return False
    return (info.get("plan") == plan_fp and info.get("side_sha256") == side_sha
            and path.stat().st_size == info.get("bytes") and sha256_file(path) == info.get("sha256"))


def probe_dims(model: Any, layers: Sequence[int], final: bool, device: torch.device) -> dict[str, dict[str, int]]:
    """Width of every stored hidden state, from a two-token forward (OPT-350M's layers differ from its final)."""
    ids = torch.full((1, 2), 2, dtype=torch.long, device=device)
    with torch.no_grad():
        hs = capture_hidden_states(model, ids, torch.ones_like(ids), list(layers), final=final)
    return {layer_key(k): {"d": int(v.shape[-1])} for k, v in hs.items()}


@torch.no_grad()
def fit_channel_means(model: Any, dataset: Any, layers: Sequence[Any], *, fit_tokens: int, seed: int, pad_id: int,
                      batch_tokens: int, max_batch_size: int, device: torch.device) -> dict[Any, Tensor]:
    """Per-channel means [d] (float32, CPU) of the rows the default token rule keeps, over a seeded sample of
    about `fit_tokens` tokens; `layers` may include "final". Sums run in float64 so batch order is immaterial."""
    sums: dict[Any, list] = {x: [0.0, 0] for x in layers}
    for hs, mask in fit_sample_states(model, dataset, layers, fit_tokens=fit_tokens, seed=seed, pad_id=pad_id,
                                      batch_tokens=batch_tokens, max_batch_size=max_batch_size, device=device):
        for layer in layers:
            keep, _ = DEFAULT_TOKEN_RULE.select(hs[layer], mask)
            rows = hs[layer][keep].double()
            sums[layer][0], sums[layer][1] = sums[layer][0] + rows.sum(0).cpu(), sums[layer][1] + rows.shape[0]
    return {layer: (s / max(n, 1)).float() for layer, (s, n) in sums.items()}


def rotations_for(dims: dict[str, dict[str, int]], seed: int) -> dict[Any, Tensor]:
    """One seeded orthogonal matrix per stored layer (layer i of the store's list gets seed + i)."""
    return {parse_layer(k): rotation_matrix(v["d"], seed + i)[0] for i, (k, v) in enumerate(dims.items())}


def write_side_files(out: Path, plan: dict[str, Any], model: Any, dataset: Any, *, final: bool, layers: Sequence[int],
                     lowrank_k: int, lowrank_energy: float, fit_tokens: int, seed: int, pad_id: int,
                     batch_tokens: int, max_batch_size: int, device: torch.device) -> None:
    """Side files, by rank 0 before any unit: the quantization's rotations and means, the LM head (with --final;
    a rotated store's head is rotated like its final state: (h Q)(W Q)^T = h W^T) and the low-rank bases."""
    quant = plan["content"].get("quant")
    if quant and not (out / QUANT_FILE).is_file():
        rotations = rotations_for(plan["info"]["dims"], quant["seed"]) if quant["rotated"] else {}
        means = {}
        if quant["fit_tokens"]:
            print(f"[cache] fitting per-channel means on ~{quant['fit_tokens']} tokens")
            raw = fit_channel_means(model, dataset, list(layers) + (["final"] if final else []),
                                    fit_tokens=quant["fit_tokens"], seed=seed, pad_id=pad_id,
                                    batch_tokens=batch_tokens, max_batch_size=max_batch_size, device=device)
            means = {k: m @ rotations[k] if k in rotations else m for k, m in raw.items()}
        write_quant_params(out / QUANT_FILE, rotations, means, {"plan": plan["fingerprint"]})
    if final and not (out / LM_HEAD_FILE).is_file():
        head = lm_head_of(model)
        if quant and quant["rotated"]:
            q = read_quant_params(out / QUANT_FILE)[0]["final"]  # float32: W Q has no exact bf16 form
            head = LMHead(head.weight.detach().float().cpu() @ q, head.bias)
        write_lm_head(out / LM_HEAD_FILE, head, {"plan": plan["fingerprint"]})
    if plan["content"]["lowrank"] and not (out / LOWRANK_FILE).is_file():
        print(f"[cache] fitting low-rank bases on ~{fit_tokens} tokens")
        bases, report = fit_lowrank(model, dataset, layers, k=lowrank_k, energy=lowrank_energy, fit_tokens=fit_tokens,
                                    seed=seed, pad_id=pad_id, batch_tokens=batch_tokens,
                                    max_batch_size=max_batch_size, device=device)
        write_lowrank(out / LOWRANK_FILE, bases, {"plan": plan["fingerprint"], "report": report})
