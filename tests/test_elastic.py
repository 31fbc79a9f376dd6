"""Resuming on another number of ranks: a ZeRO checkpoint of 2 ranks continues on 1 and one of 1 on 2 (through
DeepSpeed's universal checkpoint), with grad_accum adjusted so every later step's loss equals the uninterrupted
run's and the same samples are seen; what cannot keep the global batch is refused before anything loads. The same
across two hosts is in test_multinode.py."""
from __future__ import annotations

import json
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from helpers import stage_process
from pipeline.errors import ConfigError
from pipeline.train.config import TrainConfig
from pipeline.train.elastic import ElasticResume, check_stage, pin_zero_stage, plan_elastic

STEPS = 6


def fake_checkpoint(out: Path, world_size: int, micro: int, accum: int, stage: int = 2) -> None:
    """A checkpoint folder as far as plan_elastic reads it: geokd.json and the files' names."""
    tag = out / "checkpoints" / "step00000002"
    tag.mkdir(parents=True)
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"")
    for r in range(world_size):
        (tag / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"")
    config = {"micro_batch_size": micro, "grad_accum": accum}
    (tag / "geokd.json").write_text(json.dumps({"world_size": world_size, "zero_stage": stage, "config": config}))
    (out / "checkpoints" / "latest").write_text("step00000002")


def test_the_global_batch_is_kept_or_the_resume_refused(tmp_path):
    out = tmp_path / "run"
    fake_checkpoint(out, world_size=2, micro=2, accum=3)  # 12 samples a step
    cfg = TrainConfig(out=str(out), resume=True, micro_batch_size=2, grad_accum=3)
    adjusted, el = plan_elastic(cfg, world_size=1)
    assert adjusted.grad_accum == 6 and el.grad_accum == (3, 6) and (el.from_ranks, el.to_ranks) == (2, 1)
    assert el.universal and el.zero_stage == 2 and el.tag == "step00000002"
    assert plan_elastic(cfg, world_size=3)[0].grad_accum == 2
    assert plan_elastic(cfg, world_size=2) == (cfg, None)  # same size: an ordinary resume
    assert plan_elastic(replace(cfg, resume=False), world_size=1) == (replace(cfg, resume=False), None)
    with pytest.raises(ConfigError, match=r"global batch of 12 samples cannot be split over 4 rank\(s\) x "
                                          r"micro-batch 2.*divides 6"):
        plan_elastic(cfg, world_size=4)
    with pytest.raises(ConfigError, match=r"--grad_accum 4 on 1 rank\(s\) makes a global batch of 8; the run's is 12"):
        plan_elastic(replace(cfg, grad_accum=4), world_size=1)
    assert plan_elastic(replace(cfg, grad_accum=6), world_size=1)[0].grad_accum == 6  # the right one, given
    with pytest.raises(ConfigError, match="micro_batch_size 3, the run was started with 2"):
        plan_elastic(replace(cfg, micro_batch_size=3), world_size=1)


def test_the_checkpoints_zero_stage_is_kept_where_the_config_says_auto():
    el = ElasticResume(tag="step00000002", from_ranks=2, to_ranks=1, grad_accum=(1, 2), zero_stage=2, universal=True)
    raw = {"zero_optimization": {"stage": "auto"}}
    assert pin_zero_stage(raw, el) and raw["zero_optimization"]["stage"] == 2  # auto on 1 rank would give 0
    fixed = {"zero_optimization": {"stage": 3}}
    assert pin_zero_stage(fixed, el) == [] and fixed["zero_optimization"]["stage"] == 3
    with pytest.raises(ConfigError, match="ZeRO-0 in fp32, which cannot load it"):
        check_stage(el, 0, "fp32")
    check_stage(el, 0, "bf16")  # DeepSpeed's bf16 optimizer loads universal checkpoints at stage 0
    check_stage(replace(el, universal=False), 0, "fp32")  # a whole optimizer state loads on any number of ranks


def train(out: Path, prepared: Path, *extra: str) -> subprocess.CompletedProcess:
    args = ["--mode", "sft", "--data", prepared, "--student", "preset:tiny-student", "--out", out, "--max_steps",
            STEPS, "--micro_batch_size", "2", "--lr", "1e-3", "--num_workers", "0", "--progress", "false",
            "--valid_split", "", "--checkpoint_every", "3", *extra]
    return stage_process("train", *args, OMP_NUM_THREADS="1")


def losses_and_tokens(out: Path) -> tuple[list[float], int]:
    from pipeline.train.loop import read_metrics

    rows = read_metrics(out)
    assert sorted(rows) == list(range(1, STEPS + 1))  # each step logged once
    return [rows[s]["loss"] for s in sorted(rows)], json.loads((out / "manifest.json").read_text())["tokens"]


@pytest.fixture(scope="module")
def reference(prepared_tiny, tmp_path_factory) -> tuple[list[float], int]:
    """Uninterrupted: one rank, 2 micro-batches of 2 per step."""
    out = tmp_path_factory.mktemp("elastic") / "reference"
    proc = train(out, prepared_tiny, "--grad_accum", "2", "--ds_config", "ds_configs/zero2.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return losses_and_tokens(out)


@pytest.mark.parametrize("stage, before, after", [(2, 2, 1), (1, 1, 2)])
def test_a_zero_checkpoint_resumes_on_another_number_of_ranks(stage, before, after, reference, prepared_tiny,
                                                              tmp_path):
    out = tmp_path / "run"
    ds = ["--ds_config", f"ds_configs/zero{stage}.json"]
    nproc = lambda n: ["--nproc", "2"] if n == 2 else []  # noqa: E731
    accum = {1: "2", 2: "1"}[before]
    proc = train(out, prepared_tiny, *ds, *nproc(before), "--grad_accum", accum, "--stop_after", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "checkpoints" / "step00000003" / "geokd.json").read_text())["world_size"] == before

    proc = train(out, prepared_tiny, *ds, *nproc(after), "--grad_accum", accum, "--resume")  # the same command
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = {1: "2", 2: "1"}[after]
    assert (f"resuming step00000003 of {before} rank(s) on {after}: grad_accum {accum} -> {want}, global batch 4 "
            f"kept (through DeepSpeed's universal checkpoint)") in proc.stdout
    losses, tokens = losses_and_tokens(out)
    assert losses == pytest.approx(reference[0], rel=2e-5)
    assert tokens == reference[1]  # the same samples: none skipped, none seen twice
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["world_size"] == after and manifest["config"]["grad_accum"] == int(want)
    assert not (out / "checkpoints" / "universal").exists()
