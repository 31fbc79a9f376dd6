"""Checkpoints and the consolidated model of a training run.

A checkpoint is DeepSpeed's own (engine, optimizer, scheduler; every ZeRO stage) plus what makes a resumed run
continue exactly: the data position (epoch, optimizer steps done in it) and the run's config in the client
state, and each rank's RNG states in `rng-rank<r>.pt` beside DeepSpeed's files (dropout draws). The RNG files
are written before DeepSpeed writes `latest`, so `latest` never points at a checkpoint without them.

The consolidated model is a plain Hugging Face directory (save_pretrained + tokenizer) of the student alone,
gathered from the live engine: the module's weights for ZeRO 0-2 (every rank holds them whole), layer-by-layer
gathering to rank 0 for ZeRO-3. Its dtype is the training weights' dtype (fp32 runs give fp32 weights).
"""
from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import ConfigError
from pipeline.io import usual_modes
from pipeline.runtime import DistInfo

LATEST = "latest"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def latest_tag(root: Path) -> str | None:
    f = root / LATEST
    if not f.is_file():
        return None
    tag = f.read_text().strip()
    return tag if (root / tag).is_dir() else None


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(engine: Any, root: Path, step: int, client_state: dict[str, Any], dist: DistInfo,
                    keep: int) -> Path:
    """Write checkpoint `step` under `root` on every rank; prune to the `keep` newest (0 keeps all)."""
    tag = tag_for(step)
    (root / tag).mkdir(parents=True, exist_ok=True)
    torch.save(_rng_state(), root / tag / f"rng-rank{dist.rank}.pt")
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state)
    if dist.is_main and keep > 0:
        tags = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("step"))
        for old in tags[:-keep]:
            if old != tag:
                shutil.rmtree(root / old, ignore_errors=True)
    if dist.world_size > 1:
        torch.distributed.barrier()
    return root / tag


def load_checkpoint(engine: Any, root: Path, dist: DistInfo) -> tuple[str, dict[str, Any]]:
    """Load the newest checkpoint into `engine`, restore this rank's RNG; return (tag, client state)."""
    tag = latest_tag(root)
    if tag is None:
        raise FileNotFoundError(f"{root}: no checkpoint to resume from")
    path, client = engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {root / tag}")
    rng = root / tag / f"rng-rank{dist.rank}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=False))
    elif dist.is_main:
        print(f"[train] {rng} missing (other number of ranks?): dropout draws will differ from an uninterrupted run")
    return tag, client


def check_resume_config(saved: dict[str, Any], current: dict[str, Any], free: frozenset[str], where: Path) -> None:
    """A resumed run must train the same thing: name every option that changed."""
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}"
             for k in sorted(set(saved) | set(current)) if k not in free and saved.get(k) != current.get(k)]
    if diffs:
        raise ConfigError(f"--resume from {where}: the run was started with other options; either restore them "
                          f"or start a new --out:\n  " + "\n  ".join(diffs))


def consolidated_state_dict(engine: Any, stage: int, rank: int) -> dict[str, torch.Tensor] | None:
    """The student's full weights on rank 0 (None elsewhere); collective under ZeRO-3: call on every rank."""
    if stage == 3:
        full = engine._zero3_consolidated_16bit_state_dict()
    else:
        full = engine.module.state_dict() if rank == 0 else None
    if full is None:
        return None
    prefix = "student."
    state = {k[len(prefix):]: v.detach().cpu().clone() for k, v in full.items() if k.startswith(prefix)}
    # Tied parameters (OPT's LM head is its input embedding) become one tensor again, so save_pretrained writes
    # it once, as its own save of the same model does (the copies above are separate tensors: 0.4 GB more for
    # OPT-1.3B in fp32).
    names_of: dict[int, list[str]] = {}
    for name, param in engine.module.student.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)
    for names in names_of.values():
        present = [n for n in names if n in state]
        for name in present[1:]:
            state[name] = state[present[0]]
    return state


def save_consolidated(engine: Any, stage: int, dist: DistInfo, tokenizer: Any, out_dir: Path) -> Path | None:
    """Write the student as a Hugging Face model directory `out_dir` (atomic rename); rank 0 writes."""
    state = consolidated_state_dict(engine, stage, dist.rank)
    if dist.is_main:
        if out_dir.exists():
            raise FileExistsError(f"{out_dir} exists; refusing to overwrite a saved model")
        student = engine.module.student
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
        # Training turned the KV cache off; the saved model is for generation, where it belongs on.
        use_cache, student.config.use_cache = student.config.use_cache, True
        try:
            student.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            usual_modes(tmp)  # readable by colleagues on shared storage, like any file they write
            os.replace(tmp, out_dir)
        finally:
            student.config.use_cache = use_cache
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    if dist.world_size > 1:
        torch.distributed.barrier()
    return out_dir if dist.is_main else None
