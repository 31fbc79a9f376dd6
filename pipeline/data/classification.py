"""Classification data for BERT-family encoders: GLUE's CoLA, RTE and MRPC, and a generic JSONL form.

`--data` is a folder holding `train.tsv` + `dev.tsv` (or `train.jsonl` + `dev.jsonl`) -> splits `train` and
`valid`: GLUE's test labels are not public, so its labelled `dev` set (what papers report) becomes `valid`; or one
file -> split `--split`, with `--valid_size` / `--valid_fraction` carving `valid` out of it as for instruction data.
A `.tsv` has its task's GLUE layout (TSV_LAYOUTS), read with no quote processing (a sentence may hold a bare `"`)
and a UTF-8 byte-order mark allowed (MRPC's). A `.jsonl` holds `{"text", "text_pair" (optional), "label"}` rows; a
label is a name, or an integer: the label its digits spell if there is one, else the label of that index. Task
`classification` takes its labels from `--labels`, else the train file's (sorted; numerically when all are
integers), its metric from `--metric` (accuracy). Label id = index in `TaskSpec.labels`. Texts are encoded with the
tokenizer's own pair encoding (BERT: [CLS] a [SEP] b [SEP], token types 0 then 1), truncated longest-first to
`--max_len`; shards add `token_type_ids` int8 [tokens] and `class_labels` int64 [n] to prepared.py's arrays
(prompt_lens = each sample's full length, so a causal-LM collate would put no LM label).
"""
from __future__ import annotations

import time
from collections import namedtuple
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
from transformers import PreTrainedTokenizerBase

from pipeline.config import config_to_dict
from pipeline.data.prepared import (
    MANIFEST_KIND, TokenizedExample, count_duplicates, finish_output_dir, length_stats, split_samples, write_split,
)
from pipeline.data.tokenizer import load_tokenizer, tokenizer_fingerprint
from pipeline.errors import ConfigError, DataError, GeokdError
from pipeline.io import read_jsonl, read_text, sha256_file, sha256_json

GENERIC_TASK = "classification"
METRICS = ("accuracy", "f1", "mcc")


@dataclass(frozen=True)
class TaskSpec:
    name: str
    labels: tuple[str, ...]  # label id = index
    metric: str  # eval/metrics.py: mcc, accuracy, f1
    pair: bool  # sentence pairs (text, text_pair)

    def manifest_entry(self) -> dict[str, Any]:
        return {"type": "classification", "name": self.name, "labels": list(self.labels), "metric": self.metric,
                "pair": self.pair}


TASKS = {
    "cola": TaskSpec("cola", ("unacceptable", "acceptable"), "mcc", False),
    "rte": TaskSpec("rte", ("entailment", "not_entailment"), "accuracy", True),
    "mrpc": TaskSpec("mrpc", ("not_equivalent", "equivalent"), "f1", True),
}

# GLUE's columns, whether the file has them as a header, the text / pair / label columns, the file's labels in id order
TsvLayout = namedtuple("TsvLayout", "columns header text pair label raw_labels")
TSV_LAYOUTS = {
    "cola": TsvLayout(("source", "label", "original label", "sentence"), False, 3, None, 1, ("0", "1")),
    "rte": TsvLayout(("index", "sentence1", "sentence2", "label"), True, 1, 2, 3, ("entailment", "not_entailment")),
    "mrpc": TsvLayout(("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"), True, 3, 4, 0, ("0", "1")),
}


class ClassExample(NamedTuple):
    text: str
    text_pair: str | None
    label: int  # label id


@dataclass
class ClassSource:
    path: str
    sha256: str
    format: str  # "glue-tsv" | "jsonl"
    records: int
    examples: list[ClassExample]
    task: TaskSpec


@dataclass
class ClassSample(TokenizedExample):  # prompt = text, references = [text_pair or ""]: split_samples' content key
    token_type_ids: list[int] = field(default_factory=list)
    label: int = 0
    text_pair: str | None = None


def _read_tsv(path: Path, task: TaskSpec) -> list[ClassExample]:
    layout = TSV_LAYOUTS[task.name]
    lines = [(n, line.removesuffix("\r")) for n, line in enumerate(read_text(path).split("\n"), start=1)]
    if layout.header:
        if lines[0][1].split("\t") != list(layout.columns):
            raise DataError(f"{path} line 1: expected the {task.name} header {' | '.join(layout.columns)} "
                            f"(tab-separated), got {lines[0][1][:80]!r}")
        lines = lines[1:]
    examples = []
    for n, line in lines:
        if not line.strip():
            continue
        cells = line.split("\t")
        if len(cells) != len(layout.columns):
            raise DataError(f"{path} line {n}: {len(cells)} tab-separated column(s); {task.name} has "
                            f"{len(layout.columns)} ({', '.join(layout.columns)})")
        raw = cells[layout.label]
        if raw not in layout.raw_labels:
            raise DataError(f"{path} line {n}: label {raw!r} is not one of " + ", ".join(
                f"{r} ({name})" for r, name in zip(layout.raw_labels, task.labels)))
        for col in (layout.text, layout.pair):
            if col is not None and not cells[col].strip():
                raise DataError(f"{path} line {n}: empty {layout.columns[col]}")
        examples.append(ClassExample(cells[layout.text], None if layout.pair is None else cells[layout.pair],
                                     layout.raw_labels.index(raw)))
    return examples


