"""The feature store's on-disk format: names, shard writing and reading, checksums, side files, verification.

Layout of a store folder (written by `./run.sh cache`: stages/cache.py, pipeline/features/cache.py):

    manifest.json                 kind "geokd.features"; written last, so its presence means the store is complete
    plan.json                     what is being cached and the unit split (written first; resume checks it)
    shards/unit-NNNNN.safetensors one per unit, a contiguous range of samples in TokenDataset order:
        sample_ids int64 [n], offsets int64 [n+1]    rows offsets[i]:offsets[i+1] belong to sample_ids[i]
        feat.<layer>  [n_tokens, d]   stored dtype; <layer> is the hidden-state index or "final";
                                      low-rank layers hold k PCA coefficients instead of d features
        topk.values float32 [n_tokens, k], topk.indices int32 [n_tokens, k]   (optional top-k log-probabilities)
        sample.class_logits float32 [n, C]   one row per sample: an encoder classifier's class logits
        crc.<name> int64 [n]          CRC32 of each sample's rows of tensor <name>: the reader checks every sample it
                                      reads, so a flipped bit is an error naming the shard, never a silent wrong target
    shards/unit-NNNNN.json        written after its shard: the shard's sha256, sizes, and the plan it belongs to
    lowrank.safetensors           basis.<layer> float32 [d, k], mean.<layer> float32 [d] (optional)
    lm_head.safetensors           weight [V, d] of the teacher's LM head (when "final" is stored; rotated with the
                                  final state's matrix in a rotated store, so exact logits stay exact)
    quant.safetensors             rotation.<layer> float32 [d, d] (with --rotate), mean.<layer> float32 [d] (the
                                  per-channel mean subtracted before quantizing, in stored coordinates)

Quantized stores (`--quant`, format version 2; pipeline/features/quant.py): `feat.<layer>` holds the codes (int8,
float8_e4m3fn, or uint8 with two int4 codes a byte) and `scale.<layer>` bf16 [n_tokens, groups] their scales; the
manifest's `quant` says how to decode. Unquantized stores stay format version 1, byte for byte as before.

Why per-sample CRCs besides per-shard sha256: a DataLoader worker reads a few samples of many shards; hashing a
whole shard on first touch would read the store once per worker, while CRC32 (~2.5 GB/s per core) of the rows
actually read catches the same corruption where it matters, at about the cost of the read itself from page cache.
"""
from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from pipeline.errors import StoreError
from pipeline.io import atomic_path, sha256_file
from pipeline.models import FINAL
from pipeline.models.teacher import LMHead
from pipeline.runtime import DTYPES  # noqa: F401  (the store's dtype names are the pipeline's)

KIND = "geokd.features"
FORMAT_VERSION = 1
QUANT_FORMAT_VERSION = 2  # a store an older reader must refuse: its feat.<layer> tensors are codes, not features
SHARD_FORMAT = "geokd.features.shard/1"
MANIFEST = "manifest.json"
PLAN = "plan.json"
SHARD_DIR = "shards"
LOWRANK_FILE = "lowrank.safetensors"
LM_HEAD_FILE = "lm_head.safetensors"
QUANT_FILE = "quant.safetensors"
SIDE_FILES = {"lowrank": LOWRANK_FILE, "lm_head": LM_HEAD_FILE, "quant_params": QUANT_FILE}  # manifest key -> file

TOKEN_RULE = (
    "every token of each sample, prompt and response, in TokenDataset order and without padding: "
    "row i of a sample's features is the teacher's hidden state at input_ids[i]"
)

Layer = int | str  # a hidden-state index (docs/contracts.md) or "final"
PER_SAMPLE = "sample."  # tensors of one row per sample (class logits), not one per token
CLASS_LOGITS = "sample.class_logits"


def row_bounds(name: str, offsets: list[int]) -> list[int]:
    """Where each sample's rows of tensor `name` start and end."""
    return list(range(len(offsets))) if name.startswith(PER_SAMPLE) else offsets


def layer_key(layer: Layer) -> str:
    return str(layer)


def parse_layer(key: str | int) -> Layer:
    if key == FINAL:
        return FINAL
    try:
        return int(key)
    except (TypeError, ValueError):
        raise StoreError(f"layer {key!r} is neither a hidden-state index nor 'final'") from None


def shard_file(unit: int) -> str:
    return f"{SHARD_DIR}/unit-{unit:05d}.safetensors"


