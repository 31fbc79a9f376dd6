"""The method study: its statistics against scipy and hand-computed cases, and a tiny study end to end."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats as sps

from helpers import stage_process
from pipeline.experiments.stats import compare, holm, mean_ci, paired_bootstrap, paired_t, wilcoxon


def test_mean_ci_is_the_t_interval():
    x = [24.1, 25.3, 23.8, 26.0, 24.9]
    e = mean_ci(x)
    half = sps.t.ppf(0.975, 4) * np.std(x, ddof=1) / math.sqrt(5)
    assert e.mean == pytest.approx(np.mean(x)) and e.high - e.mean == pytest.approx(half) and e.n == 5
    assert mean_ci([3.0]).low == -math.inf  # one seed estimates nothing


def test_paired_tests_match_scipy_and_hand_computed_cases():
    a, b = np.array([27.0, 26.1, 28.3, 26.9, 27.7]), np.array([24.2, 24.9, 25.1, 24.0, 25.6])
    assert paired_t(a - b) == pytest.approx(sps.ttest_rel(a, b).pvalue)
    assert wilcoxon(a - b) == pytest.approx(0.0625)  # all 5 positive: exact two-sided p = 2 / 2^5
    assert wilcoxon([1.0, -2.0, 3.0, -4.0, 5.0]) == pytest.approx(sps.wilcoxon([1, -2, 3, -4, 5]).pvalue)
    assert paired_t([0.0, 0.0, 0.0]) == 1.0 and wilcoxon([0.0, 0.0]) == 1.0


def test_holm_by_hand():
    # sorted 0.01, 0.02, 0.04 -> x3, x2, x1 = 0.03, 0.04, 0.04 (monotone), back in the given order
    assert holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    adjusted = holm([0.5, math.nan, 0.01])
    assert adjusted[1] != adjusted[1] and adjusted == pytest.approx([0.5, math.nan, 0.02], nan_ok=True)


def test_paired_bootstrap_covers_the_observed_difference_and_tells_no_difference_from_one():
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 50, size=(3, 200))
    better = base + 2.0 + rng.normal(0, 1, size=base.shape)
    est, p = paired_bootstrap(better, base)
    assert est.low < est.mean < est.high and 1.5 < est.mean < 2.5 and p < 0.001
    same, p_same = paired_bootstrap(base + rng.normal(0, 1, size=base.shape), base)
    assert same.low < 0 < same.high and p_same > 0.05
    c = compare("m", "r", {"m": better.mean(1), "r": base.mean(1)}, {"m": better, "r": base})
    assert c.difference.mean == pytest.approx(est.mean) and c.method == "m" and c.reference == "r"


def test_a_tiny_study_runs_end_to_end_and_a_rerun_does_nothing_again(tiny_pair, tmp_path):
    out = tmp_path / "study"
    cmd = ["--out", str(out), "--methods", "sft", "kd", "--reference", "kd",
           "--seeds", "0", "1", "--teacher", str(tiny_pair.teacher), "--student_steps", "8", "--eval_samples", "4",
           "--sampling_seeds", "10", "--max_new_tokens", "4", "--micro_batch_size", "8"]
    proc = stage_process("study", *cmd, timeout=600)  # its steps are processes too, forked as well
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "study.json").read_text())
    assert set(results["methods"]) == {"sft", "kd"} and results["seeds"] == [0, 1]
    assert len(results["methods"]["kd"]["rouge_l_per_seed"]) == 2
    (versus_kd,) = results["comparisons"]["kd"]
    assert versus_kd["method"] == "sft" and 0 <= versus_kd["t_p"] <= 1 and versus_kd["holm_p"] == versus_kd["t_p"]
    report = (out / "report.md").read_text()
    assert "## Against kd" in report and "t-test p" in report and (out / "forest.png").stat().st_size > 0
    again = stage_process("study", *cmd, timeout=600)
    assert again.returncode == 0 and again.stdout.count("done already") == 4  # every student
    assert json.loads((out / "study.json").read_text())["methods"] == results["methods"]
