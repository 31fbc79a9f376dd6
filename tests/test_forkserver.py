"""The tests' fork server (tests/forkserver.py) behaves as a new interpreter would, where the tests rely on it:
exit codes and streams come back, the launched process is its own, and it dies with the process that asked."""
from __future__ import annotations

import os
import signal
import subprocess

from forkserver import python_for_stages
from helpers import ROOT, clean_env, wait_until


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for every purpose here
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


def test_streams_exit_code_and_the_real_interpreter_for_everything_else(tmp_path):
    py = python_for_stages()
    ok = subprocess.run([py, "-m", "stages.prepare", "--help"], cwd=ROOT, env=clean_env(), capture_output=True,
                        text=True, timeout=60)
    assert ok.returncode == 0 and "--tokenizer" in ok.stdout
    bad = subprocess.run([py, "-m", "stages.prepare", "--data", str(tmp_path / "none.jsonl"), "--out",
                          str(tmp_path / "p")], cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith("[prepare] error:") and "none.jsonl" in bad.stderr
    other = subprocess.run([py, "-c", "import sys; print(sys.flags.isolated, 'torch' in sys.modules)"], cwd=ROOT,
                           env=clean_env(), capture_output=True, text=True, timeout=60)
    assert other.stdout.split() == ["0", "False"]  # -c is not forked: a plain interpreter, nothing imported


def test_a_killed_shim_takes_its_process_with_it(prepared_tiny, tmp_path):
    out = tmp_path / "run"
    shim = subprocess.Popen([python_for_stages(), "-m", "stages.train", "--mode", "sft", "--data", str(prepared_tiny),
                             "--student", "preset:tiny-student", "--out", str(out), "--max_steps", "100000",
                             "--num_workers", "0", "--progress", "false", "--valid_split", ""],
                            cwd=ROOT, env=clean_env(OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    assert wait_until((out / "metrics.jsonl").exists, 60), "the run did not start"
    pid = int((out / ".lock").read_text().split()[1])  # the run writes its own pid into its folder lock
    assert pid != shim.pid and _alive(pid)
    shim.send_signal(signal.SIGKILL)
    shim.wait()
    assert wait_until(lambda: not _alive(pid), 10), "the forked run outlived the process that started it"
