"""The GPU suite's own code path, on tiny shapes on this CPU: so it cannot rot between the rare GPU sessions."""
from __future__ import annotations

import json
import subprocess

from forkserver import python_for_stages
from helpers import ROOT, clean_env



def test_gpu_suite_smoke_runs_every_section_and_reports_exact_losses(tmp_path):
    env = clean_env(OMP_NUM_THREADS="1")
    proc = subprocess.run([python_for_stages(), "bench/gpu_suite.py", "--smoke", "--out", str(tmp_path)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert results["errors"] == {} and set(results["sections"]) == {"losses", "train", "cache", "eval"}
    losses = results["sections"]["losses"]
    assert {r["inputs"] for r in losses} == {"fp32", "tf32", "bf16"} and len({r["loss"] for r in losses}) == 7
    for r in losses:  # every method exact against the float64 reference (bf16 gradients: bf16's rounding)
        assert r["value_rel_err"] < 1e-4, r
        assert r["grad_rel_err"] < (1e-4 if r["inputs"] != "bf16" else 8e-3), r
    ratios = results["sections"]["train"]["auto"]["ratios"]
    assert any(line.startswith("sft / plain_sft") for line in ratios)
    md = (tmp_path / "gpu_suite.md").read_text()
    assert "## Feature losses" in md and "## train" in md and "## cache" in md and "## eval" in md