def _jsonl_rows(path: Path) -> list[tuple[str, str, str | None, str | int]]:
    """(where, text, text_pair, raw label) of every row."""
    rows = []
    for n, row in read_jsonl(path):
        where = f"{path} line {n}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object with text, label and optionally text_pair")
        text, pair, label = row.get("text"), row.get("text_pair"), row.get("label")
        for name, value in (("text", text), ("text_pair", pair)):
            if (value is not None or name == "text") and (not isinstance(value, str) or not value.strip()):
                raise DataError(f"{where}: {name!r} must be a non-empty string, got {value!r}")
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            raise DataError(f"{where}: 'label' must be a string or an integer, got {label!r}")
        rows.append((where, text, pair, label))
    if not rows:
        raise DataError(f"{path}: no records (the file is empty)")  # before the labels are taken from it
    return rows


def label_id(raw: str | int, labels: Sequence[str], where: str) -> int:
    """A name's index; an integer is the label spelled by its digits, else the label of that index."""
    if str(raw) in labels:
        return list(labels).index(str(raw))
    if isinstance(raw, int) and 0 <= raw < len(labels):
        return raw
    raise DataError(f"{where}: label {raw!r} is not one of the labels {', '.join(labels)} "
                    f"(names, or ids 0..{len(labels) - 1})")


def generic_task(path: Path, rows: list, labels: Sequence[str], metric: str) -> TaskSpec:
    if not labels:
        seen = {r[3] for r in rows}
        labels = [str(v) for v in sorted(seen, key=None if all(isinstance(v, int) for v in seen) else str)]
        if len(labels) < 2:
            raise DataError(f"{path}: every row has label {labels[0]!r}; a classifier needs two or more (or give "
                            f"--labels)")
    if metric == "f1" and len(labels) != 2:
        raise DataError(f"{path}: --metric f1 is binary, but the labels are {', '.join(labels)}")
    return TaskSpec(GENERIC_TASK, tuple(labels), metric or "accuracy", any(r[2] is not None for r in rows))


def read_classification(path: str | Path, task: str | TaskSpec, labels: Sequence[str] = (), metric: str = ""
                        ) -> ClassSource:
    """A .tsv (GLUE layout of `task`) or .jsonl file; `task` a name (`classification`: resolved from this file,
    `labels`, `metric`) or the TaskSpec of the split read before (a dev file reads with its train file's)."""
    path = Path(path).expanduser()
    if isinstance(task, str) and task != GENERIC_TASK and task not in TASKS:
        raise ConfigError(f"task {task!r}: choose one of {', '.join([*TASKS, GENERIC_TASK])}")
    if path.suffix == ".tsv":
        spec = TASKS.get(task) if isinstance(task, str) else task
        if spec is None or spec.name not in TSV_LAYOUTS:
            raise DataError(f"{path}: a .tsv is read in a GLUE task's layout (--task {', '.join(TASKS)}); "
                            f"--task {GENERIC_TASK} reads JSONL (text, text_pair, label)")
        examples = _read_tsv(path, spec)
        if not examples:
            raise DataError(f"{path}: no records")
        return ClassSource(str(path), sha256_file(path), "glue-tsv", len(examples), examples, spec)
    if path.suffix != ".jsonl":
        raise DataError(f"{path}: classification data is a .tsv (GLUE) or .jsonl file, or a folder of them")
    rows = _jsonl_rows(path)
    spec = task if isinstance(task, TaskSpec) else TASKS.get(task) or generic_task(path, rows, labels, metric)
    examples = []
    for where, text, pair, raw in rows:
        if spec.name in TASKS and (pair is None) == spec.pair:
            raise DataError(f"{where}: {spec.name} is a " + ("sentence-pair task: 'text_pair' is missing" if spec.pair
                            else "single-sentence task: no 'text_pair' field"))
        examples.append(ClassExample(text, pair, label_id(raw, spec.labels, where)))
    return ClassSource(str(path), sha256_file(path), "jsonl", len(rows), examples, spec)


