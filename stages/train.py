"""Stage `train`: SFT or distillation of a student under DeepSpeed.

    ./run.sh train --mode sft --data PREPARED --student MODEL_OR_PRESET --out DIR [--ds_config ds_configs/zero2.json]
    ./run.sh train --mode distill --data PREPARED --student MODEL_OR_PRESET --features STORE --loss procrustes \\
        --alpha 0.5 --beta 1.0 [--layer_map 1:2 2:4] --out DIR [--resume] [--nproc 2]

Distill mode streams the teacher's stored features (./run.sh cache) and never loads the teacher; with
--teacher_mode online (or --teacher without --features) a frozen teacher runs every step instead. Launch as one
process, with --nproc N (this stage relaunches itself under torchrun on this machine), or under your own
launcher: `torchrun --nproc_per_node N [--nnodes M ...] -m stages.train ...` or
`deepspeed [--hostfile ds_configs/hostfile.example] --module stages.train ...`. Options: pipeline/train_config.py;
the run: pipeline/training.py (setup) and pipeline/train_loop.py (loop, validation, checkpoints, outputs).
"""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

from pipeline.config import ConfigError, parse_config
from pipeline.runtime import free_port
from pipeline.train_config import TrainConfig


def relaunch_under_torchrun(nproc: int, argv: list[str]) -> int:
    """Run this stage as `nproc` local ranks; the ranks see RANK set and do not relaunch again."""
    # torchrun's parser would take our --nproc for an abbreviation of its --nproc_per_node: leave it out.
    args, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            args.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "stages.train", *args]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return subprocess.call(cmd, env=env)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg = parse_config(TrainConfig, argv)
    except ConfigError as e:
        print(f"[train] {e}", file=sys.stderr)
        return 2
    if cfg.nproc > 1 and "RANK" not in os.environ:
        return relaunch_under_torchrun(cfg.nproc, argv)

    # DeepSpeed 0.19's ZeRO-3 calls torch collectives that torch 2.13 marks deprecated, once per bucket and step:
    # hundreds of identical lines that bury the progress bar. Nothing for a user to act on.
    warnings.filterwarnings("ignore", category=FutureWarning,
                            message=r".*(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated")
    from pipeline.train_loop import run_training
    from pipeline.training import setup

    from pipeline.feature_store import StoreError

    try:
        run = setup(cfg)
        run_training(run)
    except (ConfigError, StoreError, FileExistsError, FileNotFoundError) as e:
        print(f"[train] {e}", file=sys.stderr)
        return 2
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
