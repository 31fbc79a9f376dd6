"""Multi-node for real: `deepspeed --hostfile` on host 1 starts one rank on each of two hosts over ssh (pdsh, the
launcher's default runner), the way a user launches on a cluster. The hosts are network namespaces with their
own addresses and sshd (tests/multinode/hosts.py); the launch runs from a job folder holding the hostfile and the
`.deepspeed_env` the README describes, not from the repository.

Shown: every rank gets the environment file's variables and runs on its own host; cache writes the same shards
as one process; train (stored features, ZeRO-2 and ZeRO-3) gives one process's losses at the same global batch
and the same consolidated model; a one-process checkpoint resumes on the two hosts; eval writes the same
generations and scores.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from forkserver import python_for_stages
from helpers import ROOT, clean_env
from multinode.hosts import IFNAME, Unavailable, can_run_here, two_hosts

STEPS = 6
DEEPSPEED_ENV = {  # what the README tells users to put in .deepspeed_env
    "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": IFNAME, "NCCL_SOCKET_IFNAME": IFNAME,
    "NCCL_DEBUG": "WARN", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
    "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache/torch_extensions")),
    "GEOKD_MARK": "from-the-deepspeed-env-file",
}


def launch_env() -> dict[str, str]:
    """The launching shell's: what .deepspeed_env sets is left out, so the ranks can only get it from the file;
    PYTHONPATH (the repository) is forwarded by the launcher, as PYTHON* variables are."""
    return {k: v for k, v in clean_env().items() if k not in DEEPSPEED_ENV}


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    try:
        with two_hosts(tmp_path_factory.mktemp("hosts")) as h:
            yield h
    except Unavailable as e:
        if can_run_here():  # the local two-rank twins stood down for these: they must not skip as well
            pytest.fail(f"the two-host tests did not start on a machine where they should run: {e}")
        pytest.skip(f"TWO-HOST TESTS NOT RUN: {e}")


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Path:
    """The folder a user launches from: .deepspeed_env beside their files."""
    folder = tmp_path_factory.mktemp("job")
    (folder / ".deepspeed_env").write_text("".join(f"{k}={v}\n" for k, v in DEEPSPEED_ENV.items()))
    return folder


def launch(hosts, job: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    r = hosts.deepspeed([*map(str, args)], cwd=job, env=hosts.env(launch_env()), timeout=timeout)
    assert r.returncode == 0, (r.stdout[-4000:] + r.stderr[-4000:])
    return r


def one_process(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = launch_env()
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    r = subprocess.run([python_for_stages(), *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def test_every_rank_runs_on_its_own_host_with_the_environment_file(hosts, job, tmp_path):
    launch(hosts, job, str(ROOT / "tests/multinode/probe.py"), str(tmp_path))
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["addr"] for r in reports] == list(hosts.addrs)  # rank 0 on host 1, rank 1 on host 2
    for rank, report in enumerate(reports):
        assert report["all_reduce"] == 3.0 and report["threads"] == 1
        env = report["env"]
        assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"]) == (str(rank), "0", "2")
        assert env["MASTER_ADDR"] == hosts.addrs[0]
        for key in ("OMP_NUM_THREADS", "DS_ACCELERATOR", "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "NCCL_DEBUG",
                    "GEOKD_MARK"):
            assert env[key] == DEEPSPEED_ENV[key], key
        assert str(ROOT) in env["PYTHONPATH"].split(":")


def shard_files(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted((store / "shards").iterdir())}


@pytest.fixture(scope="module")
def stores(hosts, job, prepared_tiny, tiny_pair, tmp_path_factory):
    """The train split's features (layers 2, 4 and the final state, fp32) from one process and from the hosts."""
    root = tmp_path_factory.mktemp("mn_stores")
    args = ["--data", prepared_tiny, "--teacher", tiny_pair.teacher, "--split", "train", "--layers", "2", "4",
            "--final", "--dtype", "fp32", "--progress", "false", "--shard_tokens", "3000", "--batch_tokens", "4096"]
    one_process("-m", "stages.cache", *args, "--out", root / "one")
    r = launch(hosts, job, "--module", "stages.cache", *args, "--out", root / "hosts")
    return {"one": root / "one", "hosts": root / "hosts", "log": r.stdout}


def test_cache_across_two_hosts_writes_one_processes_shards(stores):
    one, two = shard_files(stores["one"]), shard_files(stores["hosts"])
    assert len(one) >= 4 and one.keys() == two.keys()
    assert [k for k in one if one[k] != two[k]] == []  # byte for byte
    manifest = lambda p: json.loads((p / "manifest.json").read_text())  # noqa: E731
    assert [s["sha256"] for s in manifest(stores["one"])["shards"]] == \
        [s["sha256"] for s in manifest(stores["hosts"])["shards"]]
    plan = lambda p: json.loads((p / "plan.json").read_text())["fingerprint"]  # noqa: E731
    assert plan(stores["one"]) == plan(stores["hosts"])
    assert "10.231.0.2:" in stores["log"]  # pdsh prefixes the second host's lines with its address


