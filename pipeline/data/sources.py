"""Raw instruction data in the formats users have, read into one normalized `Example` list.

Formats, told apart per file by its fields:
- Alpaca / MiniLLM: `instruction`, `input` (optional), `output` (a string, or a list of references as in S-NI),
  optional `prompt` (used as given; otherwise the Alpaca template is rendered);
- raw Dolly: `instruction`, `context`, `response` (and `category`, ignored);
- Self-Instruct: `instruction` plus `instances: [{input, output}, ...]`, one example per instance;
- anything else through a field map, e.g. `--fields instruction=question output=answer`.

Local files are JSONL (or a JSON array), read strictly (UTF-8, a byte-order mark allowed, one JSON object per
line), so errors name the file and line; `datasets` is not used for them: its Arrow schema refuses a field that is
a string in one record and a list in another (references, as in S-NI), it skips blank lines and reports 0-based
rows. A name that is not a local path is loaded from the Hugging Face hub with `datasets`, which fails with a
clear message on an offline machine. prepare and eval read records through this one module.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from pipeline.data.builtin import BUILTIN_VERSION, builtin_split, parse_builtin_spec
from pipeline.data.prompts import render_prompt
from pipeline.errors import DataError
from pipeline.io import decode_utf8, read_jsonl, sha256_file, sha256_json

OUR_FIELDS = ("instruction", "input", "output", "prompt")


@dataclass
class Example:
    instruction: str
    input: str
    references: list[str]  # the first one is the training target; all of them are kept for scoring
    prompt: str
    where: str = field(default="", compare=False)  # "file:line" for messages


@dataclass
class Source:
    spec: str
    kind: str  # "file" | "builtin" | "hub"
    sha256: str
    format: str = ""
    records: int = 0
    examples: list[Example] = field(default_factory=list, repr=False)

    def manifest_entry(self) -> dict[str, Any]:
        return {"spec": self.spec, "kind": self.kind, "sha256": self.sha256, "format": self.format,
                "records": self.records, "examples": len(self.examples)}


def parse_field_map(items: Sequence[str], option: str = "--fields",
                    required: Sequence[str] = ("instruction", "output")) -> dict[str, str]:
    """['instruction=question', 'output=answer'] -> {'instruction': 'question', 'output': 'answer'}: our field
    names (OUR_FIELDS) mapped to the names a file uses. Prepare and eval read field maps alike."""
    out = {}
    for item in items:
        ours, sep, theirs = item.partition("=")
        if not sep or not theirs or ours not in OUR_FIELDS:
            raise DataError(f"{option} {item!r}: write OURS=THEIRS with OURS one of {', '.join(OUR_FIELDS)}")
        out[ours] = theirs
    if out and not set(required) <= out.keys():
        raise DataError(f"{option} must map at least " + " and ".join(f"{r}=..." for r in required))
    return out


def _records(path: Path, raw: bytes) -> list[tuple[int, dict]]:
    """(line number, or item number of a JSON array; record) of every record; a DataError names the first bad one."""
    if path.suffix == ".json" and raw.lstrip().startswith(b"["):
        try:
            items = json.loads(decode_utf8(path, raw))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None
        for i, obj in enumerate(items):
            if not isinstance(obj, dict):
                raise DataError(f"{path}: item {i}: expected a JSON object, got {type(obj).__name__}")
        return list(enumerate(items))
    rows = read_jsonl(path, raw)
    for number, obj in rows:
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{number}: expected one JSON object per line, got {type(obj).__name__}")
    return rows


def _detect_format(keys: set[str], field_map: dict[str, str]) -> str:
    if field_map:
        return "mapped"
    if "instances" in keys:
        return "self-instruct"
    if "response" in keys:
        return "dolly"
    if "output" in keys:
        return "alpaca"
    raise DataError(f"cannot tell the format from the fields {sorted(keys)}: expected output (Alpaca), "
                    f"response (Dolly) or instances (Self-Instruct); map others with --fields OURS=THEIRS")


def _text(value: Any, name: str, where: str, keys: set[str], required: bool) -> str:
    if value is None:
        if required and name in keys:
            raise DataError(f"{where}: field {name!r} is null")
        if required:
            raise DataError(f"{where}: record has no field {name!r}; its fields are: {', '.join(sorted(keys))}")
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    return value


def _references(value: Any, name: str, where: str, keys: set[str]) -> list[str]:
    if isinstance(value, list):
        if not value or not all(isinstance(v, str) for v in value):
            raise DataError(f"{where}: field {name!r} must be a string or a non-empty list of strings")
        return list(value)
    return [_text(value, name, where, keys, required=True)]


def _examples_from_row(row: dict, keys: set[str], fmt: str, field_map: dict[str, str], where: str) -> list[Example]:
    def make(instruction, input_text, refs, prompt, at=where):
        prompt = prompt or render_prompt(instruction, input_text)
        return Example(instruction, input_text, refs, prompt, at)

    def instruction_unless_prompt(name: str, prompt: str) -> str:
        # A record with its own prompt text needs no instruction to render one.
        if prompt and row.get(name) is None:
            return ""
        if not prompt and row.get(name) is None and name not in keys:
            raise DataError(f"{where}: record has no field {name!r} (nor a 'prompt' to use as given); its fields "
                            f"are: {', '.join(sorted(keys))}")
        return _text(row.get(name), name, where, keys, True)

    if fmt == "mapped":  # fields the map leaves out keep their own names
        names = {ours: field_map.get(ours, ours) for ours in OUR_FIELDS}
        prompt = _text(row.get(names["prompt"]), names["prompt"], where, keys, False)
        refs = _references(row.get(names["output"]), names["output"], where, keys)
        return [make(instruction_unless_prompt(names["instruction"], prompt),
                     _text(row.get(names["input"]), names["input"], where, keys, False), refs, prompt)]
    if fmt == "alpaca":
        prompt = _text(row.get("prompt"), "prompt", where, keys, False)
        refs = _references(row.get("output"), "output", where, keys)
        return [make(instruction_unless_prompt("instruction", prompt),
                     _text(row.get("input"), "input", where, keys, False), refs, prompt)]
    instruction = _text(row.get("instruction"), "instruction", where, keys, True)
    if fmt == "dolly":
        return [make(instruction, _text(row.get("context"), "context", where, keys, False),
                     _references(row.get("response"), "response", where, keys), "")]
    if fmt == "self-instruct":
        instances = row.get("instances")
        if not isinstance(instances, list) or not instances:
            raise DataError(f"{where}: field 'instances' must be a non-empty list of {{input, output}} objects")
        out = []
        for j, inst in enumerate(instances):
            at = f"{where} instance {j}"
            if not isinstance(inst, dict):
                raise DataError(f"{at}: expected an object with input and output")
            ikeys = {k for k, v in inst.items() if v is not None}
            out.append(make(instruction, _text(inst.get("input"), "input", at, ikeys, False),
                            _references(inst.get("output"), "output", at, ikeys), "", at))
        return out
    raise AssertionError(fmt)


def examples_from_rows(spec: str, rows: list[dict], keys_per_row: list[set[str]], wheres: list[str],
                      field_map: dict[str, str]) -> tuple[str, list[Example]]:
    if not rows:
        raise DataError(f"{spec}: no records (the dataset is empty)")
    try:
        fmt = _detect_format(set().union(*keys_per_row), field_map)
    except DataError as e:
        raise DataError(f"{spec}: {e}") from None
    if not field_map:  # one format a file: name the first record of another format, not line 1
        first: tuple[str, str] | None = None
        for keys, where in zip(keys_per_row, wheres):
            try:
                this = _detect_format(keys, field_map)
            except DataError:
                continue  # no format's fields at all: the row's own parse names what it lacks
            if first is None:
                first = (this, where)
            elif this != first[0]:
                raise DataError(f"{where}: a {this} record in a file whose first record ({first[1]}) is "
                                f"{first[0]}; one format a file (or map the fields with --fields)")
        fmt = first[0] if first else fmt
    examples: list[Example] = []
    for row, keys, where in zip(rows, keys_per_row, wheres):
        examples.extend(_examples_from_row(row, keys, fmt, field_map, where))
    return fmt, examples


def read_file(path: str | Path, field_map: dict[str, str] | None = None) -> Source:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    raw = raw.removeprefix(b"\xef\xbb\xbf")  # a byte-order mark
    records = _records(path, raw)
    if not records:
        raise DataError(f"{path}: no records (the file is empty)")
    rows = [obj for _, obj in records]
    line_word = "item" if path.suffix == ".json" and raw.lstrip().startswith(b"[") else "line"
    wheres = [f"{path}:{n}" if line_word == "line" else f"{path} item {n}" for n, _ in records]
    fmt, examples = examples_from_rows(str(path), rows, [set(r) for r in rows], wheres, field_map or {})
    return Source(spec=str(path), kind="file", sha256=sha256_file(path), format=fmt, records=len(rows),
                  examples=examples)


def read_builtin(split: str) -> Source:
    records = builtin_split(split)
    fmt, examples = examples_from_rows(f"builtin:{split}", records, [set(r) for r in records],
                                      [f"builtin:{split} record {i}" for i in range(len(records))], {})
    return Source(spec=f"builtin:{split}", kind="builtin", format=fmt, records=len(records), examples=examples,
                  sha256=sha256_json({"version": BUILTIN_VERSION, "records": records}))


def read_hub(name: str, split: str, field_map: dict[str, str] | None = None) -> Source:
    import datasets

    offline = {os.environ.get(v, "").upper() for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    if offline & {"1", "ON", "YES", "TRUE"}:
        raise DataError(f"{name!r} is not a local file, and this machine is offline (HF_HUB_OFFLINE=1), so it "
                        f"cannot be loaded from the Hugging Face hub; give a local JSONL path or 'builtin'")
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:
        raise DataError(f"cannot load {name!r} (split {split!r}) from the Hugging Face hub: {e}; "
                        f"if it is meant to be a local file, check the path") from e
    rows = ds.to_list()
    keys = [{k for k, v in r.items() if v is not None} for r in rows]
    fmt, examples = examples_from_rows(name, rows, keys, [f"{name}[{split}] row {i}" for i in range(len(rows))],
                                      field_map or {})
    return Source(spec=f"{name}[{split}]", kind="hub", sha256=ds._fingerprint, format=fmt, records=len(rows),
                  examples=examples)


def read_source(spec: str, field_map: dict[str, str] | None = None, hub_split: str = "train") -> Source:
    """One `--data` entry: `builtin[:split]`, a local .jsonl/.json file, or a hub dataset name."""
    split = parse_builtin_spec(spec)
    if split is not None:
        if field_map:
            raise DataError("--fields does not apply to the built-in dataset")
        return read_builtin(split)
    path = Path(spec).expanduser()
    if path.exists() or path.suffix in (".jsonl", ".json") or spec.startswith((".", "/", "~")):
        if not path.exists():
            raise DataError(f"{spec}: no such file")
        if path.is_dir():
            raise DataError(f"{spec}: is a directory; give the JSONL files in it")
        return read_file(path, field_map)
    return read_hub(spec, hub_split, field_map)
