"""Checkpoints and the consolidated model of a training run.

A checkpoint is DeepSpeed's own (engine, optimizer, scheduler; every ZeRO stage) plus what makes a resumed run
continue exactly: the data position (epoch, optimizer steps done in it) and the run's config in the client
state, and each rank's RNG states in `rng-rank<r>.json` beside DeepSpeed's files (dropout draws; JSON, so no
file of ours runs code when loaded). The RNG files are written before DeepSpeed writes `latest`, so `latest`
never points at a checkpoint without them. DeepSpeed's own files are pickles, which torch loads with
weights_only=False inside DeepSpeed: a checkpoint folder is code. Resume therefore loads only folders this
user owns and nobody else can write (check_written_by_us); trust beyond that is the user's own --out.

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
from pipeline.io import read_json, usual_modes, write_json_atomic
from pipeline.runtime import DistInfo

LATEST = "latest"
UNIVERSAL = "universal"  # checkpoints/universal/TAG: a checkpoint converted for another number of ranks
STATE_FILE = "geokd.json"  # the run's data position, world size and config, beside DeepSpeed's files
# Written by rank 0 once every rank has written its part of a checkpoint. DeepSpeed writes `latest` when rank 0's
# files are done, before the other ranks' optimizer shards are: a kill in between left a checkpoint that `latest`
# named and rank 1 could not read (seen in CI). Checkpoints whose state file announces the marker count only with it.
COMPLETE_FILE = "complete.json"


def saved_state(folder: Path) -> dict[str, Any] | None:
    """The geokd state of a checkpoint folder (None for checkpoints written before it existed)."""
    return read_json(folder / STATE_FILE) if (folder / STATE_FILE).is_file() else None


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def latest_tag(root: Path) -> str | None:
    f = root / LATEST
    if not f.is_file():
        return None
    tag = f.read_text().strip()
    return tag if (root / tag).is_dir() else None


def complete_tags(root: Path) -> list[str]:
    """Checkpoints every rank finished writing (oldest first): marked complete, or, if written before geokd marked
    them, with rank 0's DeepSpeed model states."""
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir()
                  if p.is_dir() and p.name.startswith("step") and model_states_file(p) is not None
                  and ((p / COMPLETE_FILE).is_file() or "complete_marker" not in (saved_state(p) or {})))


def model_states_file(folder: Path) -> Path | None:
    """Rank 0's model states: `mp_rank_00_model_states.pt` under ZeRO 0-2, `zero_pp_rank_0_...` under ZeRO-3
    (every rank writes its own there)."""
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if (folder / name).is_file():
            return folder / name
    return None


def resume_order(root: Path) -> tuple[list[str], str | None]:
    """The checkpoints to try, newest first (the one `latest` names leads), and a note when `latest` names
    none of them (a run killed while writing it, or a damaged file)."""
    tags = complete_tags(root)
    named = (root / LATEST).read_text().strip() if (root / LATEST).is_file() else None
    if named in tags:
        return [named] + [t for t in reversed(tags) if t != named], None
    order = list(reversed(tags))
    note = None
    if order and (named is not None or (root / LATEST).exists()):
        note = (f"{root / LATEST} names {named!r}, which is not a complete checkpoint: resuming from the newest "
                f"complete one, {order[0]}")
    return order, note


