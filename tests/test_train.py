"""The train stage end to end on tiny models (CPU, DeepSpeed's gloo backend).

One single-process driver trains several runs in one interpreter (imports and DeepSpeed's setup are paid once):
ZeRO 0-3 in fp32 from one seed, online teacher vs stored features, a stop-and-resume with dropout on, ZeRO-3
projection heads, top-k KD. Then real launches: `--nproc 2` (two local ranks) killed with SIGKILL after a
checkpoint, resumed by two single-rank launcher invocations forming a two-node job on 127.0.0.1; its losses
must equal the single-rank run at the same global batch, and it must leave TensorBoard logs, a manifest and a
consolidated model.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from helpers import ROOT, clean_env
from pipeline.runtime import free_port

STEPS = 12

DRIVER = textwrap.dedent("""
    import json, sys, torch, deepspeed
    from transformers import AutoModelForCausalLM
    from pipeline.config import parse_config
    from pipeline.train.config import TrainConfig
    from pipeline.train.setup import setup
    from pipeline.train.loop import read_metrics
    from stages.train import train as run_training

    spec = json.loads(sys.argv[1])
    results = {}
    probe_ids = torch.tensor(spec["probe_ids"])

    def gathered(params):
        params = list(params)
        with deepspeed.zero.GatheredParameters(params):
            return [p.detach().clone() for p in params]

    def train(name, extra, check_model=False, projections=False):
        cfg = parse_config(TrainConfig, spec["common"] + extra + ["--out", spec["root"] + "/" + name])
        run = setup(cfg)
        before = gathered(run.engine.module.projections.parameters()) if projections else None
        summary = run_training(run)
        res = {"metrics": read_metrics(cfg.out), "summary": summary}
        if projections:
            after = gathered(run.engine.module.projections.parameters())
            res["projection_change"] = max(float((a - b).abs().max()) for a, b in zip(after, before))
            res["projection_names"] = [n for n, _ in run.engine.module.projections.named_parameters()]
        if check_model:
            run.engine.eval()
            with torch.no_grad():
                engine_logits = run.engine.module.student(input_ids=probe_ids).logits
                reloaded = AutoModelForCausalLM.from_pretrained(cfg.out + "/model")
                res["reload_max_diff"] = float((engine_logits - reloaded(input_ids=probe_ids).logits).abs().max())
                initial = AutoModelForCausalLM.from_pretrained(spec["student"])
                res["trained_change"] = float((engine_logits - initial(input_ids=probe_ids).logits).abs().max())
                res["saved_files"] = sorted(p.name for p in __import__("pathlib").Path(cfg.out, "model").iterdir())
        results[name] = res

    for stage in (0, 1, 2, 3):
        # ZeRO-3 with activation checkpointing: recomputing layers must not change a single loss either.
        checkpointing = ["--activation_checkpointing", "true" if stage == 3 else "false"]
        train(f"zero{stage}", ["--ds_config", f"ds_configs/zero{stage}.json", "--grad_accum", "2", *checkpointing],
              check_model=True)
    train("online", ["--ds_config", "ds_configs/zero2.json", "--grad_accum", "2", "--teacher_mode", "online",
                     "--teacher", spec["teacher"], "--stop_after", "4"])
    train("int8_rotated", ["--ds_config", "ds_configs/zero2.json", "--grad_accum", "2", "--features",
                           spec["int8_rotated"], "--stop_after", "2"])
    drop = ["--student", spec["dropout_student"], "--ds_config", "ds_configs/zero1.json", "--grad_accum", "2",
            "--max_steps", "6"]
    train("dropout_full", drop)
    train("dropout_resumed", drop + ["--stop_after", "3"])
    results["dropout_stopped"] = results["dropout_resumed"]
    train("dropout_resumed", drop + ["--resume"])
    train("proj_zero3", ["--ds_config", "ds_configs/zero3.json", "--loss", "proj_mse", "--max_steps", "2"],
          projections=True)
    train("topk_cka", ["--ds_config", "ds_configs/zero0.json", "--loss", "cka", "--kd", "topk", "--max_steps", "2"])
    print("RESULTS " + json.dumps(results))