def train_args(prepared: Path, student: Path, store: Path, out: Path, *extra: str) -> list[str]:
    return ["--mode", "distill", "--data", prepared, "--student", student, "--features", store, "--loss",
            "procrustes", "--alpha", "0.5", "--beta", "1.0", "--layer_map", "1:2", "2:4", "--max_steps", STEPS,
            "--micro_batch_size", "2", "--lr", "1e-3", "--seed", "7", "--num_workers", "0", "--progress", "false",
            "--checkpoint_every", "3", "--valid_split=", "--out", out, *extra]


@pytest.fixture(scope="module")
def reference(stores, prepared_tiny, tiny_pair, tmp_path_factory) -> Path:
    """One process, 2 micro-batches of 2 per step: the global batch two ranks make with one each."""
    out = tmp_path_factory.mktemp("mn_train") / "one"
    one_process("-m", "stages.train", *train_args(prepared_tiny, tiny_pair.student, stores["one"], out,
                                                  "--grad_accum", "2", "--ds_config", ROOT / "ds_configs/zero2.json"))
    return out


def train_losses(out: Path) -> list[float]:
    from pipeline.train.loop import read_metrics

    rows = read_metrics(out)
    assert sorted(rows) == list(range(1, STEPS + 1))
    return [rows[s]["loss"] for s in range(1, STEPS + 1)]


def assert_same_model(a: Path, b: Path) -> None:
    """Equal to 1% of one Adam step (lr 1e-3): parameters without a true gradient (the key projection's bias,
    which softmax cancels) are moved by the float noise of their gradient, which the order of reductions sets."""
    wa, wb = load_file(a / "model" / "model.safetensors"), load_file(b / "model" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=1e-4, atol=1e-5), (k, float((wa[k] - wb[k]).abs().max()))


@pytest.mark.parametrize("stage", [2, 3])
def test_train_across_two_hosts_matches_one_process(stage, hosts, job, stores, reference, prepared_tiny, tiny_pair,
                                                   tmp_path):
    out = tmp_path / f"zero{stage}"
    launch(hosts, job, "--module", "stages.train", *train_args(
        prepared_tiny, tiny_pair.student, stores["hosts"], out, "--grad_accum", "1",
        "--ds_config", ROOT / f"ds_configs/zero{stage}.json"))
    assert train_losses(out) == pytest.approx(train_losses(reference), rel=2e-5)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["zero_stage"] == stage and manifest["finished"]
    assert_same_model(out, reference)


def test_a_one_process_zero3_checkpoint_resumes_on_two_hosts(hosts, job, stores, reference, prepared_tiny,
                                                             tiny_pair, tmp_path):
    """Elastic resume across hosts: 1 rank x grad_accum 2 stopped after 3 steps, continued on two hosts, where
    geokd sets grad_accum 1 (the global batch kept) and loads DeepSpeed's universal conversion."""
    out = tmp_path / "elastic"
    args = train_args(prepared_tiny, tiny_pair.student, stores["one"], out, "--grad_accum", "2",
                      "--ds_config", ROOT / "ds_configs/zero3.json")
    one_process("-m", "stages.train", *args, "--stop_after", "3")
    r = launch(hosts, job, "--module", "stages.train", *args, "--resume")
    assert "resuming step00000003 of 1 rank(s) on 2: grad_accum 2 -> 1, global batch 4 kept" in r.stdout
    assert train_losses(out) == pytest.approx(train_losses(reference), rel=2e-5)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["config"]["grad_accum"] == 1
    assert not (out / "checkpoints" / "universal").exists()  # removed once the run wrote a checkpoint of its own
    assert_same_model(out, reference)


def test_eval_across_two_hosts_writes_one_processes_generations_and_scores(hosts, job, tiny_pair, tmp_path):
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"instruction": f"Say {w}.", "output": [w, f"{w} {w}"]}) + "\n"
                          for w in ["yes", "no", "maybe", "red", "blue"]))
    args = ["--models", tiny_pair.student, "--benchmarks", qa, "--seeds", "10", "20", "--batch-size", "2",
            "--max-new-tokens", "4"]
    one_process("-m", "stages.eval", *args, "--out", tmp_path / "one")
    launch(hosts, job, "--module", "stages.eval", *args, "--out", tmp_path / "hosts")
    scores = lambda p: json.loads((p / "scores.json").read_text())  # noqa: E731
    one, two = scores(tmp_path / "one"), scores(tmp_path / "hosts")
    assert two["results"] == one["results"] and two["models"] == one["models"]  # the rest: dates and wall time
    for seed in (10, 20):
        rel = Path("generations", "student", "qa", f"seed{seed}.jsonl")
        assert (tmp_path / "hosts" / rel).read_bytes() == (tmp_path / "one" / rel).read_bytes()
