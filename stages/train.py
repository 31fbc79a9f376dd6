"""Stage `train`: SFT or distillation of a student under DeepSpeed.

    ./run.sh train --mode sft --data PREPARED --student MODEL_OR_PRESET --out DIR [--ds_config ds_configs/zero2.json]
    ./run.sh train --mode distill --data PREPARED --student MODEL_OR_PRESET --features STORE --loss procrustes \\
        --alpha 0.5 --beta 1.0 [--layer_map 1:2 2:4] --out DIR [--resume] [--nproc 2]

Distill mode streams the teacher's stored features (./run.sh cache) and never loads the teacher; with
--teacher_mode online (or --teacher without --features) a frozen teacher runs every step instead. Launch as one
process, with --nproc N (this stage starts N ranks on this machine, takes them down together, and says a
mistake once), or under your own
launcher: `torchrun --nproc_per_node N [--nnodes M ...] -m stages.train ...` or
`deepspeed [--hostfile ds_configs/hostfile.example] --module stages.train ...`.

Options: pipeline/train/config.py. The run folder (OUT/config.yaml, ds_config.json, checkpoints/, tb/,
metrics.jsonl, model/, manifest.json) is described in pipeline/train/setup.py.
"""
from __future__ import annotations

import os
import sys
import time
import warnings
from typing import Any

from pipeline.config import stage_main, without_option
from pipeline.runtime import destroy_process_group, launch_local_ranks
from pipeline.train.config import TrainConfig


def train(run: Any) -> dict[str, Any]:
    """The recipe of a set-up run: resume, train to the end (or --stop_after), validate, consolidate."""
    from pipeline.train.loop import Logger, finish, resume, stop_step, train_steps, validate, write_run_files

    state = resume(run)  # the data position of the newest checkpoint with --resume, else step 0
    write_run_files(run)  # OUT/config.yaml, OUT/ds_config.json
    logger = Logger(run, state.global_step)
    started = time.perf_counter()
    try:
        train_steps(run, logger, state, stop_step(run, state))
        if state.global_step < run.total_steps:
            if run.dist.is_main:
                print(f"[train] stopped at step {state.global_step} of {run.total_steps} (--stop_after); "
                      f"rerun with --resume to continue")
            return {"steps": state.global_step, "total_steps": run.total_steps, "finished": False}
        final = validate(run)
        if final:
            logger.log("valid", state.global_step, final)
        summary = finish(run, state, final, started)  # OUT/model and OUT/manifest.json
        if run.dist.is_main:
            print(f"[train] done: {state.global_step} steps; model in {run.out / 'model'}"
                  + (f"; valid loss {final['loss']:.4f}" if "loss" in final else ""))
        return summary
    finally:
        logger.close()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)

    def recipe(cfg: TrainConfig) -> int:
        if cfg.nproc > 1 and "RANK" not in os.environ:
            # The ranks see RANK set and do not launch again; --nproc is left out of their arguments all the same.
            return launch_local_ranks("stages.train", cfg.nproc, without_option(argv, "--nproc"))
        # DeepSpeed 0.19's ZeRO-3 calls torch collectives that torch 2.13 marks deprecated, once per bucket and
        # step: hundreds of identical lines that bury the progress bar. Nothing for a user to act on.
        warnings.filterwarnings("ignore", category=FutureWarning,
                                message=r".*(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated")
        from pipeline.train.setup import plan_run, setup

        try:
            plan = plan_run(cfg)  # every input checked, in seconds, before any process group or engine
            train(setup(cfg, plan))
        finally:
            destroy_process_group()
        return 0

    return stage_main("train", TrainConfig, recipe, argv)


if __name__ == "__main__":
    sys.exit(main())