def sidecar_file(unit: int) -> str:
    return f"{SHARD_DIR}/unit-{unit:05d}.json"


_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def crc32(t: Tensor) -> int:
    """CRC32 of a tensor's bytes (any dtype, bf16 included: viewed as an integer type numpy knows)."""
    t = t if t.is_contiguous() else t.contiguous()
    return zlib.crc32(t.view(_SAME_SIZE_INT[t.element_size()]).numpy())


def _index_crc(sample_ids: Tensor, offsets: Tensor) -> int:
    return zlib.crc32(offsets.contiguous().view(torch.uint8).numpy(), crc32(sample_ids))


def write_shard(
    path: str | Path, *, sample_ids: Tensor, offsets: Tensor, tensors: dict[str, Tensor], metadata: dict[str, str]
) -> None:
    """Write one shard atomically: it appears under `path` only once complete and fsynced.

    `tensors` maps names ("feat.2", "topk.values", ...) to per-token tensors `[offsets[-1], ...]`. Raises StoreError
    naming the file when the folder is unwritable or the disk is full; no partial file is left behind.
    """
    path = Path(path)
    sample_ids = sample_ids.to(torch.int64).contiguous()
    offsets = offsets.to(torch.int64).contiguous()
    n = sample_ids.numel()
    if offsets.shape != (n + 1,) or int(offsets[0]) != 0 or bool((offsets[1:] < offsets[:-1]).any()):
        raise ValueError(f"{path.name}: offsets must be [n+1] non-decreasing from 0, got {offsets.tolist()[:8]}...")
    bounds = offsets.tolist()
    out: dict[str, Tensor] = {"sample_ids": sample_ids, "offsets": offsets}
    for name, t in tensors.items():
        rows = row_bounds(name, bounds)
        if t.shape[0] != rows[-1]:
            raise ValueError(f"{path.name}: tensor {name} has {t.shape[0]} rows, offsets say {rows[-1]}")
        t = t.contiguous()
        out[name] = t
        out[f"crc.{name}"] = torch.tensor([crc32(t[rows[i] : rows[i + 1]]) for i in range(n)], dtype=torch.int64)
    meta = _metadata({"format": SHARD_FORMAT, **metadata, "index_crc": str(_index_crc(sample_ids, offsets))})
    try:
        with atomic_path(path) as tmp:
            save_file(out, str(tmp), metadata=meta)
    except Exception as e:  # OSError from the folder, SafetensorError wrapping ENOSPC/EFBIG from the write
        raise StoreError(f"cannot write {path}: {e}") from e


def _metadata(info: dict[str, Any]) -> dict[str, str]:
    """safetensors metadata as ONE key holding sorted JSON: the library writes several keys in a per-process random
    order, which would make identical shards hash differently from run to run."""
    return {"geokd": json.dumps(info, sort_keys=True)}


def read_metadata(handle: Any) -> dict[str, Any]:
    """The geokd metadata of an open safetensors file ({} when it has none)."""
    raw = (handle.metadata() or {}).get("geokd")
    return json.loads(raw) if raw else {}


def save_tensors(path: str | Path, tensors: dict[str, Tensor], metadata: dict[str, Any] | None = None) -> None:
    """Atomic safetensors write for the store's side files (low-rank bases, LM head); bytes depend on content only."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=_metadata(metadata or {}))
    except Exception as e:
        raise StoreError(f"cannot write {path}: {e}") from e


def open_safetensors(path: Path) -> Any:
    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:
        raise StoreError(f"{path}: not a readable safetensors file ({e}); run `./run.sh cache --verify --out "
                         f"{path.parent.parent}` and recompute it") from e


def read_shard_index(path: str | Path) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray], dict[str, Any]]:
    """A shard's sample_ids, offsets, per-sample CRCs and metadata, after structural checks (error names the shard)."""
    path = Path(path)
    f = open_safetensors(path)
    try:
        meta = read_metadata(f)
        if meta.get("format") != SHARD_FORMAT:
            raise StoreError(f"{path}: not a geokd feature shard (format {meta.get('format')!r})")
        sample_ids, offsets = f.get_tensor("sample_ids"), f.get_tensor("offsets")
        if str(_index_crc(sample_ids, offsets)) != meta.get("index_crc"):
            raise StoreError(f"{path}: sample_ids/offsets checksum mismatch (corrupt shard)")
        crcs = {k[4:]: f.get_tensor(k).numpy() for k in f.keys() if k.startswith("crc.")}
        n = sample_ids.numel()
        for name in crcs:
            rows, want = f.get_slice(name).get_shape()[0], n if name.startswith(PER_SAMPLE) else int(offsets[-1])
            if rows != want or crcs[name].shape != (n,):
                raise StoreError(f"{path}: tensor {name} has {rows} rows, its index says {want} (corrupt shard)")
    except StoreError:
        raise
    except Exception as e:
        raise StoreError(f"{path}: cannot read ({e})") from e
    return sample_ids.numpy(), offsets.numpy(), crcs, meta


