"""Process-level setup shared by the stages: distributed rank info and collectives, seeds, devices, dtypes.

A stage runs unchanged as one plain process, under `torchrun`, or under the `deepspeed` launcher: the
launchers set RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT, and a plain process gets single-rank values with a
free port (DeepSpeed otherwise tries MPI discovery and fails).
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import ERROR_DIR_VAR, ConfigError

# One spelling per dtype on disk and in manifests; users may type either column.
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_dist_env() -> DistInfo:
    """Fill in single-process rendezvous variables when no launcher set them; return this rank's info."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("LOCAL_WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return DistInfo(
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )


def skip_unused_deepspeed_ops() -> None:
    """On a CPU, DeepSpeed's communication backend JIT-compiles a shared-memory all-reduce op when it starts (about
    30 s, once per machine) that only its inference all-reduce calls (tensor-parallel inference); training's
    all-reduce, and every collective geokd runs, goes through torch.distributed either way. Marking the op
    unavailable in DeepSpeed's table of compatible ops (one dict, kept for such edits) skips the build."""
    if os.environ.get("DS_ACCELERATOR") != "cpu":
        return
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def dist_info() -> DistInfo:
    """Rank info from the environment without touching it (1 rank when no launcher is involved)."""
    return DistInfo(
        rank=int(os.environ.get("RANK", "0")),
        world_size=int(os.environ.get("WORLD_SIZE", "1")),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )


def pick_device(local_rank: int = 0) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def is_hub_name(spec: str) -> bool:
    """`org/name` that is not an existing local path: a Hugging Face hub repository id."""
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not Path(spec).expanduser().exists() and not spec.startswith((".", "~"))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def dtype_name(name: str, option: str = "dtype", allow_auto: bool = False) -> str:
    """The canonical name (fp32, bf16, fp16; or auto) of a dtype a user typed as `bf16` or `bfloat16`."""
    if allow_auto and name == "auto":
        return name
    canonical = DTYPE_ALIASES.get(name, name)
    if canonical not in DTYPES:
        choices = ("auto, " if allow_auto else "") + ", ".join(f"{k} ({v})" for v, k in DTYPE_ALIASES.items())
        raise ConfigError(f"--{option} {name!r}: choose one of {choices}")
    return canonical


def torch_dtype(name: str, device: torch.device | None = None) -> torch.dtype:
    """The torch dtype of a name; `auto` is fp32 on a CPU and bf16 (fp16 where bf16 is missing) on a GPU."""
    if name == "auto":
        if device is not None and device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return DTYPES[dtype_name(name)]


# -- collectives: no-ops on one rank, so callers need no `if world_size > 1` -------------------------------------
def init_process_group(world_size: int, backend: str | None = None, timeout: timedelta | None = None) -> bool:
    """Join the ranks' process group when there are several and none exists yet; True if this call made it."""
    if world_size <= 1 or torch.distributed.is_initialized():
        return False
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    torch.distributed.init_process_group(backend, **({"timeout": timeout} if timeout else {}))
    return True


def destroy_process_group() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def barrier(world_size: int) -> None:
    if world_size > 1:
        torch.distributed.barrier()


def broadcast_object(obj: Any, world_size: int) -> Any:
    """Rank 0's `obj` on every rank."""
    if world_size <= 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def gather_lists(items: list[Any], world_size: int) -> list[Any]:
    """Every rank's list, concatenated in rank order, on every rank."""
    if world_size <= 1:
        return items
    parts: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(parts, items)
    return [x for part in parts for x in part]


# -- local ranks: launched, watched and taken down together ------------------------------------------------------


def _die_with_parent() -> None:
    """In a child, before exec: get SIGTERM when the launching process dies, even by SIGKILL (Linux)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def launch_local_ranks(module: str, nproc: int, args: list[str]) -> int:
    """Run `python -m module args` as `nproc` ranks of one job on this machine and wait for them.

    The ranks die with the launcher (SIGTERM/SIGINT are passed on; SIGKILL reaches them through the kernel's
    parent-death signal), the first rank to fail takes the others down, and a user's mistake is printed once,
    however many ranks met it. Returns the job's exit status (2 when a rank exited with 2)."""
    errors = tempfile.mkdtemp(prefix="geokd-errors-")
    port = free_port()
    threads = str(max(1, (os.cpu_count() or 1) // nproc))
    procs = []
    for r in range(nproc):
        env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **{ERROR_DIR_VAR: errors})
        env.setdefault("OMP_NUM_THREADS", threads)
        procs.append(subprocess.Popen([sys.executable, "-m", module, *args], env=env, preexec_fn=_die_with_parent))

    def stop_all() -> None:
        for p in procs:
            if p.poll() is None:
                p.terminate()

    def on_signal(signum: int, frame: object) -> None:
        stop_all()
        sys.exit(128 + signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        failed = None
        while any(p.poll() is None for p in procs):
            failed = failed or next((p for p in procs if p.returncode not in (None, 0)), None)
            if failed is not None:
                time.sleep(2.0)  # let the other ranks meet the same error and say so, then take them down
                stop_all()
                break
            time.sleep(0.05)
        codes = [p.wait() for p in procs]
        messages = sorted({Path(errors, f).read_text().strip() for f in os.listdir(errors)})
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        shutil.rmtree(errors, ignore_errors=True)  # also when a signal ends the launcher
    for message in messages:
        print(message, file=sys.stderr)
    if messages or 2 in codes:
        return 2
    if all(c == 0 for c in codes):
        return 0
    return failed.returncode if failed is not None and failed.returncode > 0 else 1
