"""The one config of the eval stage: what to score, on which sets, and the generation protocol (DESIGN section 3)."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pipeline.data.prompts import TEMPLATES, check_template
from pipeline.data.sources import parse_field_map
from pipeline.errors import ConfigError, DataError
from pipeline.runtime import dtype_name

ALL_BENCHMARKS = ["dolly", "self_inst", "vicuna", "sinst", "uinst"]


def default_data_dir() -> str:
    """`../shared/data/instruct` beside the repository, unless GEOKD_SHARED_DATA names the shared folder."""
    shared = os.environ.get("GEOKD_SHARED_DATA")
    if shared:
        return str(Path(shared) / "data" / "instruct")
    return str(Path(__file__).resolve().parents[1].parent / "shared" / "data" / "instruct")


@dataclass
class EvalConfig:
    models: list[str] = field(
        default_factory=list,
        metadata={"help": "Hugging Face causal-LM directories to score", "aliases": ["--model"], "nargs": "+"},
    )
    names: list[str] = field(
        default_factory=list,
        metadata={"help": "display names of the models, in order (default: the shortest distinct path suffixes)"},
    )
    benchmarks: list[str] = field(
        default_factory=lambda: list(ALL_BENCHMARKS),
        metadata={"help": "registry names (dolly self_inst vicuna sinst uinst), JSONL paths, hub:NAME[:SPLIT], or "
                          "fastchat:QUESTIONS.jsonl:ANSWERS.jsonl"},
    )
    data_dir: str = field(default_factory=default_data_dir, metadata={"help": "folder holding the registry's files"})
    data: str = field(default="", metadata={
        "help": "prepared classification data (prepare --task): score encoder classifiers on its --split with the "
                "task's metric instead of the instruction-following benchmarks"})
    split: str = field(default="valid", metadata={"help": "with --data: the split to score (GLUE's dev is 'valid')"})
    field_map: list[str] = field(
        default_factory=list,
        metadata={"help": "for JSONL paths and hub sets: ours=theirs pairs, e.g. output=answer input=context",
                  "aliases": ["--fields"]},
    )
    out: str = field(default="runs/eval", metadata={"help": "output folder (a rerun resumes in it)"})
    tokenizer: str = field(default="", metadata={"help": "tokenizer dir, when a model dir has none"})
    max_samples: int = field(default=0, metadata={"help": "score only the first N records of each set (0 = all)"})
    seeds: list[int] = field(default_factory=lambda: [10, 20, 30, 40, 50])
    greedy: bool = field(default=False, metadata={"help": "greedy decoding, one pass instead of one per seed"})
    batch_size: int = 8
    dtype: str = field(default="auto", metadata={
        "help": "auto (fp32 on CPU, bf16/fp16 on GPU) | fp32 | bf16 | fp16 (or float32, bfloat16, float16)"})
    max_prompt_length: int = 256
    max_length: int = 512
    max_new_tokens: int = field(
        default=0, metadata={"help": "new-token budget per sample; 0 = max_length - max_prompt_length (MiniLLM)"}
    )
    prompt_truncation: Literal["left", "right"] = field(
        default="right",
        metadata={"help": "right (MiniLLM's evaluation, the default): keep the first max_prompt_length tokens; "
                          "left: keep leading special tokens + the last tokens (the response cue survives)"},
    )
    template: Literal[TEMPLATES] = field(default="alpaca", metadata={
        "help": "prompt format: alpaca (MiniLLM's, the published tables') or chat (each model's chat template)"})
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    no_repeat_ngram_size: int = 6

    def check(self) -> None:
        dtype_name(self.dtype, "dtype", allow_auto=True)  # the same names as cache and train
        check_template(self.template)
        if self.prompt_truncation not in ("left", "right"):
            raise ConfigError(f"prompt_truncation: expected left or right, got {self.prompt_truncation!r}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_samples < 0:
            raise ConfigError(f"max_samples must be >= 0 (0 = all), got {self.max_samples}")
        if not self.greedy and not self.seeds:
            raise ConfigError("seeds: give at least one seed, or --greedy")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds: repeated seed in {self.seeds}")
        if self.max_prompt_length < 1 or self.budget() < 1:
            raise ConfigError(
                f"max_prompt_length ({self.max_prompt_length}) and max_length ({self.max_length}) leave no room "
                "for new tokens; set max_new_tokens or a larger max_length"
            )
        if not 0.0 < self.top_p <= 1.0 or self.top_k < 0 or self.temperature <= 0:
            raise ConfigError("sampling: need 0 < top_p <= 1, top_k >= 0 (0 = off), temperature > 0")
        if self.names and (len(self.names) != len(self.models) or len(set(self.names)) != len(self.names)):
            raise ConfigError(f"names: need {len(self.models)} distinct names, one per model, got {self.names}")
        for name in self.names:  # each becomes a folder under --out: nothing may point outside it
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name) or ".." in name:
                raise ConfigError(f"--names {name!r}: a display name is also a folder name under --out; use "
                                  f"letters, digits, '.', '_' and '-' (starting with a letter or digit)")
        try:
            self.fields()
        except DataError as e:
            raise ConfigError(str(e)) from None

    def budget(self) -> int:
        """New tokens per sample. Fixed per sample (not per batch) so a result never depends on its batch-mates."""
        return self.max_new_tokens or self.max_length - self.max_prompt_length

    def runs(self) -> list[int | None]:
        """The generation passes per (model, set): one per seed, or a single `None` pass when greedy."""
        return [None] if self.greedy else list(self.seeds)

    def fields(self) -> dict[str, str]:
        """The field map as {our name: the set's name}; no field is required (a set may carry `prompt`)."""
        return parse_field_map(self.field_map, option="--field_map", required=())