""")


def losses(metrics: dict, key: str = "loss") -> list[float]:
    return [metrics[str(s)][key] for s in sorted(int(k) for k in metrics)]


@pytest.fixture(scope="module")
def stores(prepared_tiny, tiny_pair, tmp_path_factory):
    """fp32 feature stores of the train split (layers 2 and 4, final state, top-8 logits) and the valid split, and
    a rotated int8 store of the train split."""
    from stages.cache import main as cache

    root = tmp_path_factory.mktemp("stores")
    saved = dict(os.environ)
    try:
        for name, split, extra in (("train", "train", ["--topk_logits", "8", "--quant", "none"]),
                                   ("valid", "valid", ["--quant", "none"]),
                                   ("int8_rotated", "train", ["--quant", "int8", "--rotate"])):
            assert cache(["--data", str(prepared_tiny), "--teacher", str(tiny_pair.teacher), "--split", split,
                          "--out", str(root / name), "--layers", "2", "4", "--final", "--dtype", "fp32",
                          "--progress", "false", *extra]) == 0
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return root


def common_args(prepared: Path, student: Path, stores: Path) -> list[str]:
    return ["--mode", "distill", "--data", str(prepared), "--student", str(student), "--features",
            str(stores / "train"), "--loss", "procrustes", "--alpha", "0.5", "--beta", "1.0", "--layer_map", "1:2",
            "2:4", "--max_steps", str(STEPS), "--micro_batch_size", "2", "--lr", "1e-3", "--seed", "7",
            "--num_workers", "1", "--progress", "false", "--checkpoint_every", "3", "--valid_split", ""]


@pytest.fixture(scope="module")
def driver(prepared_tiny, tiny_pair, stores, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("driver")
    dropout_student = root / "student_dropout"
    model = AutoModelForCausalLM.from_pretrained(tiny_pair.student)
    model.config.dropout = 0.1  # so a resumed run must restore the RNG to match
    model.save_pretrained(dropout_student)
    spec = {"common": common_args(prepared_tiny, tiny_pair.student, stores), "root": str(root),
            "teacher": str(tiny_pair.teacher), "student": str(tiny_pair.student),
            "int8_rotated": str(stores / "int8_rotated"),
            "dropout_student": str(dropout_student), "probe_ids": [[5, 17, 42, 9, 77, 3, 11, 60]] * 2}
    r = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(spec)], cwd=ROOT, env=clean_env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    line = next(x for x in r.stdout.splitlines() if x.startswith("RESULTS "))
    return json.loads(line[len("RESULTS "):])


def test_one_seed_gives_the_same_trajectory_under_zero_0_1_2_3(driver):
    ref = losses(driver["zero2"]["metrics"])
    assert len(ref) == STEPS and len(set(round(x, 4) for x in ref)) > 1
    for stage in (0, 1, 3):
        got = driver[f"zero{stage}"]["metrics"]
        for key in ("loss", "ce", "kd", "procrustes/s1_t2", "procrustes/s2_t4"):
            assert losses(got, key) == pytest.approx(losses(driver["zero2"]["metrics"], key), rel=2e-5), (stage, key)
        assert [m["lr"] for m in got.values()] == [m["lr"] for m in driver["zero2"]["metrics"].values()]


def test_consolidated_model_reloads_with_the_engines_logits_from_every_stage(driver):
    for stage in (0, 1, 2, 3):
        res = driver[f"zero{stage}"]
        assert res["summary"]["finished"]
        assert res["reload_max_diff"] < 1e-5, stage
        assert res["trained_change"] > 1e-3, stage  # it did train: the weights are not the initial ones
        assert "model.safetensors" in res["saved_files"] and "tokenizer.json" in res["saved_files"]


def test_stored_features_and_online_teacher_give_the_same_losses(driver):
    online = driver["online"]["metrics"]
    assert len(online) == 4  # --stop_after 4 of the same 12-step schedule
    for key in ("loss", "ce", "kd", "procrustes/s1_t2", "procrustes/s2_t4"):
        assert losses(online, key) == pytest.approx(losses(driver["zero2"]["metrics"], key)[:4], rel=2e-5), key


def test_a_rotated_int8_store_trains_like_the_exact_one(driver):
    """Rotated rows, the rotated LM head and 0.6% code noise: the same CE, and KD and Procrustes losses within the
    codes' error, from the same student on the same batches."""
    quant, exact = driver["int8_rotated"]["metrics"], driver["zero2"]["metrics"]
    assert len(quant) == 2
    assert losses(quant, "ce")[0] == pytest.approx(losses(exact, "ce")[0], rel=1e-6)
    for key in ("kd", "procrustes/s1_t2", "procrustes/s2_t4"):
        assert losses(quant, key) == pytest.approx(losses(exact, key)[:2], rel=0.02), key


def test_stop_and_resume_continues_exactly_with_dropout(driver):
    full = losses(driver["dropout_full"]["metrics"])
    assert driver["dropout_stopped"]["summary"]["steps"] == 3 and not driver["dropout_stopped"]["summary"]["finished"]
    resumed = driver["dropout_resumed"]
    assert resumed["summary"]["finished"] and resumed["summary"]["steps"] == 6
    assert losses(resumed["metrics"]) == pytest.approx(full, rel=1e-6)


def test_projection_heads_train_inside_the_zero3_engine_and_topk_kd_runs(driver):
    res = driver["proj_zero3"]
    assert res["projection_names"] == ["s1_t2.proj.weight", "s2_t4.proj.weight"]
    assert res["projection_change"] > 1e-4
    assert {"proj_mse/s1_t2", "proj_mse/s2_t4", "kd"} <= set(res["metrics"]["1"])
    topk = driver["topk_cka"]["metrics"]
    assert all(0 < m["kd"] < 20 and 0 <= m["cka/s1_t2"] <= 1 for m in topk.values())


