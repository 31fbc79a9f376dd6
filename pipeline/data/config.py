"""The `prepare` stage's configuration (`./run.sh prepare ...`) and its checks."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pipeline.data.prompts import TEMPLATES, check_template
from pipeline.errors import ConfigError

# Config fields that name where things are rather than what is produced: not part of the fingerprint.
LOCATION_FIELDS = ("data", "out", "tokenizer")
# Fields of classification data only: left out of an instruction-data manifest (and so of its fingerprint).
CLASSIFICATION_FIELDS = ("task", "labels", "metric")


@dataclass
class PrepareConfig:
    data: list[str] = field(default_factory=list, metadata={
        "help": "JSONL/JSON files, 'builtin[:train|test]', or a hub dataset name"})
    out: str = field(default="", metadata={"help": "output folder (created; never overwritten)"})
    tokenizer: str = field(default="builtin-gpt2",
                           metadata={"help": "tokenizer or model dir, 'builtin-gpt2' or 'builtin-tiny'"})
    fields: list[str] = field(default_factory=list, metadata={
        "help": "field map OURS=THEIRS for other formats, e.g. output=answer (also --field_map, eval's name)",
        "aliases": ["--field_map"]})
    hub_split: str = field(default="train", metadata={"help": "split to load for a hub dataset name"})
    template: Literal[TEMPLATES] = field(default="alpaca", metadata={
        "help": "prompt format: alpaca (MiniLLM's, the published tables') or chat (the tokenizer's chat template)"})
    max_prompt_len: int = field(default=256, metadata={"help": "prompt tokens at most (with the BOS token)"})
    max_len: int = field(default=512, metadata={"help": "prompt + response tokens at most"})
    prompt_overflow: Literal["truncate", "drop"] = field(
        default="truncate", metadata={"help": "a longer prompt keeps its head and '### Response:' line, or is dropped"})
    valid_fraction: float = field(default=0.0, metadata={"help": "fraction of samples split off as 'valid'"})
    valid_size: int = field(default=0, metadata={"help": "number of samples split off as 'valid'"})
    seed: int = field(default=42, metadata={"help": "seed of the validation split"})
    limit: int = field(default=0, metadata={"help": "use only the first N examples (0 = all)"})
    shard_size: int = field(default=20000, metadata={"help": "samples per shard"})
    split: str = field(default="train", metadata={"help": "name of the main split (e.g. 'test' for an eval set)"})
    verify: bool = field(default=False, metadata={
        "help": "only verify --out: every shard and records file against the sha256 in its manifest"})
    task: str = field(default="", metadata={
        "help": "a classification task: cola, rte, mrpc, or classification (generic JSONL: text, text_pair, "
                "label); empty: instruction data"})
    labels: list[str] = field(default_factory=list, metadata={
        "help": "--task classification: label names in id order (a,b,c or a b c); default: the sorted labels "
                "of the train file"})
    metric: str = field(default="", metadata={
        "help": "--task classification: accuracy (default), f1 (binary, class 1 positive) or mcc"})

    def label_names(self) -> list[str]:
        """--labels as a list: `a,b,c` and `a b c` alike."""
        return [name.strip() for item in self.labels for name in item.split(",") if name.strip()]

    def check(self) -> None:
        """Checked before the output folder is touched, so a typo never leaves a half-made folder behind."""
        if not self.out:
            raise ConfigError("--out is required")
        if self.verify:
            return
        if not self.data:
            raise ConfigError("--data is required (JSONL/JSON files, 'builtin', or a hub dataset name)")
        if self.shard_size < 1 or self.limit < 0:
            raise ConfigError("shard_size must be >= 1 and limit >= 0")
        if not self.split or "/" in self.split or self.split.startswith("."):
            raise ConfigError(f"split {self.split!r}: give a plain folder name")
        if self.valid_fraction and self.valid_size:
            raise ConfigError("give --valid_fraction or --valid_size, not both")
        if not 0.0 <= self.valid_fraction < 1.0 or self.valid_size < 0:
            raise ConfigError("--valid_fraction must be in [0, 1) and --valid_size >= 0")
        if self.task or self.labels or self.metric:
            self.check_task()
            return
        check_template(self.template)
        if not 0 < self.max_prompt_len < self.max_len:
            raise ConfigError(f"need 0 < --max_prompt_len ({self.max_prompt_len}) < --max_len ({self.max_len})")

    def check_task(self) -> None:
        from pipeline.data.classification import GENERIC_TASK, METRICS, TASKS

        choices = ", ".join([*TASKS, GENERIC_TASK])
        if not self.task:
            raise ConfigError(f"--labels and --metric are for --task {GENERIC_TASK}")
        if self.task not in (*TASKS, GENERIC_TASK):
            raise ConfigError(f"--task {self.task!r}: choose one of {choices}")
        if self.task != GENERIC_TASK and (self.labels or self.metric):
            raise ConfigError(f"--labels and --metric are for --task {GENERIC_TASK}; {self.task} has its own "
                              f"({', '.join(TASKS[self.task].labels)}; {TASKS[self.task].metric})")
        if self.metric and self.metric not in METRICS:
            raise ConfigError(f"--metric {self.metric!r}: choose one of {', '.join(METRICS)}")
        names = self.label_names()
        if self.labels and (len(names) < 2 or len(set(names)) != len(names)):
            raise ConfigError(f"--labels {','.join(names)}: give two or more distinct label names")
        if self.metric == "f1" and names and len(names) != 2:
            raise ConfigError(f"--metric f1 is binary (class 1 positive); --labels gives {len(names)} classes")
        if self.fields:
            raise ConfigError("--fields is for instruction data; classification JSONL has text, text_pair, label")
        if len(self.data) != 1:
            raise ConfigError(f"--task {self.task}: give one --data (a folder with train and dev files, or one "
                              f"file), not {len(self.data)}")
        folder = Path(self.data[0]).expanduser().is_dir()
        if folder and (self.valid_size or self.valid_fraction or self.split != "train"):
            raise ConfigError(f"--data {self.data[0]} is a folder: its dev file becomes split 'valid'; --split, "
                              f"--valid_size and --valid_fraction are for a single file")
        if self.max_len < 4:
            raise ConfigError(f"--max_len {self.max_len}: too short for a classifier's input")
