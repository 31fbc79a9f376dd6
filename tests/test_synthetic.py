"""The synthetic experiment runs end to end and its geometry bookkeeping is right."""
import csv

import pytest
import torch

from pipeline.config import parse_config
from stages import synthetic


def test_orthogonal_pairs_counts_only_near_orthogonal_pairs():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 0.05], [-3.0, 0.0]])
    pairs = synthetic.orthogonal_pairs(x, epsilon=0.1)
    # (0,1) and (1,3) are orthogonal, (1,2) has |cos| ~ 0.05; parallel/antiparallel pairs are not.
    assert {(int(i), int(j)) for i, j in pairs.nonzero()} == {(0, 1), (1, 2), (1, 3)}


def test_small_run_writes_outputs_and_geometry_losses_recover_orthogonality(tmp_path):
    out = tmp_path / "syn"
    table = synthetic.run(parse_config(synthetic.SyntheticConfig, [
                            "--n", "48", "--d_teacher", "24", "--d_student", "8", "--directions", "6",
                            "--steps", "150", "--log_every", "50", "--out", str(out)]))
    for name in ("curves.png", "trajectory.csv", "results.md", "config.yaml"):
        assert (out / name).stat().st_size > 0
    rows = list(csv.DictReader(open(out / "trajectory.csv")))
    final = {r["loss"]: r for r in rows if int(r["step"]) == 150}
    assert set(final) == set(synthetic.LOSSES)
    start = {r["loss"]: r for r in rows if int(r["step"]) == 0}
    for loss in ("procrustes", "fg"):
        # The geometry losses drive their own distance down and keep nearly all orthogonal pairs.
        assert float(final[loss]["D_P"]) < 0.5 * float(start[loss]["D_P"])
        assert float(final[loss]["orth_pairs_kept"]) > 0.95
    assert "| procrustes |" in table and "(random projection, start)" in table


def test_the_sweep_covers_fewer_and_more_directions_than_the_student_has_dimensions(tmp_path):
    out = tmp_path / "sweep"
    table = synthetic.run(parse_config(synthetic.SyntheticConfig, [
        "--n", "48", "--d_teacher", "24", "--steps", "60", "--log_every", "60", "--out", str(out),
        "--sweep_directions", "4", "16", "--sweep_widths", "8", "--sweep_seeds", "0", "1"]))
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert len(rows) == 2 * 2 * len(synthetic.LOSSES)  # directions x seeds x losses
    assert (out / "sweep.png").stat().st_size > 0 and "| 8 | 16 | procrustes |" in table
    kept = {(int(r["directions"]), r["loss"]): [] for r in rows}
    for r in rows:
        kept[int(r["directions"]), r["loss"]].append(float(r["orth_pairs_kept"]))
    # 4 orthogonal directions fit a width-8 student; 16 cannot all stay orthogonal in 8 dimensions.
    assert min(kept[4, "procrustes"]) > 0.9 and max(kept[16, "procrustes"]) < min(kept[4, "procrustes"])


def test_a_massive_first_vector_changes_nothing_under_the_default_rule():
    """A real teacher's first token at 100x the others: under the default token rule the experiment comes out as
    without it; over all tokens the spike pulls the feature-Gram student off the other vectors' geometry."""
    from stages.synthetic import SyntheticConfig, experiment

    def final(massive: float, rule: str) -> dict[str, dict]:
        cfg = SyntheticConfig(massive=massive, token_rule=rule, losses=["procrustes", "fg"], steps=150,
                              out="/nonexistent")
        rows, _, _ = experiment(cfg, verbose=False)
        return {loss: [r for r in rows if r["loss"] == loss][-1] for loss in cfg.losses}

    clean, spiked, all_tokens = final(0, "outliers:4"), final(100, "outliers:4"), final(100, "all")
    for loss in ("procrustes", "fg"):
        for metric in ("D_P", "D_FG", "D_CKA"):
            assert spiked[loss][metric] == pytest.approx(clean[loss][metric], rel=0.01, abs=1e-4), (loss, metric)
    assert all_tokens["fg"]["D_FG"] > 3 * spiked["fg"]["D_FG"]
    assert all_tokens["fg"]["orth_pairs_kept"] < spiked["fg"]["orth_pairs_kept"]