def test_two_ranks_killed_then_resumed_as_two_nodes_match_one_rank(driver, prepared_tiny, tiny_pair, stores,
                                                                  tmp_path):
    """`--nproc 2` (torchrun, 2 ranks, 2 x 1 micro-batches) is SIGKILLed after a checkpoint; two launcher
    invocations (--nnodes 2, node ranks 0 and 1, one process each) resume it. Every step's loss equals the
    single-rank run with 1 x 2 micro-batches, i.e. the same global batch."""
    out = tmp_path / "two_ranks"
    args = common_args(prepared_tiny, tiny_pair.student, stores) + [
        "--ds_config", "ds_configs/zero2.json", "--grad_accum", "1", "--out", str(out), "--valid_split", "valid",
        "--valid_features", str(stores / "valid"), "--eval_every", "3", "--eval_samples", "8"]
    proc = subprocess.Popen([sys.executable, "-m", "stages.train", "--nproc", "2", *args], cwd=ROOT,
                            env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    from pipeline.train.checkpointing import complete_tags

    root = out / "checkpoints"
    deadline = time.monotonic() + 300
    while not complete_tags(root) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    kill_tree(proc.pid)
    log, _ = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, log[-4000:]
    # The newest checkpoint every rank finished (`latest` may name a newer one a rank was still writing).
    killed_at = int(complete_tags(root)[-1].removeprefix("step"))
    assert 3 <= killed_at < STEPS and not (out / "model").exists()

    port = str(free_port())
    node_cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                "--master_addr", "127.0.0.1", "--master_port", port]
    nodes = [subprocess.Popen([*node_cmd, "--node_rank", str(r), "-m", "stages.train", *args, "--resume"],
                              cwd=ROOT, env=clean_env(OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    logs = [p.communicate(timeout=300)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], logs[0][-4000:] + logs[1][-4000:]
    assert f"resumed from {out / 'checkpoints' / f'step{killed_at:08d}'}" in logs[0]

    from pipeline.train.loop import read_metrics

    got = read_metrics(out)
    assert sorted(got) == list(range(1, STEPS + 1))  # the killed run's later lines were dropped, none twice
    want = losses(driver["zero2"]["metrics"])
    assert [got[s]["loss"] for s in range(1, STEPS + 1)] == pytest.approx(want, rel=2e-5)

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["zero_stage"] == 2 and manifest["finished"]
    assert {"D_P/s1_t2", "D_FG/s2_t4", "D_CKA/s1_t2", "loss", "kd"} <= set(manifest["final_valid"])
    assert (out / "model" / "model.safetensors").is_file()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events in (out / "tb").glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert {"train/loss", "train/ce", "train/kd", "train/procrustes/s1_t2", "train/procrustes/s2_t4", "train/lr",
            "train/grad_norm", "train/tokens_per_s", "valid/loss", "valid/D_P/s1_t2", "valid/D_FG/s1_t2",
            "valid/D_CKA/s2_t4"} <= tags


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (torchrun starts its ranks in sessions of their own, so a
    process-group kill would miss them)."""
    import psutil  # a DeepSpeed dependency

    root = psutil.Process(pid)
    for p in [*root.children(recursive=True), root]:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def test_bad_inputs_fail_before_any_engine_with_the_input_named(prepared_tiny, tiny_pair, stores, tmp_path):
    from pipeline.errors import ConfigError, StoreError
    from pipeline.train.config import TrainConfig
    from pipeline.train.setup import plan_run

    def plan(**kw):
        base = dict(mode="distill", data=str(prepared_tiny), student=str(tiny_pair.student),
                    features=str(stores / "train"), out=str(tmp_path / "run"), valid_split="")
        return plan_run(TrainConfig(**{**base, **kw}))

    saved = dict(os.environ)
    with pytest.raises(ConfigError, match="caches split 'valid', training reads 'train'"):
        plan(features=str(stores / "valid"))
    with pytest.raises(ConfigError, match="teacher layer 9 out of range 0..4"):
        plan(layer_map=["1:9"])
    with pytest.raises(StoreError, match=r"layers: store lacks \[3\]"):
        plan(layer_map=["1:3"])
    with pytest.raises(StoreError, match="teacher: store has fingerprint"):
        plan(teacher=str(tiny_pair.student))  # another model than the one that made the store
    with pytest.raises(ConfigError, match="--valid_split 'dev'.* has splits train, valid"):
        plan(valid_split="dev")
    with pytest.raises(ConfigError, match="fewer than one global batch"):
        plan(micro_batch_size=600)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="pass --resume"):
        plan()
    assert dict(os.environ) == saved  # nothing was launched: no rendezvous variables set in this process
    p = plan(resume=True, layer_map=["2:4"], loss="fg", alpha=0.0)
    assert p.objective.pairs == ((2, 4),) and p.objective.kd == "none" and p.objective.teacher_layers == [4]