# RNG states as JSON (no pickle: a file placed in a checkpoint folder must not run code on --resume).
def _rng_state() -> dict[str, Any]:
    version, keys, gauss = random.getstate()
    name, mt, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {"python": [version, list(keys), gauss], "numpy": [name, mt.tolist(), pos, has_gauss,
                                                                              cached],
                             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    name, mt, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(mt, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def save_checkpoint(engine: Any, root: Path, step: int, client_state: dict[str, Any], dist: DistInfo,
                    keep: int) -> Path:
    """Write checkpoint `step` under `root` on every rank; prune to the `keep` newest (0 keeps all)."""
    tag = tag_for(step)
    (root / tag).mkdir(parents=True, exist_ok=True)
    write_json_atomic(root / tag / f"rng-rank{dist.rank}.json", _rng_state())
    if dist.is_main:  # readable before DeepSpeed loads anything (and without unpickling)
        write_json_atomic(root / tag / STATE_FILE, {**client_state, "complete_marker": COMPLETE_FILE})
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state)
    if dist.is_main:  # DeepSpeed's save ends in a barrier: every rank's files are written
        write_json_atomic(root / tag / COMPLETE_FILE, {"step": step, "world_size": dist.world_size})
    if dist.is_main and keep > 0:
        tags = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("step"))
        for old in tags[:-keep]:
            if old != tag:
                shutil.rmtree(root / old, ignore_errors=True)
    if dist.is_main:  # a checkpoint of this run's own size now exists: the converted copy has served
        shutil.rmtree(root / UNIVERSAL, ignore_errors=True)
    if dist.world_size > 1:
        torch.distributed.barrier()
    return root / tag


def check_written_by_us(folder: Path) -> None:
    """DeepSpeed unpickles its checkpoint files (torch.load with weights_only=False), so loading one runs whatever
    it holds: refuse a checkpoint any of whose files or folders another user owns or anyone can write, the way
    ssh refuses a key file others can change (group-writable stays allowed: umask 002 is common on shared
    group storage). What remains trusted is the user's own --out."""
    uid = os.getuid()
    for path in [folder, *folder.rglob("*")]:
        st = path.lstat()
        if st.st_uid != uid or st.st_mode & 0o002:
            who = "another user owns it" if st.st_uid != uid else f"mode {oct(st.st_mode & 0o777)} lets others write"
            raise ConfigError(f"checkpoint {folder} is not safe to load: {path} ({who}); DeepSpeed unpickles "
                              f"checkpoint files, so a file others can write could run code here. Resume only from "
                              f"checkpoints you wrote, with the usual modes (chmod o-w)")


def load_tag(engine: Any, root: Path, tag: str) -> dict[str, Any]:
    """Load checkpoint `root/tag` into `engine`; return its client state."""
    try:
        path, client = engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
    except Exception as e:  # torch.load of a truncated file says nothing of which file it was
        files = ", ".join(sorted(p.name for p in (root / tag).iterdir()))
        raise ConfigError(f"checkpoint {root / tag} cannot be read ({type(e).__name__}: {e}); its files: "
                          f"{files}") from e
    if path is None:
        raise ConfigError(f"DeepSpeed could not load checkpoint {root / tag}")
    return client


def load_checkpoint(engine: Any, root: Path, dist: DistInfo) -> tuple[str, dict[str, Any]]:
    """Load the newest readable checkpoint into `engine`, restore this rank's RNG; return (tag, client state).

    One rank falls back to an older checkpoint when the newest cannot be read, saying so; several ranks stop
    with a message naming the checkpoint (a rank that fails half-way through DeepSpeed's collective loading
    cannot rejoin the others)."""
    order, note = resume_order(root)
    if not order:
        raise ConfigError(f"{root}: no complete checkpoint to resume from")
    if note and dist.is_main:
        print(f"[train] {note}")
    for i, tag in enumerate(order):
        check_written_by_us(root / tag)  # a refusal stops the resume: no falling back past it
        try:
            client = load_tag(engine, root, tag)
            break
        except ConfigError as e:
            if dist.world_size > 1 or i == len(order) - 1:
                raise
            print(f"[train] {e}\n[train] falling back to the previous checkpoint, {order[i + 1]}")
    rng = root / tag / f"rng-rank{dist.rank}.json"
    if rng.is_file():
        _set_rng_state(read_json(rng))
    elif dist.is_main:
        print(f"[train] {rng} missing (other number of ranks, or a checkpoint from before geokd stored RNG states "
              f"as JSON): dropout draws will differ from an uninterrupted run")
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
