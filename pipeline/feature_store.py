"""The teacher feature store: shard format, shard writer, reader, verification, and the training-side Dataset.

Layout of a store folder (written by `stages/cache_teacher.py`, see pipeline/feature_cache.py):

    manifest.json                 kind "geokd.features"; written last, so its presence means the store is complete
    plan.json                     what is being cached and the unit split (written first; resume checks it)
    shards/unit-NNNNN.safetensors one per unit, a contiguous range of samples in TokenDataset order:
        sample_ids int64 [n], offsets int64 [n+1]    rows offsets[i]:offsets[i+1] belong to sample_ids[i]
        feat.<layer>  [n_tokens, d]   stored dtype; <layer> is the hidden-state index or "final";
                                      low-rank layers hold k PCA coefficients instead of d features
        topk.values float32 [n_tokens, k], topk.indices int32 [n_tokens, k]   (optional top-k log-probabilities)
        crc.<name> int64 [n]          CRC32 of each sample's rows of tensor <name>: the reader checks every sample it
                                      reads, so a flipped bit is an error naming the shard, never a silent wrong target
    shards/unit-NNNNN.json        written after its shard: the shard's sha256, sizes, and the plan it belongs to
    lowrank.safetensors           basis.<layer> float32 [d, k], mean.<layer> float32 [d] (optional)
    lm_head.safetensors           weight [V, d] of the teacher's LM head (when "final" is stored)

Why per-sample CRCs besides per-shard sha256: a DataLoader worker reads a few samples of many shards; hashing a
whole shard on first touch would read the store once per worker, while CRC32 (~2.5 GB/s per core) of the rows
actually read catches the same corruption where it matters, at about the cost of the read itself from page cache.
"""
from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from pipeline.io import atomic_path, read_json, sha256_file

KIND = "geokd.features"
FORMAT_VERSION = 1
SHARD_FORMAT = "geokd.features.shard/1"
MANIFEST = "manifest.json"
PLAN = "plan.json"
SHARD_DIR = "shards"
LOWRANK_FILE = "lowrank.safetensors"
LM_HEAD_FILE = "lm_head.safetensors"
TOKEN_RULE = (
    "every token of each sample, prompt and response, in TokenDataset order and without padding: "
    "row i of a sample's features is the teacher's hidden state at input_ids[i]"
)
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

Layer = int | str  # a hidden-state index (docs/contracts.md) or "final"


class StoreError(RuntimeError):
    """A feature store that cannot be used as asked; the message names the folder or shard and what is wrong."""


def layer_key(layer: Layer) -> str:
    return str(layer)


def parse_layer(key: str | int) -> Layer:
    if key == "final":
        return "final"
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


# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------
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
    n_tokens = int(offsets[-1])
    bounds = offsets.tolist()
    out: dict[str, Tensor] = {"sample_ids": sample_ids, "offsets": offsets}
    for name, t in tensors.items():
        if t.shape[0] != n_tokens:
            raise ValueError(f"{path.name}: tensor {name} has {t.shape[0]} rows, offsets say {n_tokens} tokens")
        t = t.contiguous()
        out[name] = t
        out[f"crc.{name}"] = torch.tensor([crc32(t[bounds[i] : bounds[i + 1]]) for i in range(n)], dtype=torch.int64)
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


# ---------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------
def _open(path: Path) -> Any:
    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:
        raise StoreError(f"{path}: not a readable safetensors file ({e}); run `./run.sh cache --verify --out "
                         f"{path.parent.parent}` and recompute it") from e


def read_shard_index(path: str | Path) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray], dict[str, Any]]:
    """A shard's sample_ids, offsets, per-sample CRCs and metadata, after structural checks (error names the shard)."""
    path = Path(path)
    f = _open(path)
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
            rows = f.get_slice(name).get_shape()[0]
            if rows != int(offsets[-1]) or crcs[name].shape != (n,):
                raise StoreError(f"{path}: tensor {name} has {rows} rows for {int(offsets[-1])} tokens (corrupt shard)")
    except StoreError:
        raise
    except Exception as e:
        raise StoreError(f"{path}: cannot read ({e})") from e
    return sample_ids.numpy(), offsets.numpy(), crcs, meta


