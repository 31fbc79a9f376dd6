"""Every stage turns a user's mistake into one line on stderr and exit status 2, never a traceback.

Each stage runs as its own process (forked from the tests' fork server, so without the imports' 3-5 s), with its
real stdout, stderr and exit status, so what is checked is what a user sees.
"""
from __future__ import annotations

import pytest

from helpers import stage_process

MISSING = "/nonexistent/geokd-input"

CASES = {
    "prepare": ["--data", f"{MISSING}.jsonl", "--out", "{tmp}/prep", "--tokenizer", "builtin-tiny"],
    "cache": ["--data", MISSING, "--teacher", "preset:tiny-teacher", "--out", "{tmp}/store", "--layers", "1"],
    "train": ["--data", MISSING, "--student", "preset:tiny-student", "--out", "{tmp}/run"],
    "eval": ["--models", MISSING, "--out", "{tmp}/eval"],
    "demo": ["--student", MISSING, "--out", "{tmp}/demo"],
    "synthetic": ["--losses", "procrustes", "no_such_loss", "--out", "{tmp}/syn"],
    "study": ["--teacher", MISSING, "--out", "{tmp}/study"],
    "analyze": ["--data", MISSING, "--teacher", MISSING, "--out", "{tmp}/analysis"],
    "get_model": [f"{MISSING}.gguf", "--out", "{tmp}/model", "--cache", "{tmp}/cache"],
    "make_student": ["--teacher", MISSING, "--layers", "0,1", "--out", "{tmp}/student"],
}


@pytest.mark.parametrize("stage", sorted(CASES))
def test_a_missing_input_is_one_line_and_exit_2(stage, tmp_path):
    args = [a.replace("{tmp}", str(tmp_path)) for a in CASES[stage]]
    proc = stage_process(stage, *args)
    name = stage.replace("_", "-")  # ./run.sh get-model, make-student
    lines = [line for line in proc.stderr.splitlines() if line.startswith(f"[{name}] error:")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert (MISSING in lines[0]) or ("no_such_loss" in lines[0] and "procrustes" in lines[0]), lines[0]
    assert not list(tmp_path.iterdir()), "a refused run left files behind"
