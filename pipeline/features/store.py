"""Reading a finished feature store: random access by sample id, and the training-side Dataset and collate.

Format: pipeline/features/format.py. Written by `./run.sh cache` (stages/cache.py, pipeline/features/cache.py).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from pipeline.errors import StoreError
from pipeline.features.format import (
    CLASS_LOGITS, DTYPES, FORMAT_VERSION, KIND, MANIFEST, PLAN, QUANT_FILE, QUANT_FORMAT_VERSION, Layer, crc32,
    layer_key, open_safetensors, parse_layer, read_lm_head, read_lowrank, read_quant_params, read_shard_index,
    verify_files,
)
from pipeline.features.quant import QuantSpec, dequantize
from pipeline.io import read_json
from pipeline.models.teacher import LMHead

class FeatureStore:
    """Random access to a finished feature store by sample id, through mmap (safetensors `safe_open`).

    Safe in DataLoader workers: file handles are opened lazily in the process that reads and dropped on pickling
    or after a fork. Every read checks the sample's CRC32 (`check_samples=False` skips that); `verify=True` also
    hashes every file against the manifest on open; a size check of every shard always runs.

    Low-rank stores: `get` returns `coeffs @ basis.T + mean` in fp32 by default, so the token rule sees each row's
    true norm (centred coefficients would change which rows count as massive); `reconstruct=False` returns the
    k coefficients themselves (the same D_P / D_FG / CKA over all tokens: the distances are invariant to
    rotations of the teacher's space and remove the mean).

    Quantized stores: `get` returns codes x scales + mean in the manifest's `dtype`; a rotated store's rows stay
    rotated (x Q: what training needs, and its `lm_head` is rotated to match) unless `unrotate=True`, which
    multiplies back by Q^T for readers of real channels (`analyze`).
    """

    def __init__(
        self, path: str | Path, *, verify: bool = False, reconstruct: bool = True, check_samples: bool = True,
        unrotate: bool = False,
    ) -> None:
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            hint = " (caching did not finish: rerun the same `./run.sh cache` command to resume)" if (
                self.path / PLAN).is_file() else ""
            raise StoreError(f"{self.path}: no {MANIFEST}, not a finished feature store{hint}")
        m = read_json(manifest_path)
        if m.get("kind") != KIND or m.get("format_version") not in (FORMAT_VERSION, QUANT_FORMAT_VERSION):
            raise StoreError(f"{manifest_path}: kind {m.get('kind')!r} version {m.get('format_version')!r}, "
                             f"expected {KIND!r} version {FORMAT_VERSION} or {QUANT_FORMAT_VERSION}")
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
        self.quant = QuantSpec.from_json(m["quant"]) if m.get("quant") else None
        rotations, self._means = read_quant_params(self.path / QUANT_FILE) if self.quant else ({}, {})
        self._unrotate = {k: q.T.contiguous() for k, q in rotations.items()} if unrotate else {}
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
        return read_lowrank(self.path / lr["file"]) if lr else {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def _handle(self, shard: int) -> Any:
        if self._pid != os.getpid():  # forked into a DataLoader worker: mmaps are reopened here, not shared
            self._handles, self._pid = {}, os.getpid()
        h = self._handles.get(shard)
        if h is None:
            h = self._handles[shard] = open_safetensors(self.path / self._shards[shard]["file"])
        return h

    # -- public API ---------------------------------------------------------------------------------------------
    @property
    def sample_ids(self) -> np.ndarray:
        return self._ids

    @property
    def split(self) -> str:
        """The prepared split the store was cached from."""
        return self.manifest["data"]["split"]

    @property
    def teacher_fingerprint(self) -> str:
        return self.manifest["teacher"]["fingerprint"]

    @property
    def teacher_depth(self) -> int:
        """The teacher's number of decoder layers (hidden states 0..depth exist)."""
        return int(self.manifest["teacher"]["n_layers"])

    @property
    def has_topk(self) -> bool:
        return bool(self.manifest.get("topk_logits"))

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
            if self.quant is not None:
                t = dequantize(t, self._read(s, r, a, b, f"scale.{layer_key(layer)}", sample_id), self.quant)
                t = t + self._means[layer] if layer in self._means else t
                t = (t @ self._unrotate[layer] if layer in self._unrotate else t).to(self.dtype)
            elif self.reconstruct and layer in self._lowrank:
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

    @property
    def has_class_logits(self) -> bool:
        return bool(self.manifest.get("class_logits"))

    def get_class_logits(self, sample_id: int) -> Tensor:
        """An encoder teacher's class logits `[C]` (float32) for the sample."""
        if not self.has_class_logits:
            raise StoreError(f"{self.path}: no class logits stored (a causal LM's store; cache an encoder classifier "
                             f"on classification data)")
        s, r, _, _ = self._locate(int(sample_id))
        return self._read(s, r, r, r + 1, CLASS_LOGITS, sample_id)[0]

    def lowrank_basis(self, layer: Layer) -> tuple[Tensor, Tensor] | None:
        """(basis [d, k], mean [d]) of a low-rank layer, None for a full one."""
        return self._lowrank.get(layer)

    def lm_head(self) -> LMHead:
        """The teacher's LM head: exact teacher logits are `lm_head().logits(features["final"])` (rotated like
        the final state it is given)."""
        info = self.manifest.get("lm_head")
        if not info:
            raise StoreError(f"{self.path}: no LM-head weight stored (cache with --final)")
        head = read_lm_head(self.path / info["file"])
        if "final" in self._unrotate:  # (W Q) Q^T = W
            head = LMHead(head.weight @ self._unrotate["final"], head.bias)
        return head

    def lm_head_weight(self) -> Tensor:
        """The teacher's LM-head weight [V, d]."""
        return self.lm_head().weight

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
        if self.store.has_class_logits:
            item["class_logits"] = self.store.get_class_logits(sid)
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
    from pipeline.data.prepared import collate_items

    batch = collate_items(items, pad_id)
    T = batch["input_ids"].shape[1]
    batch["features"] = pad_features(items, T, dtype)
    if "class_logits" in items[0]:
        batch["class_logits"] = torch.stack([item["class_logits"] for item in items])
    if "topk_values" in items[0]:
        for key in ("topk_values", "topk_indices"):
            k = items[0][key].shape[1]
            buf = torch.zeros(len(items), T, k, dtype=items[0][key].dtype)
            for b, item in enumerate(items):
                buf[b, : item[key].shape[0]] = item[key]
            batch[key] = buf
    return batch