def tokenize_classification(examples: Sequence[ClassExample], tok: PreTrainedTokenizerBase, max_len: int
                            ) -> tuple[list[ClassSample], int]:
    """Samples (sample_id = position in `examples`) and how many were truncated to `max_len`."""
    samples: list[ClassSample | None] = [None] * len(examples)
    truncated = 0
    for with_pair in (False, True):
        idx = [i for i, e in enumerate(examples) if (e.text_pair is not None) == with_pair]
        if not idx:  # the tokenizer refuses an empty batch
            continue
        enc = tok([examples[i].text for i in idx], [examples[i].text_pair for i in idx] if with_pair else None,
                  truncation=True, max_length=max_len)
        types = enc.get("token_type_ids") or [[0] * len(ids) for ids in enc["input_ids"]]
        for j, i in enumerate(idx):
            ids, ex = enc["input_ids"][j], examples[i]
            if len(ids) == max_len:  # at the limit: was it cut?
                truncated += len(tok(ex.text, ex.text_pair)["input_ids"]) > max_len
            samples[i] = ClassSample(i, list(ids), len(ids), ex.text, [ex.text_pair or ""], list(types[j]),
                                     ex.label, ex.text_pair)
    return samples, truncated  # type: ignore[return-value]


def data_files(spec: str, task: str) -> list[tuple[str | None, Path]]:
    """[("train", train file), ("valid", dev file)] for a folder, [(None, file)] for a file."""
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(f"--data {spec}: no such file or folder")
    if not path.is_dir():
        return [(None, path)]
    for ext in (".jsonl",) if task == GENERIC_TASK else (".tsv", ".jsonl"):
        if (path / f"train{ext}").is_file() and (path / f"dev{ext}").is_file():
            return [("train", path / f"train{ext}"), ("valid", path / f"dev{ext}")]
    names = sorted(p.name for p in path.iterdir() if p.suffix in (".tsv", ".jsonl"))
    raise DataError(f"--data {spec}: a folder needs train.tsv and dev.tsv (or train.jsonl and dev.jsonl); it "
                    f"holds {', '.join(names) or 'neither'}")


def plan_classification(config: Any, settings: dict, start: float) -> tuple[dict, Callable[[Path], dict]]:
    """Read the files and the tokenizer: the manifest-to-be, and the function that fills a claimed folder (tokenize,
    split, shards, tokenizer copy, manifest last) and returns the manifest. `settings`: the fingerprinted options."""
    files = data_files(config.data[0], config.task)
    sources = [read_classification(files[0][1], config.task, config.label_names(), config.metric)]
    sources += [read_classification(p, sources[0].task) for _, p in files[1:]]
    for s in sources:
        s.examples = s.examples[: config.limit or None]
    task = sources[0].task
    tok = load_tokenizer(config.tokenizer, need_eos=False)
    tok_fp = tokenizer_fingerprint(tok)
    names = [name or config.split for name, _ in files]
    planned = {
        "kind": MANIFEST_KIND,
        "fingerprint": sha256_json({"sources": [s.sha256 for s in sources], "tokenizer": tok_fp,
                                    "settings": settings}),
        "sources": [{"spec": s.path, "kind": "file", "sha256": s.sha256, "format": s.format, "records": s.records,
                     "examples": len(s.examples), "split": n} for s, n in zip(sources, names)],
        "tokenizer": {"spec": config.tokenizer, "fingerprint": tok_fp, "size": len(tok),
                      "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id},
        "config": config_to_dict(config),
        "task": task.manifest_entry(),
    }

    def record(s: ClassSample) -> dict[str, Any]:
        return {"sample_id": s.sample_id, "text": s.prompt, "text_pair": s.text_pair, "label": task.labels[s.label]}

    def write(out: Path) -> dict:
        splits, truncated, every = {}, 0, []
        for s, name in zip(sources, names):
            samples, cut = tokenize_classification(s.examples, tok, config.max_len)
            truncated, every = truncated + cut, every + samples
            splits.update(split_samples(samples, config.valid_fraction, config.valid_size, config.seed, name)
                          if len(files) == 1 else {name: samples})
        try:
            tok.save_pretrained(out / "tokenizer")
        except Exception as e:  # the tokenizers library reports a full disk as a plain Exception
            raise GeokdError(f"cannot write {out / 'tokenizer'}: {e}; nothing was left behind") from e
        manifest = dict(planned)
        manifest["splits"] = {name: write_split(out, name, part, config.shard_size, class_arrays, record)
                              for name, part in splits.items()}
        manifest["counts"] = {
            "records": sum(s.records for s in sources), "examples": len(every), "kept": len(every),
            "truncated": truncated, "duplicates": count_duplicates(every),
            "splits": {name: len(part) for name, part in splits.items()},
            "labels": {name: {label: sum(s.label == i for s in part) for i, label in enumerate(task.labels)}
                       for name, part in splits.items()}}
        manifest["stats"] = {name: {"total": length_stats(part)["total"]} for name, part in splits.items()}
        manifest["wall_s"] = round(time.time() - start, 2)
        finish_output_dir(out, manifest)
        return manifest

    return planned, write


def class_arrays(chunk: Sequence[ClassSample]) -> dict[str, np.ndarray]:
    return {"token_type_ids": np.array([t for s in chunk for t in s.token_type_ids], dtype=np.int8),
            "class_labels": np.array([s.label for s in chunk], dtype=np.int64)}

