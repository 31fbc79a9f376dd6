"""Benchmark registry and loaders: every set becomes a list of `Sample`s (prompt text + reference answers).

A benchmark is named one of three ways:
- a registry name (`dolly`, `self_inst`, `vicuna`, `sinst`, `uinst`): a file in the data folder;
- a path to a JSONL file, with an optional field mapping (`output=answer`) when its fields have other names;
- `hub:NAME[:SPLIT]`: a Hugging Face dataset, when the machine is online (or the set is in the local hub cache);
- `fastchat:QUESTIONS.jsonl:ANSWERS.jsonl`: FastChat's two-file layout (Vicuna), joined by question_id.

Records carry `prompt` (used as is), or `instruction` and optional `input` (rendered with the Alpaca template),
and `output`: one reference string or a list of them (ROUGE-L takes the best).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from pipeline.data.prompts import render_prompt
from pipeline.data.sources import OUR_FIELDS
from pipeline.errors import DataError
from pipeline.io import read_jsonl as read_jsonl_lines, sha256_file, sha256_json

# name -> (file in the data folder, canonical field -> field in that file)
REGISTRY: dict[str, tuple[str, dict[str, str]]] = {
    "dolly": ("dolly_test.jsonl", {}),
    "self_inst": ("self_inst_test.jsonl", {}),
    "vicuna": ("vicuna_test.jsonl", {}),
    "sinst": ("sinst_test.jsonl", {}),
    "uinst": ("uinst_short_test.jsonl", {}),
}
CANONICAL_FIELDS = OUR_FIELDS  # the field names prepare uses: one vocabulary for both


class BenchmarkError(DataError):
    """A benchmark that cannot be read; the message names the file, line and field."""


@dataclass(frozen=True)
class Sample:
    index: int  # position in the set (after --max-samples); keys the sampling noise and the output order
    prompt: str
    references: tuple[str, ...]
    instruction: str = ""  # what --template chat renders with a model's chat template ("" when only a prompt
    input: str = ""  # field was given: the chat template then wraps that prompt text)


@dataclass(frozen=True)
class Benchmark:
    name: str  # used in output paths and tables
    source: str  # file path or hub id, for the record
    fingerprint: str  # content hash of the source, so a rerun notices changed data
    samples: tuple[Sample, ...]


def _mapping(fields: dict[str, str]) -> dict[str, str]:
    unknown = sorted(set(fields) - set(CANONICAL_FIELDS))
    if unknown:
        raise BenchmarkError(
            f"field map: unknown canonical field(s) {', '.join(unknown)}; known: {', '.join(CANONICAL_FIELDS)}"
        )
    return {name: fields.get(name, name) for name in CANONICAL_FIELDS}


def record_to_sample(record: Any, index: int, fields: dict[str, str], where: str) -> Sample:
    """One raw record -> Sample; `where` ("file:line") prefixes every error."""
    if not isinstance(record, dict):
        raise BenchmarkError(f"{where}: expected a JSON object, got {type(record).__name__}")
    m = _mapping(fields)
    if m["output"] not in record:
        raise BenchmarkError(f"{where}: missing field '{m['output']}' (the reference answer)")
    out = record[m["output"]]
    if isinstance(out, str):
        references = (out,)
    elif isinstance(out, list) and out and all(isinstance(r, str) for r in out):
        references = tuple(out)
    else:
        raise BenchmarkError(f"{where}: field '{m['output']}' must be a string or a non-empty list of strings")

    prompt = record.get(m["prompt"])
    instruction = record.get(m["instruction"])
    input_text = record.get(m["input"]) or ""
    if prompt is not None:
        if not isinstance(prompt, str) or not prompt:
            raise BenchmarkError(f"{where}: field '{m['prompt']}' must be a non-empty string")
    else:
        if not isinstance(instruction, str) or not instruction.strip():
            raise BenchmarkError(
                f"{where}: needs a '{m['prompt']}' or a non-empty '{m['instruction']}' string to build the prompt"
            )
        if not isinstance(input_text, str):
            raise BenchmarkError(f"{where}: field '{m['input']}' must be a string")
        prompt = render_prompt(instruction, input_text)
    plain = isinstance(instruction, str) and instruction.strip() and isinstance(input_text, str)
    return Sample(index=index, prompt=prompt, references=references, instruction=instruction if plain else "",
                  input=input_text if plain else "")


def read_jsonl(path: Path, fields: dict[str, str], max_samples: int = 0) -> list[Sample]:
    samples: list[Sample] = []
    try:
        lines = read_jsonl_lines(path)
    except DataError as e:
        raise BenchmarkError(str(e)) from None
    for lineno, record in lines:
        if max_samples and len(samples) >= max_samples:
            break
        samples.append(record_to_sample(record, len(samples), fields, f"{path}:{lineno}"))
    if not samples:
        raise BenchmarkError(f"{path}: no records")
    return samples


def _load_hub(spec: str, fields: dict[str, str], max_samples: int) -> Benchmark:
    name, _, split = spec[len("hub:"):].partition(":")
    split = split or "test"
    try:
        import datasets

        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # the hub client raises many types; all mean "not available here"
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
        hint = (
            " The machine is offline (HF_HUB_OFFLINE=1) and the set is not in the local cache: download it "
            "elsewhere, or export it to JSONL and pass the file's path."
            if offline
            else ""
        )
        raise BenchmarkError(f"hub benchmark {name!r} (split {split!r}) could not be loaded: {e}.{hint}") from e
    rows: Iterable[Any] = ds if not max_samples else ds.select(range(min(max_samples, len(ds))))
    samples = [record_to_sample(r, i, fields, f"{spec} row {i}") for i, r in enumerate(rows)]
    if not samples:
        raise BenchmarkError(f"{spec}: no records")
    fingerprint = sha256_json([name, split, getattr(ds, "_fingerprint", None), len(ds)])
    short = name.rstrip("/").split("/")[-1]
    return Benchmark(name=f"{short}-{split}", source=spec, fingerprint=fingerprint, samples=tuple(samples))


def _load_fastchat(spec: str, max_samples: int) -> Benchmark:
    """`fastchat:QUESTIONS.jsonl:ANSWERS.jsonl`, FastChat's layout (Vicuna's 80 questions): questions
    {"question_id", "turns": [text, ...]} and reference answers {"question_id", "choices": [{"turns": [...]}]} in
    two files, joined by question_id; the first turn is the instruction, each choice's first turn a reference."""
    parts = spec.split(":")
    if len(parts) != 3:
        raise BenchmarkError(f"{spec!r}: write fastchat:QUESTIONS.jsonl:ANSWERS.jsonl")
    questions, answers = Path(parts[1]), Path(parts[2])
    refs: dict[Any, list[str]] = {}
    for lineno, rec in read_jsonl_lines(answers):
        where = f"{answers}:{lineno}"
        try:
            refs.setdefault(rec["question_id"], []).extend(c["turns"][0] for c in rec["choices"])
        except (KeyError, IndexError, TypeError):
            raise BenchmarkError(f"{where}: expected {{\"question_id\", \"choices\": [{{\"turns\": [...]}}]}}") from None
    samples: list[Sample] = []
    for lineno, rec in read_jsonl_lines(questions):
        if max_samples and len(samples) >= max_samples:
            break
        where = f"{questions}:{lineno}"
        try:
            qid, turn = rec["question_id"], rec["turns"][0]
        except (KeyError, IndexError, TypeError):
            raise BenchmarkError(f"{where}: expected {{\"question_id\", \"turns\": [...]}}") from None
        if qid not in refs:
            raise BenchmarkError(f"{where}: question_id {qid!r} has no answer in {answers}")
        samples.append(record_to_sample({"instruction": turn, "output": refs[qid]}, len(samples), {}, where))
    if not samples:
        raise BenchmarkError(f"{questions}: no records")
    fingerprint = sha256_json([sha256_file(questions), sha256_file(answers)])
    return Benchmark(questions.stem, spec, fingerprint, tuple(samples))