class FeatureStore:
    """Random access to a finished feature store by sample id, through mmap (safetensors `safe_open`).

    Safe in DataLoader workers: file handles are opened lazily in the process that reads and dropped on pickling
    or after a fork. Every read checks the sample's CRC32 (`check_samples=False` skips that); `verify=True` also
    hashes every file against the manifest on open; a size check of every shard always runs.

    Low-rank stores: `get` returns the k PCA coefficients per token by default (the geometry losses are invariant
    to rotations of the teacher's space and the mean is removed by their centering, so coefficients give the same
    D_P / D_FG / CKA as the reconstruction); `reconstruct=True` returns `coeffs @ basis.T + mean` in fp32.
    """

    def __init__(
        self, path: str | Path, *, verify: bool = False, reconstruct: bool = False, check_samples: bool = True
    ) -> None:
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            hint = " (caching did not finish: rerun the same `./run.sh cache` command to resume)" if (
                self.path / PLAN).is_file() else ""
            raise StoreError(f"{self.path}: no {MANIFEST}, not a finished feature store{hint}")
        m = read_json(manifest_path)
        if m.get("kind") != KIND or m.get("format_version") != FORMAT_VERSION:
            raise StoreError(f"{manifest_path}: kind {m.get('kind')!r} version {m.get('format_version')!r}, "
                             f"expected {KIND!r} version {FORMAT_VERSION}")
        self.manifest: dict[str, Any] = m
        self.layers: list[Layer] = [parse_layer(k) for k in m["layers"]]
        self.dtype: torch.dtype = DTYPES[m["dtype"]]
        self.reconstruct = reconstruct
        self.check_samples = check_samples
        self._shards: list[dict[str, Any]] = m["shards"]
        self._quick_check()
        if verify:
            self.verify()
        self._build_index()
        self._lowrank = self._load_lowrank()
        self._handles: dict[int, Any] = {}
        self._pid = os.getpid()

    # -- open-time checks and index ---------------------------------------------------------------------------
    def _quick_check(self) -> None:
        problems = []
        for s in self._shards:
            p = self.path / s["file"]
            if not p.is_file():
                problems.append(f"{p}: missing")
            elif (size := p.stat().st_size) != s["bytes"]:
                problems.append(f"{p}: {size} bytes, manifest says {s['bytes']} (truncated or replaced)")
        if problems:
            raise StoreError(f"feature store {self.path} is damaged: " + "; ".join(problems))

    def _build_index(self) -> None:
        ids, shard_of, row_of = [], [], []
        self._offsets: list[np.ndarray] = []
        self._crcs: list[dict[str, np.ndarray]] = []
        for i, s in enumerate(self._shards):
            p = self.path / s["file"]
            sid, off, crcs, _ = read_shard_index(p)
            if len(sid) != s["n_samples"] or int(off[-1]) != s["n_tokens"]:
                raise StoreError(f"{p}: holds {len(sid)} samples / {int(off[-1])} tokens, manifest says "
                                 f"{s['n_samples']} / {s['n_tokens']}")
            ids.append(sid)
            shard_of.append(np.full(len(sid), i, dtype=np.int32))
            row_of.append(np.arange(len(sid), dtype=np.int64))
            self._offsets.append(off)
            self._crcs.append(crcs)
        all_ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        order = np.argsort(all_ids, kind="stable")
        self._ids = all_ids[order]
        self._shard_of = np.concatenate(shard_of)[order] if ids else np.zeros(0, np.int32)
        self._row_of = np.concatenate(row_of)[order] if ids else np.zeros(0, np.int64)
        dup = np.nonzero(self._ids[1:] == self._ids[:-1])[0]
        if len(dup):
            sid = int(self._ids[dup[0]])
            files = sorted({self._shards[int(self._shard_of[j])]["file"] for j in (dup[0], dup[0] + 1)})
            raise StoreError(f"{self.path}: sample id {sid} is stored twice ({', '.join(files)})")

    def _load_lowrank(self) -> dict[Layer, tuple[Tensor, Tensor]]:
        lr = self.manifest.get("lowrank")
        if not lr:
            return {}
        f = _open(self.path / lr["file"])
        return {parse_layer(k): (f.get_tensor(f"basis.{k}"), f.get_tensor(f"mean.{k}")) for k in lr["layers"]}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def _handle(self, shard: int) -> Any:
        if self._pid != os.getpid():  # forked into a DataLoader worker: mmaps are reopened here, not shared
            self._handles, self._pid = {}, os.getpid()
        h = self._handles.get(shard)
        if h is None:
            h = self._handles[shard] = _open(self.path / self._shards[shard]["file"])
        return h

    # -- public API ---------------------------------------------------------------------------------------------
    @property
    def sample_ids(self) -> np.ndarray:
        return self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, sample_id: int) -> bool:
        j = int(self._ids.searchsorted(sample_id))
        return j < len(self._ids) and int(self._ids[j]) == sample_id

    def feature_dim(self, layer: Layer) -> int:
        """Width of what `get` returns for `layer` (k for a low-rank layer unless reconstructing)."""
        dims = self.manifest["dims"][layer_key(layer)]
        return dims["d"] if self.reconstruct or layer not in self._lowrank else dims["stored"]

    def _locate(self, sample_id: int) -> tuple[int, int, int, int]:
        j = int(self._ids.searchsorted(sample_id))
        if j >= len(self._ids) or int(self._ids[j]) != sample_id:
            raise KeyError(f"sample id {sample_id} is not in feature store {self.path}")
        s, r = int(self._shard_of[j]), int(self._row_of[j])
        return s, r, int(self._offsets[s][r]), int(self._offsets[s][r + 1])

    def _read(self, s: int, r: int, a: int, b: int, name: str, sample_id: int) -> Tensor:
        try:
            t = self._handle(s).get_slice(name)[a:b]
        except Exception as e:
            raise StoreError(f"{self.path / self._shards[s]['file']}: cannot read {name} of sample {sample_id} "
                             f"({e})") from e
        if self.check_samples and crc32(t) != int(self._crcs[s][name][r]):
            raise StoreError(f"{self.path / self._shards[s]['file']}: checksum mismatch in {name} of sample "
                             f"{sample_id} (corrupt shard; `./run.sh cache --verify --out {self.path}` lists all)")
        return t

    def get(self, sample_id: int, layers: Sequence[Layer] | None = None) -> dict[Layer, Tensor]:
        """Features `[L, d]` of every token of the sample (the same tokens as TokenDataset's input_ids)."""
        s, r, a, b = self._locate(int(sample_id))
        out: dict[Layer, Tensor] = {}
        for layer in self.layers if layers is None else layers:
            if layer not in self.layers:
                raise KeyError(f"layer {layer!r} is not in feature store {self.path} (has {self.layers})")
            t = self._read(s, r, a, b, f"feat.{layer_key(layer)}", sample_id)
            if self.reconstruct and layer in self._lowrank:
                basis, mean = self._lowrank[layer]
                t = t.float() @ basis.T + mean
            out[layer] = t
        return out

    def get_topk(self, sample_id: int) -> tuple[Tensor, Tensor]:
        """Top-k teacher log-probabilities `[L, k]` (float32) and their token ids `[L, k]` (int32)."""
        if not self.manifest.get("topk_logits"):
            raise StoreError(f"{self.path}: no top-k logits stored (cache with --topk_logits K)")
        s, r, a, b = self._locate(int(sample_id))
        return (self._read(s, r, a, b, "topk.values", sample_id), self._read(s, r, a, b, "topk.indices", sample_id))

    def lowrank_basis(self, layer: Layer) -> tuple[Tensor, Tensor] | None:
        """(basis [d, k], mean [d]) of a low-rank layer, None for a full one."""
        return self._lowrank.get(layer)

    def lm_head_weight(self) -> Tensor:
        """The teacher's LM-head weight [V, d]: exact teacher logits are `features["final"] @ weight.T`."""
        info = self.manifest.get("lm_head")
        if not info:
            raise StoreError(f"{self.path}: no LM-head weight stored (cache with --final)")
        return _open(self.path / info["file"]).get_tensor("weight")

    def check_compatible(
        self,
        *,
        teacher_fingerprint: str | None = None,
        data_fingerprint: str | None = None,
        tokenizer_fingerprint: str | None = None,
        layers: Sequence[Layer] | None = None,
    ) -> None:
        """Refuse a store made with another teacher, data, tokenizer, or lacking a requested layer; name which."""
        m, diffs = self.manifest, []
        for what, given, stored in (
            ("teacher", teacher_fingerprint, m["teacher"]["fingerprint"]),
            ("data", data_fingerprint, m["data"]["fingerprint"]),
            ("tokenizer", tokenizer_fingerprint, m["tokenizer_fingerprint"]),
        ):
            if given is not None and given != stored:
                diffs.append(f"{what}: store has fingerprint {stored[:12]}, this run {given[:12]}")
        if layers is not None:
            missing = [layer for layer in layers if parse_layer(layer) not in self.layers]
            if missing:
                diffs.append(f"layers: store lacks {missing} (has {self.layers})")
        if diffs:
            raise StoreError(f"feature store {self.path} does not match this run: " + "; ".join(diffs))

    def verify(self) -> dict[str, Any]:
        """Hash every file against the manifest and check every shard's structure; raise naming all bad files."""
        problems = verify_files(self.path, self.manifest)
        if problems:
            raise StoreError(f"feature store {self.path} failed verification:\n  " + "\n  ".join(problems))
        m = self.manifest
        return {"shards": len(self._shards), "samples": m["n_samples"], "tokens": m["n_tokens"],
                "bytes": sum(s["bytes"] for s in self._shards)}


