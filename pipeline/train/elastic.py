"""Resuming a run on another number of ranks: a preempted job that comes back on fewer or more nodes.

The data order depends only on (seed, epoch) and the global batch (pipeline/train/data.py), so a run continues
exactly, no sample skipped or seen twice, when the global batch micro_batch_size x grad_accum x ranks is kept.
On M ranks instead of N, a command that keeps the run's grad_accum gets grad_accum x N / M; anything that would
change the global batch is refused. ZeRO 1-3 (and bf16 at stage 0, whose optimizer DeepSpeed also partitions)
split the optimizer state by rank: such a checkpoint is converted once, by DeepSpeed's own `ds_to_universal`, to
its universal form (each parameter's fp32 weights and Adam moments whole, in checkpoints/universal/TAG), which an
engine of any size loads with `"checkpoint": {"load_universal": true}`. Checkpoints the resumed run writes are
ordinary ones of its own size.
"""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
import time
from argparse import Namespace
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError
from pipeline.io import write_json_atomic
from pipeline.train import checkpointing as ckpt
from pipeline.train.config import TrainConfig
from pipeline.train.ds_config import global_batch

_DONE = "geokd-universal.json"  # written last into a converted copy


@dataclass(frozen=True)
class ElasticResume:
    """A --resume on another number of ranks than the checkpoint's."""

    tag: str
    from_ranks: int
    to_ranks: int
    grad_accum: tuple[int, int]  # (the checkpoint's, this run's)
    zero_stage: int | None  # the checkpoint's stage (None: written before geokd recorded it)
    universal: bool  # the optimizer state is partitioned by rank: load the universal conversion


def partitioned(folder: Path) -> bool:
    """True when DeepSpeed split the optimizer state of checkpoint `folder` by rank."""
    return any(folder.glob("*zero_pp_rank_*optim_states.pt"))


def plan_elastic(cfg: TrainConfig, world_size: int) -> tuple[TrainConfig, ElasticResume | None]:
    """For --resume: the options to run with and the elastic resume, when the newest checkpoint was written by
    another number of ranks (None otherwise). Reads only geokd.json, so a refusal loads nothing."""
    root = Path(cfg.out) / "checkpoints"
    if not cfg.resume or not ckpt.complete_tags(root):
        return cfg, None
    tag = ckpt.resume_order(root)[0][0]
    saved = ckpt.saved_state(root / tag)
    if saved is None or saved["world_size"] == world_size:
        return cfg, None
    old, n = saved["config"], saved["world_size"]
    where = root / tag
    if old.get("micro_batch_size") != cfg.micro_batch_size:
        raise ConfigError(f"--resume from {where}: micro_batch_size {cfg.micro_batch_size}, the run was started with "
                          f"{old.get('micro_batch_size')}; keep it (a micro-batch's mean loss depends on it)")
    run_batch = global_batch(old["micro_batch_size"], old["grad_accum"], n)
    accum = cfg.grad_accum
    if cfg.global_batch(world_size) != run_batch:
        if cfg.grad_accum != old["grad_accum"]:
            raise ConfigError(
                f"--resume from {where}: --grad_accum {cfg.grad_accum} on {world_size} rank(s) makes a global batch "
                f"of {cfg.global_batch(world_size)}; the run's is {run_batch} ({n} ranks x micro-batch "
                f"{old['micro_batch_size']} x grad_accum {old['grad_accum']}). Leave --grad_accum as it was and geokd "
                f"adjusts it, or pass the one that keeps {run_batch}")
        if run_batch % (cfg.micro_batch_size * world_size):
            raise ConfigError(
                f"--resume from {where}: the run's global batch of {run_batch} samples cannot be split over "
                f"{world_size} rank(s) x micro-batch {cfg.micro_batch_size}; resume on a number of ranks that "
                f"divides {run_batch // cfg.micro_batch_size}")
        accum = run_batch // (cfg.micro_batch_size * world_size)
    elastic = ElasticResume(tag=tag, from_ranks=n, to_ranks=world_size, grad_accum=(old["grad_accum"], accum),
                            zero_stage=saved.get("zero_stage"), universal=partitioned(where))
    return replace(cfg, grad_accum=accum), elastic


def pin_zero_stage(raw: dict[str, Any], elastic: ElasticResume | None) -> list[str]:
    """A ds_config whose ZeRO stage is "auto" resolves by the number of ranks (0 on one rank, 2 on several): on an
    elastic resume it keeps the checkpoint's stage instead, since DeepSpeed loads a universal checkpoint only into
    a ZeRO (or bf16) optimizer. Returns the note to print."""
    zero = raw.get("zero_optimization", {})
    if elastic is None or elastic.zero_stage is None or zero.get("stage", 0) != "auto":
        return []
    zero["stage"] = elastic.zero_stage
    return [f"ZeRO stage auto -> {elastic.zero_stage}: kept from the checkpoint ({elastic.from_ranks} ranks)"]


def check_stage(elastic: ElasticResume, stage: int, precision: str) -> None:
    """DeepSpeed loads a universal checkpoint into a ZeRO 1-3 optimizer or its bf16 one, not plain ZeRO-0."""
    if elastic.universal and stage == 0 and precision != "bf16":
        was = elastic.zero_stage if elastic.zero_stage is not None else ">= 1"
        raise ConfigError(f"checkpoint {elastic.tag} partitions its optimizer state over {elastic.from_ranks} ranks; "
                          f"this run's ds_config resolves to ZeRO-0 in {precision}, which cannot load it. Resume "
                          f"with the run's ZeRO stage ({was})")


def universal_copy(root: Path, elastic: ElasticResume, is_main: bool) -> Path:
    """checkpoints/universal/TAG, converted by rank 0 unless a complete conversion is there; every rank calls this
    and waits for it (after the process group exists)."""
    import torch

    target = root / ckpt.UNIVERSAL / elastic.tag
    if is_main and not (target / _DONE).is_file():
        print(f"[train] converting {root / elastic.tag} ({elastic.from_ranks} ranks) to a universal checkpoint in "
              f"{target}", flush=True)
        started = time.perf_counter()
        convert_to_universal(root / elastic.tag, target)
        size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
        print(f"[train] converted in {time.perf_counter() - started:.1f} s ({size / 2**20:.0f} MiB)")
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()
    return target


def convert_to_universal(source: Path, target: Path) -> None:
    """DeepSpeed's ds_to_universal, written through a temp folder and renamed, so a killed conversion leaves no
    half-written copy that a later resume would load."""
    from deepspeed.checkpoint import ds_to_universal

    ckpt.check_written_by_us(source)  # the converter unpickles every file of it
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    out = tmp / target.name
    args = Namespace(input_folder=str(source), output_folder=str(out), num_extract_workers=1,
                     num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            ds_to_universal.main(args)
        for f in source.glob("*.json"):  # geokd.json and the RNG states, beside DeepSpeed's files
            shutil.copy2(f, out / f.name)
        write_json_atomic(out / _DONE, {"source": source.name})
        if target.exists():
            shutil.rmtree(target)
        os.replace(out, target)
    except Exception as e:
        raise ConfigError(f"converting {source} to a universal checkpoint failed ({type(e).__name__}: {e}); "
                          f"DeepSpeed said:\n{log.getvalue()[-2000:]}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