def verify_files(path: str | Path, manifest: dict[str, Any]) -> list[str]:
    """Problems found in a store's files (empty when sound): sha256 of every shard and side file, shard structure."""
    path, problems = Path(path), []
    files = [(s["file"], s["sha256"], s["bytes"]) for s in manifest["shards"]]
    for side in SIDE_FILES:
        if manifest.get(side):
            files.append((manifest[side]["file"], manifest[side]["sha256"], manifest[side]["bytes"]))
    for name, sha, size in files:
        p = path / name
        if not p.is_file():
            problems.append(f"{p}: missing")
        elif p.stat().st_size != size:
            problems.append(f"{p}: {p.stat().st_size} bytes, manifest says {size} (truncated or replaced)")
        elif sha256_file(p) != sha:
            problems.append(f"{p}: sha256 mismatch (corrupt)")
        elif name.startswith(SHARD_DIR):
            try:
                read_shard_index(p)
            except StoreError as e:
                problems.append(str(e))
    return problems


def write_lowrank(path: str | Path, bases: dict[Layer, tuple[Tensor, Tensor]], metadata: dict[str, Any]) -> None:
    """lowrank.safetensors: `basis.<layer>` [d, k] and `mean.<layer>` [d] (float32) for each low-rank layer."""
    tensors: dict[str, Tensor] = {}
    for layer, (basis, mean) in bases.items():
        tensors[f"basis.{layer_key(layer)}"], tensors[f"mean.{layer_key(layer)}"] = basis, mean
    save_tensors(path, tensors, metadata)


def read_lowrank(path: str | Path) -> dict[Layer, tuple[Tensor, Tensor]]:
    """{layer: (basis [d, k], mean [d])} from lowrank.safetensors."""
    f = open_safetensors(Path(path))
    keys = [k[len("basis."):] for k in f.keys() if k.startswith("basis.")]
    return {parse_layer(k): (f.get_tensor(f"basis.{k}"), f.get_tensor(f"mean.{k}")) for k in keys}


def read_lowrank_report(path: str | Path) -> dict[str, Any]:
    """The fit report stored in lowrank.safetensors' metadata (k, energy kept, ... per layer)."""
    return read_metadata(open_safetensors(Path(path)))["report"]


def write_lm_head(path: str | Path, head: LMHead, metadata: dict[str, Any]) -> None:
    """lm_head.safetensors: the teacher's LM head `weight` [V, d] (and `bias` [V] when it has one)."""
    tensors = {"weight": head.weight.detach().cpu()}
    if head.bias is not None:
        tensors["bias"] = head.bias.detach().cpu()
    save_tensors(path, tensors, metadata)


def read_lm_head(path: str | Path) -> LMHead:
    f = open_safetensors(Path(path))
    return LMHead(f.get_tensor("weight"), f.get_tensor("bias") if "bias" in f.keys() else None)


def write_quant_params(path: str | Path, rotations: dict[Layer, Tensor], means: dict[Layer, Tensor],
                       metadata: dict[str, Any]) -> None:
    """quant.safetensors: `rotation.<layer>` [d, d], the orthogonal matrix a layer's rows were multiplied by, and
    `mean.<layer>` [d], the mean then subtracted (float32 both; either may be absent)."""
    tensors = {f"rotation.{layer_key(k)}": q for k, q in rotations.items()}
    tensors.update({f"mean.{layer_key(k)}": m for k, m in means.items()})
    save_tensors(path, tensors, metadata)


def read_quant_params(path: str | Path) -> tuple[dict[Layer, Tensor], dict[Layer, Tensor]]:
    """(rotations, means) from quant.safetensors."""
    f = open_safetensors(Path(path))
    part = lambda prefix: {parse_layer(k[len(prefix):]): f.get_tensor(k)  # noqa: E731
                           for k in f.keys() if k.startswith(prefix)}
    return part("rotation."), part("mean.")
