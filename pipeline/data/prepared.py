"""Prepared data: examples -> token samples -> shards + manifest on disk, and the readers training uses.

Layout of a prepared folder (docs/contracts.md):
    manifest.json                      written last; a folder without it is incomplete
    tokenizer/                         save_pretrained copy of the tokenizer
    <split>/shard-NNNNN.safetensors    input_ids int32 [tokens], offsets int64 [n+1], prompt_lens int32 [n],
                                       sample_ids int64 [n]
    <split>/records.jsonl              {"sample_id", "prompt", "references"} per sample
Classification data (pipeline/data/classification.py) adds token_type_ids int8 [tokens] and class_labels int64 [n]
to each shard, {"sample_id", "text", "text_pair", "label"} records, and a manifest "task" block.

A sample's tokens are the tokenizer's own prefix (OPT: `</s>`), the prompt, the response, and EOS. The loss
covers the response and EOS only. A prompt over the limit keeps its head and its last tokens (the "### Response:"
line), or is dropped; a response over the total limit is cut and then has no EOS, so the model never learns
to stop mid-sentence.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from pipeline.data.prompts import chat_prompt, chat_suffix
from pipeline.data.sources import Example
from pipeline.data.tokenizer import encode_text, load_tokenizer, tokenizer_fingerprint
from pipeline.errors import ConfigError, DataError
from pipeline.io import atomic_path, read_json, sha256_file, write_json_atomic

MANIFEST_KIND = "geokd.prepared"
INCOMPLETE = ".prepare-incomplete"
RESPONSE_MARKER = "\n\n### Response:\n"
IGNORE_INDEX = -100


@dataclass
class TokenizedExample:
    sample_id: int
    input_ids: list[int]
    prompt_len: int
    prompt: str
    references: list[str]


def tokenize_examples(examples: Sequence[Example], tok: PreTrainedTokenizerBase, max_prompt_len: int = 256,
                      max_len: int = 512, prompt_overflow: str = "truncate", template: str = "alpaca"
                      ) -> tuple[list[TokenizedExample], dict]:
    """Token samples (sample_id = position in `examples`) and a report of what was truncated or dropped.

    `template` chat renders each instruction with the tokenizer's chat template; its special tokens are parsed
    as such (the template's own), and nothing is put in front (the template supplies any start token)."""
    chat = template == "chat"
    if chat:
        examples = [replace(e, prompt=chat_prompt(tok, e.instruction, e.input)) for e in examples]
        prefix, tail = [], len(tok(chat_suffix(tok), add_special_tokens=False)["input_ids"])
    else:
        prefix = tok("")["input_ids"]  # what the tokenizer itself puts in front of any text (OPT: </s>)
        tail = len(encode_text(tok, RESPONSE_MARKER))
    if prompt_overflow not in ("truncate", "drop"):
        raise ConfigError(f"prompt_overflow={prompt_overflow!r}: choose 'truncate' or 'drop'")
    if not len(prefix) + tail < max_prompt_len < max_len:
        raise ConfigError(f"need {len(prefix) + tail} < max_prompt_len ({max_prompt_len}) < max_len ({max_len})")
    batch = dict(add_special_tokens=False, split_special_tokens=True)
    prompt_ids = tok([e.prompt for e in examples], add_special_tokens=False, split_special_tokens=not chat
                     )["input_ids"]
    response_ids = tok([e.references[0] for e in examples], **batch)["input_ids"]
    dropped = {"empty_output": 0, "prompt_too_long": 0}
    truncated = {"prompt": 0, "response": 0}
    samples = []
    for sid, (ex, p, r) in enumerate(zip(examples, prompt_ids, response_ids)):
        if not ex.references[0].strip():
            dropped["empty_output"] += 1
            continue
        prompt_text = ex.prompt
        room = max_prompt_len - len(prefix)
        if len(p) > room:
            if prompt_overflow == "drop":
                dropped["prompt_too_long"] += 1
                continue
            p = p[: room - tail] + p[-tail:]
            prompt_text = tok.decode(p)
            truncated["prompt"] += 1
        ids = prefix + p
        prompt_len = len(ids)
        response = r + [tok.eos_token_id]
        if prompt_len + len(response) > max_len:
            response = r[: max_len - prompt_len]
            truncated["response"] += 1
        samples.append(TokenizedExample(sid, ids + response, prompt_len, prompt_text, list(ex.references)))
    return samples, {"examples": len(examples), "kept": len(samples), "dropped": dropped, "truncated": truncated}


def split_samples(samples: list[TokenizedExample], valid_fraction: float = 0.0, valid_size: int = 0,
                  seed: int = 42, main: str = "train") -> dict[str, list[TokenizedExample]]:
    """{main: ..., 'valid': ...} with a seeded random validation set; order within a split is kept."""
    if valid_fraction and valid_size:
        raise ConfigError("give valid_fraction or valid_size, not both")
    if not 0.0 <= valid_fraction < 1.0:
        raise ConfigError(f"valid_fraction={valid_fraction}: must be in [0, 1)")
    n_valid = valid_size or int(round(valid_fraction * len(samples)))
    if n_valid >= len(samples) and n_valid:
        raise ConfigError(f"a validation set of {n_valid} leaves no training samples out of {len(samples)}")
    if not n_valid:
        return {main: samples}
    if main == "valid":
        raise ConfigError("the main split cannot be called 'valid' when a validation set is split off")
    # Copies of one record (same prompt and references) go to the same side, so validation never scores what
    # training saw; without duplicates this is the plain first n_valid of the seeded permutation.
    groups: dict[tuple, list[int]] = {}
    for i, smp in enumerate(samples):
        groups.setdefault(content_key(smp), []).append(i)
    chosen: set[int] = set()
    for i in np.random.default_rng(seed).permutation(len(samples)).tolist():
        if len(chosen) >= n_valid:
            break
        chosen.update(groups[content_key(samples[i])])
    if len(chosen) >= len(samples):
        raise ConfigError(f"a validation set of {n_valid} leaves no training samples out of {len(samples)} "
                          f"(duplicates are kept on one side)")
    return {main: [s for i, s in enumerate(samples) if i not in chosen],
            "valid": [s for i, s in enumerate(samples) if i in chosen]}


def content_key(sample: TokenizedExample) -> tuple:
    return (sample.prompt, tuple(sample.references))


def count_duplicates(samples: Sequence[TokenizedExample]) -> int:
    """Samples that repeat an earlier one's prompt and references."""
    return len(samples) - len({content_key(s) for s in samples})


def length_stats(samples: Sequence[TokenizedExample]) -> dict[str, dict[str, float]]:
    out = {}
    parts = {"prompt": [s.prompt_len for s in samples],
             "response": [len(s.input_ids) - s.prompt_len for s in samples],
             "total": [len(s.input_ids) for s in samples]}
    for name, values in parts.items():
        v = np.asarray(values or [0])
        out[name] = {"min": int(v.min()), "mean": round(float(v.mean()), 1), "median": float(np.median(v)),
                     "p95": float(np.percentile(v, 95)), "max": int(v.max())}
    return out


def write_split(out: Path, name: str, samples: Sequence[TokenizedExample], shard_size: int,
                extra: Callable[[Sequence], dict[str, np.ndarray]] | None = None,
                record: Callable[[Any], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Write one split's shards and records; return its manifest entry (with per-file sha256). `extra(chunk)` adds
    arrays to each shard and `record(sample)` makes its records line (classification data)."""
    from safetensors.numpy import save_file

    shards = []
    for start in range(0, len(samples), shard_size):
        chunk = samples[start : start + shard_size]
        lengths = np.array([len(s.input_ids) for s in chunk], dtype=np.int64)
        tensors = {
            "input_ids": np.fromiter((t for s in chunk for t in s.input_ids), dtype=np.int32,
                                     count=int(lengths.sum())),
            "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            "prompt_lens": np.array([s.prompt_len for s in chunk], dtype=np.int32),
            "sample_ids": np.array([s.sample_id for s in chunk], dtype=np.int64),
            **(extra(chunk) if extra else {}),
        }
        rel = f"{name}/shard-{len(shards):05d}.safetensors"
        try:
            with atomic_path(out / rel) as tmp:
                save_file(tensors, str(tmp))
        except Exception as e:  # OSError, or safetensors' own error wrapping ENOSPC/EFBIG
            raise DataError(f"cannot write {out / rel}: {e}; nothing was left behind") from e
        shards.append({"file": rel, "samples": len(chunk), "tokens": int(lengths.sum()),
                       "sha256": sha256_file(out / rel)})
    rel = f"{name}/records.jsonl"
    with atomic_path(out / rel) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for s in samples:
                f.write(json.dumps(record(s) if record else {"sample_id": s.sample_id, "prompt": s.prompt,
                                   "references": s.references}, ensure_ascii=False) + "\n")
    return {"samples": len(samples), "tokens": sum(x["tokens"] for x in shards), "shards": shards,
            "records": {"file": rel, "sha256": sha256_file(out / rel)}}


def describe_difference(old: dict, new: dict) -> str:
    """What differs between an existing manifest and the one a rerun would write."""
    diffs = []
    old_src = [(s["spec"], s["sha256"]) for s in old.get("sources", [])]
    new_src = [(s["spec"], s["sha256"]) for s in new["sources"]]
    if old_src != new_src:
        diffs.append(f"sources {[s for s, _ in old_src]} (hashes {[h[:8] for _, h in old_src]}) vs "
                     f"{[s for s, _ in new_src]} (hashes {[h[:8] for _, h in new_src]})")
    if old.get("tokenizer", {}).get("fingerprint") != new["tokenizer"]["fingerprint"]:
        diffs.append(f"tokenizer {old.get('tokenizer', {}).get('spec')} vs {new['tokenizer']['spec']}")
    for key, value in new["config"].items():
        if key not in ("data", "out", "tokenizer") and old.get("config", {}).get(key) != value:
            diffs.append(f"{key} {old.get('config', {}).get(key)!r} vs {value!r}")
    return "; ".join(diffs) or "its fingerprint"


def claim_output_dir(out: Path, planned: dict) -> bool:
    """False if `out` already holds exactly the `planned` preparation; True once it is empty and marked ours.

    `planned` is the manifest-to-be (fingerprint, sources, tokenizer, config). A folder with another manifest is
    an error naming what differs, never overwritten; a folder we left incomplete (marker, no manifest) is
    cleared; any other non-empty folder is not ours to touch.
    """
    fingerprint = planned["fingerprint"]
    manifest = out / "manifest.json"
    if manifest.exists():
        old = read_json(manifest)
        if old.get("kind") != MANIFEST_KIND:
            raise FileExistsError(f"{out} holds a manifest of kind {old.get('kind')!r}, not prepared data")
        if old.get("fingerprint") == fingerprint:
            missing = [f["file"] for split in old["splits"].values() for f in split["shards"] + [split["records"]]
                       if not (out / f["file"]).is_file()]
            if missing or not (out / "tokenizer").is_dir():
                raise FileNotFoundError(f"{out} is damaged: {missing or ['tokenizer/']} missing; remove it and rerun")
            return False
        raise FileExistsError(f"{out} already holds prepared data from other inputs "
                              f"({describe_difference(old, planned)}); choose a new --out or remove it")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        if not (out / INCOMPLETE).exists():
            raise FileExistsError(f"{out} exists, is not empty and is not a prepared-data folder (no manifest.json); "
                                  f"choose a new --out")
        for child in out.iterdir():  # our own unfinished run: start over
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / INCOMPLETE).write_text(fingerprint + "\n")
    return True


def finish_output_dir(out: Path, manifest: dict) -> None:
    write_json_atomic(out / "manifest.json", manifest)
    (out / INCOMPLETE).unlink(missing_ok=True)


class TokenDataset(torch.utils.data.Dataset):
    """One split's samples, all shards concatenated in memory (int32 tokens: 11k Dolly samples are ~10 MB)."""

    def __init__(self, root: Path, entry: dict):
        from safetensors.numpy import load

        ids, offsets, prompt_lens, sample_ids, token_types, labels = [], [0], [], [], [], []
        for shard in entry["shards"]:
            path = root / shard["file"]
            if not path.is_file():
                raise FileNotFoundError(f"{path} is listed in the manifest but missing")
            # The whole shard is read anyway, so its sha256 costs little (~10 ms for Dolly's 6.7 MB): a flipped
            # bit is an error naming the shard, never a silently wrong token.
            raw = path.read_bytes()
            if hashlib.sha256(raw).hexdigest() != shard["sha256"]:
                raise DataError(f"{path}: sha256 differs from the manifest's (damaged or replaced since prepare "
                                f"wrote it); rerun prepare into a new --out")
            t = load(raw)
            if len(t["sample_ids"]) != shard["samples"] or len(t["offsets"]) != shard["samples"] + 1:
                raise DataError(f"{path}: {len(t['sample_ids'])} samples, manifest says {shard['samples']}")
            ids.append(t["input_ids"])
            offsets.extend((t["offsets"][1:] + offsets[-1]).tolist())
            prompt_lens.append(t["prompt_lens"])
            sample_ids.append(t["sample_ids"])
            token_types += [t["token_type_ids"]] if "token_type_ids" in t else []  # classification data only
            labels += [t["class_labels"]] if "class_labels" in t else []
        self._token_types = np.concatenate(token_types) if token_types else None
        self.class_labels = np.concatenate(labels) if labels else None
        self._ids = np.concatenate(ids) if ids else np.zeros(0, np.int32)
        self._offsets = np.asarray(offsets, dtype=np.int64)
        self.prompt_lens = np.concatenate(prompt_lens) if prompt_lens else np.zeros(0, np.int32)
        self.sample_ids = np.concatenate(sample_ids) if sample_ids else np.zeros(0, np.int64)
        self.lengths = np.diff(self._offsets)
        self._position = {int(s): i for i, s in enumerate(self.sample_ids)}

    def __len__(self) -> int:
        return len(self.sample_ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        a, b = self._offsets[i], self._offsets[i + 1]
        item = {"sample_id": int(self.sample_ids[i]), "input_ids": torch.from_numpy(self._ids[a:b].astype(np.int64)),
                "prompt_len": int(self.prompt_lens[i])}
        if self._token_types is not None:
            item["token_type_ids"] = torch.from_numpy(self._token_types[a:b].astype(np.int64))
        if self.class_labels is not None:
            item["label"] = int(self.class_labels[i])
        return item

    def position(self, sample_id: int) -> int:
        try:
            return self._position[int(sample_id)]
        except KeyError:
            raise KeyError(f"sample id {sample_id} is not in this split") from None


class PreparedData:
    """Read side of a prepared folder."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / "manifest.json").is_file():
            hint = " (an unfinished prepare run: rerun it)" if (self.path / INCOMPLETE).exists() else ""
            raise FileNotFoundError(f"{self.path} is not prepared data: no manifest.json{hint}")
        self.manifest = read_json(self.path / "manifest.json")
        if self.manifest.get("kind") != MANIFEST_KIND:
            raise DataError(f"{self.path}/manifest.json is of kind {self.manifest.get('kind')!r}, "
                             f"not {MANIFEST_KIND!r}")
        self.fingerprint: str = self.manifest["fingerprint"]
        self.tokenizer_fingerprint: str = self.manifest["tokenizer"]["fingerprint"]

    @property
    def task(self) -> dict | None:
        """{"type": "classification", "name", "labels", "metric", "pair"} for classification data, else None."""
        return self.manifest.get("task")

    @property
    def splits(self) -> list[str]:
        return list(self.manifest["splits"])

    def _entry(self, name: str) -> dict:
        if name not in self.manifest["splits"]:
            raise DataError(f"{self.path} has no split {name!r}; it has {', '.join(self.splits)}")
        return self.manifest["splits"][name]

    def tokenizer(self) -> PreTrainedTokenizerBase:
        tok = load_tokenizer(str(self.path / "tokenizer"), need_eos=self.task is None)
        if tokenizer_fingerprint(tok) != self.tokenizer_fingerprint:
            raise DataError(f"{self.path}/tokenizer does not match the fingerprint in its manifest")
        return tok

    def split(self, name: str = "train") -> TokenDataset:
        return TokenDataset(self.path, self._entry(name))

    def records(self, name: str = "train") -> list[dict]:
        with open(self.path / self._entry(name)["records"]["file"], encoding="utf-8") as f:
            return [json.loads(line) for line in f]

    def verify(self) -> dict[str, int]:
        """Check every file against the sha256 in the manifest; a DataError lists every bad one."""
        problems, files = [], 0
        for entry in self.manifest["splits"].values():
            for f in entry["shards"] + [entry["records"]]:
                path, files = self.path / f["file"], files + 1
                if not path.is_file():
                    problems.append(f"{path}: missing")
                elif sha256_file(path) != f["sha256"]:
                    problems.append(f"{path}: sha256 mismatch (changed since prepare wrote it)")
        if problems:
            raise DataError(f"{self.path}: {len(problems)} of {files} files damaged: " + "; ".join(problems))
        return {"files": files, "splits": len(self.manifest["splits"])}


def collate_batch(items: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of TokenDataset items; labels are -100 on the prompt and the padding."""
    if not items:
        raise ValueError("collate_batch: empty batch")
    width = max(len(x["input_ids"]) for x in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(items), width), dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    for row, x in enumerate(items):
        n, p = len(x["input_ids"]), x["prompt_len"]
        input_ids[row, :n] = x["input_ids"]
        attention_mask[row, :n] = 1
        labels[row, p:n] = x["input_ids"][p:]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "sample_ids": torch.tensor([x["sample_id"] for x in items], dtype=torch.long),
            "prompt_lens": torch.tensor([x["prompt_len"] for x in items], dtype=torch.long)}


def collate_items(items: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """A batch of either kind of prepared sample: `collate_classification` when the items carry class labels,
    else `collate_batch`."""
    return (collate_classification if "label" in items[0] else collate_batch)(items, pad_id)


def collate_classification(items: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad classification items: input_ids, attention_mask, token_type_ids (0 on padding) [B, T]; labels
    (class ids) and sample_ids [B]."""
    if not items:
        raise ValueError("collate_classification: empty batch")
    width = max(len(x["input_ids"]) for x in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(items), width), dtype=torch.long)
    token_type_ids = torch.zeros((len(items), width), dtype=torch.long)
    for row, x in enumerate(items):
        n = len(x["input_ids"])
        input_ids[row, :n] = x["input_ids"]
        attention_mask[row, :n] = 1
        if "token_type_ids" in x:
            token_type_ids[row, :n] = x["token_type_ids"]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids,
            "labels": torch.tensor([x["label"] for x in items], dtype=torch.long),
            "sample_ids": torch.tensor([x["sample_id"] for x in items], dtype=torch.long)}