def load_benchmark(spec: str, data_dir: str | Path, fields: dict[str, str] | None = None,
                   max_samples: int = 0) -> Benchmark:
    """Resolve a benchmark spec (registry name, JSONL path or hub:NAME[:SPLIT]) and read its samples."""
    fields = dict(fields or {})
    if spec in REGISTRY:
        filename, registry_fields = REGISTRY[spec]
        path = Path(data_dir) / filename
        if not path.is_file():
            raise BenchmarkError(
                f"benchmark {spec!r}: {path} not found; pass --data-dir (the folder holding {filename}) "
                "or set GEOKD_SHARED_DATA"
            )
        samples = read_jsonl(path, registry_fields, max_samples)
        return Benchmark(spec, str(path), sha256_file(path), tuple(samples))
    if spec.startswith("hub:"):
        return _load_hub(spec, fields, max_samples)
    if spec.startswith("fastchat:"):
        return _load_fastchat(spec, max_samples)
    path = Path(spec)
    if path.suffix == ".jsonl" or path.is_file():
        if not path.is_file():
            raise BenchmarkError(f"benchmark file {path} not found")
        samples = read_jsonl(path, fields, max_samples)
        return Benchmark(path.stem, str(path), sha256_file(path), tuple(samples))
    raise BenchmarkError(
        f"unknown benchmark {spec!r}: use one of {', '.join(REGISTRY)}, a path to a .jsonl file, or hub:NAME[:SPLIT]"
    )