def verify_files(path: str | Path, manifest: dict[str, Any]) -> list[str]:
    """Problems found in a store's files (empty when sound): sha256 of every shard and side file, shard structure."""
    path, problems = Path(path), []
    files = [(s["file"], s["sha256"], s["bytes"]) for s in manifest["shards"]]
    for side in ("lowrank", "lm_head"):
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


# ---------------------------------------------------------------------------------------------------------------
# Training side: token samples joined with their stored features
# ---------------------------------------------------------------------------------------------------------------
class FeatureDataset(torch.utils.data.Dataset):
    """Items of a TokenDataset with `"features": {layer: Tensor[L, d]}` from the store (and top-k when asked)."""

    def __init__(self, tokens: Any, store: FeatureStore, layers: Sequence[Layer] | None = None,
                 topk: bool = False) -> None:
        self.tokens, self.store, self.topk = tokens, store, topk
        self.layers = list(store.layers if layers is None else layers)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = dict(self.tokens[i])
        sid, n = int(item["sample_id"]), int(item["input_ids"].shape[0])
        feats = self.store.get(sid, self.layers)
        for layer, t in feats.items():
            if t.shape[0] != n:
                raise StoreError(f"{self.store.path}: sample {sid} has {t.shape[0]} feature rows for layer {layer} "
                                 f"but {n} tokens: the store was made from other data")
        item["features"] = feats
        if self.topk:
            item["topk_values"], item["topk_indices"] = self.store.get_topk(sid)
        return item


