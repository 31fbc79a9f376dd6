"""Shared fixtures: a tiny saved teacher/student pair and a small prepared dataset, built once per session."""
from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import pytest

SHARED_DATA = Path(os.environ.get("GEOKD_SHARED_DATA")
                   or Path(__file__).resolve().parents[1].parent / "shared/data/instruct")


class TinyPair(NamedTuple):
    teacher: Path
    student: Path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real instruction sets (../shared/data/instruct); tests that need them skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real instruction data not found at {SHARED_DATA} (set GEOKD_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory) -> TinyPair:
    """HF directories (model + builtin-tiny tokenizer) of a random tiny-teacher (seed 0) and tiny-student (seed 1)."""
    from pipeline.models import load_model
    from pipeline.data.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("tiny_pair")
    tok = load_tokenizer("builtin-tiny")
    paths = {}
    for role, seed in (("teacher", 0), ("student", 1)):
        model = load_model(f"preset:tiny-{role}", tokenizer=tok, seed=seed)
        paths[role] = root / role
        model.save_pretrained(paths[role])
        tok.save_pretrained(paths[role])
    return TinyPair(**paths)


@pytest.fixture(scope="session")
def prepared_tiny(tmp_path_factory) -> Path:
    """A prepared folder of the first 600 built-in examples (builtin-tiny tokenizer): 'train' (540 samples in
    3 shards of up to 256) and 'valid' (60)."""
    from pipeline.data.config import PrepareConfig
    from stages.prepare import run

    out = tmp_path_factory.mktemp("prepared") / "builtin"
    return run(PrepareConfig(data=["builtin"], out=str(out), tokenizer="builtin-tiny", limit=600, valid_size=60,
                             shard_size=256))
