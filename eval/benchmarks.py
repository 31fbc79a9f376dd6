"""Benchmark registry and loaders: every set becomes a list of `Sample`s (prompt text + reference answers).

A benchmark is named one of three ways:
- a registry name (`dolly`, `self_inst`, `vicuna`, `sinst`, `uinst`): a file in the data folder;
- a path to a JSONL file, with an optional field mapping (`output=answer`) when its fields have other names;
- `hub:NAME[:SPLIT]`: a Hugging Face dataset, when the machine is online (or the set is in the local hub cache);
- `fastchat:QUESTIONS.jsonl:ANSWERS.jsonl`: FastChat's two-file layout (Vicuna), joined by question_id.

Records are read by prepare's reader (pipeline/data/sources.py), so both stages take the same formats: Alpaca /
MiniLLM (`prompt` used as is, or `instruction` and optional `input` rendered with the Alpaca template, and
`output`: one reference string or a list of them; ROUGE-L takes the best), raw Dolly, Self-Instruct's
`instances` (one sample each), or any fields through a map.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.data.sources import Example, examples_from_rows, read_file
from pipeline.errors import DataError
from pipeline.io import read_jsonl as read_jsonl_lines, sha256_file, sha256_json

# name -> (file in the data folder, our field -> field in that file)
REGISTRY: dict[str, tuple[str, dict[str, str]]] = {
    "dolly": ("dolly_test.jsonl", {}),
    "self_inst": ("self_inst_test.jsonl", {}),
    "vicuna": ("vicuna_test.jsonl", {}),
    "sinst": ("sinst_test.jsonl", {}),
    "uinst": ("uinst_short_test.jsonl", {}),
}


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
    left_out: str = ""  # records of the source that are not scored, and why ("" when none)


def samples_of(examples: list[Example], max_samples: int = 0) -> list[Sample]:
    """prepare's records (pipeline/data/sources.py reads every format for both stages) as scored samples."""
    chosen = examples[:max_samples] if max_samples else examples
    return [Sample(index=i, prompt=e.prompt, references=tuple(e.references), instruction=e.instruction,
                   input=e.input) for i, e in enumerate(chosen)]


def read_jsonl(path: Path, fields: dict[str, str], max_samples: int = 0) -> list[Sample]:
    """A JSONL (or JSON array) file in any format prepare reads: Alpaca/MiniLLM, raw Dolly, Self-Instruct's
    `instances`, or others through a field map."""
    try:
        return samples_of(read_file(path, fields).examples, max_samples)
    except DataError as e:
        raise BenchmarkError(str(e)) from None


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
    rows = (ds if not max_samples else ds.select(range(min(max_samples, len(ds))))).to_list()
    try:
        _, examples = examples_from_rows(spec, rows, [{k for k, v in r.items() if v is not None} for r in rows],
                                         [f"{spec} row {i}" for i in range(len(rows))], fields)
    except DataError as e:
        raise BenchmarkError(str(e)) from None
    fingerprint = sha256_json([name, split, getattr(ds, "_fingerprint", None), len(ds)])
    short = name.rstrip("/").split("/")[-1]
    return Benchmark(name=f"{short}-{split}", source=spec, fingerprint=fingerprint,
                     samples=tuple(samples_of(examples, max_samples)))


def _fastchat_answers(path: Path) -> dict[Any, list[str]]:
    """question_id -> reference answers, from FastChat's answer files: `choices: [{turns: [...]}]` (MT-bench and
    later) or the older `text` (as in its Vicuna-80 GPT-3.5/GPT-4 answers); the first turn is the reference."""
    refs: dict[Any, list[str]] = {}
    for lineno, rec in read_jsonl_lines(path):
        where = f"{path}:{lineno}"
        try:
            if isinstance(rec, dict) and "choices" not in rec and isinstance(rec.get("text"), str):
                answers = [rec["text"]]
            else:
                answers = [c["turns"][0] for c in rec["choices"]]
            if not all(isinstance(a, str) for a in answers):
                raise TypeError
            refs.setdefault(rec["question_id"], []).extend(answers)
        except (KeyError, IndexError, TypeError):
            raise BenchmarkError(f"{where}: expected {{\"question_id\", \"choices\": [{{\"turns\": [...]}}]}} or "
                                 f"{{\"question_id\", \"text\"}}") from None
    return refs


def _load_fastchat(spec: str, max_samples: int) -> Benchmark:
    """`fastchat:QUESTIONS.jsonl:ANSWERS.jsonl`, FastChat's layout (Vicuna's 80 questions, MT-bench): questions
    {"question_id", "turns": [text, ...]} and reference answers in a second file, joined by question_id; the first
    turn is the instruction. Questions without a reference answer (MT-bench's cover a few categories) are left
    out, and the benchmark says how many."""
    parts = spec.split(":")
    if len(parts) != 3:
        raise BenchmarkError(f"{spec!r}: write fastchat:QUESTIONS.jsonl:ANSWERS.jsonl")
    questions, answers = Path(parts[1]), Path(parts[2])
    refs = _fastchat_answers(answers)
    rows, wheres, missing = [], [], []
    for lineno, rec in read_jsonl_lines(questions):
        where = f"{questions}:{lineno}"
        try:
            qid, turn = rec["question_id"], rec["turns"][0]
        except (KeyError, IndexError, TypeError):
            raise BenchmarkError(f"{where}: expected {{\"question_id\", \"turns\": [...]}}") from None
        if qid not in refs:
            missing.append(qid)
            continue
        rows.append({"instruction": turn, "output": refs[qid]})
        wheres.append(where)
    if not rows:
        raise BenchmarkError(f"{questions}: none of its {len(missing)} questions has an answer in {answers}")
    try:
        _, examples = examples_from_rows(str(questions), rows, [set(r) for r in rows], wheres, {})
    except DataError as e:
        raise BenchmarkError(str(e)) from None
    left_out = ""
    if missing:
        shown = ", ".join(map(str, missing[:8])) + (", ..." if len(missing) > 8 else "")
        left_out = (f"{len(missing)} of {len(missing) + len(rows)} questions left out: no reference answer in "
                    f"{answers} (question_id {shown})")
    fingerprint = sha256_json([sha256_file(questions), sha256_file(answers)])
    return Benchmark(questions.stem, spec, fingerprint, tuple(samples_of(examples, max_samples)), left_out)


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