def pad_features(items: Sequence[dict[str, Any]], T: int, dtype: torch.dtype | None = None) -> dict[Layer, Tensor]:
    """Stack each item's per-layer `[L_i, d]` features into `[B, T, d]`, right-padded with zeros like input_ids."""
    out: dict[Layer, Tensor] = {}
    for layer, first in items[0]["features"].items():
        buf = torch.zeros(len(items), T, first.shape[1], dtype=dtype or first.dtype)
        for b, item in enumerate(items):
            t = item["features"][layer]
            buf[b, : t.shape[0]] = t
        out[layer] = buf
    return out


def collate_with_features(items: Sequence[dict[str, Any]], pad_id: int, dtype: torch.dtype | None = None
                          ) -> dict[str, Any]:
    """`collate_batch` plus `"features": {layer: [B, T, d]}` aligned with its input_ids (attention_mask marks the
    valid rows); `dtype` casts features (e.g. torch.float32), None keeps the stored dtype."""
    from pipeline.data import collate_batch

    batch = collate_batch(items, pad_id)
    T = batch["input_ids"].shape[1]
    batch["features"] = pad_features(items, T, dtype)
    if "topk_values" in items[0]:
        for key in ("topk_values", "topk_indices"):
            k = items[0][key].shape[1]
            buf = torch.zeros(len(items), T, k, dtype=items[0][key].dtype)
            for b, item in enumerate(items):
                buf[b, : item[key].shape[0]] = item[key]
            batch[key] = buf
    return batch
