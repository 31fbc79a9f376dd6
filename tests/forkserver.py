"""A Python for the tests' stage processes that skips the 3-5 s of imports each one pays (torch, transformers,
DeepSpeed): a server process imports them once, then forks a fresh process for every `python -m stages.X ...`
or `python bench/SCRIPT.py ...` the tests start, the nested ones included (a study's steps, torchrun's ranks).

`python_for_stages()` is an executable (a short script) that tests use wherever they would use sys.executable.
It hands its argv, environment, working folder and standard streams to the server and exits as the forked process
exits (its code, or its signal). Each forked process is what a new interpreter would be: nothing has *run* in
the server, only imports; it gets its own process group, signals sent to the shim are passed on, and it is
killed (with its children) when the shim dies, SIGKILL included. Anything else (`-m pip`, `-c`, another network
namespace, as in the two-host tests) runs the real interpreter unchanged.

Why fork is safe here: the server runs no torch op and starts no thread of its own (libraries' idle pools, such
as OpenBLAS's, have fork handlers), the same conditions under which DataLoader workers fork.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import struct
import sys

SOCKET_VAR = "GEOKD_TEST_FORKSERVER"  # the server's socket path
NETNS_VAR = "GEOKD_TEST_FORKSERVER_NETNS"  # the network namespace it serves
REAL_PYTHON_VAR = "GEOKD_TEST_REAL_PYTHON"
PRELOAD = ["torch", "numpy", "transformers", "deepspeed", "datasets", "safetensors.torch", "scipy.stats",
           "transformers.models.opt.modeling_opt", "transformers.models.llama.modeling_llama",
           "stages.prepare", "stages.cache", "stages.train", "stages.eval", "stages.study", "stages.analyze",
           "stages.synthetic", "stages.demo", "stages.get_model", "stages.make_student",
           "pipeline.train.setup", "pipeline.train.loop", "eval.runner", "torch.distributed.run"]
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


def _netns() -> str:
    try:
        return os.readlink("/proc/self/ns/net")
    except OSError:
        return ""


def _send(conn: socket.socket, obj: object) -> None:
    data = json.dumps(obj).encode()
    conn.sendall(struct.pack("!I", len(data)) + data)


def _recv(conn: socket.socket) -> object | None:
    head = _recv_exact(conn, 4)
    if head is None:
        return None
    body = _recv_exact(conn, struct.unpack("!I", head)[0])
    return None if body is None else json.loads(body)


def _recv_exact(conn: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        try:
            chunk = conn.recv(n - len(buf))
        except (ConnectionResetError, OSError):
            return None
        if not chunk:
            return None
        buf += chunk
    return buf


# -- what the tests start: the shim ------------------------------------------------------------------------------

def _target(argv: list[str]) -> tuple[str, str, list[str]] | None:
    """('module' | 'script', name, args) for the launches the server takes; None for everything else."""
    if argv[:1] == ["-u"]:  # torchrun starts its ranks with -u; the forked process's streams are unbuffered anyway
        argv = argv[1:]
    if argv[:1] == ["-m"] and len(argv) >= 2 and (argv[1].startswith("stages.") or argv[1] == "torch.distributed.run"):
        return "module", argv[1], argv[2:]
    if argv and argv[0].endswith(".py") and "/bench/" in os.path.abspath(argv[0]):
        return "script", os.path.abspath(argv[0]), argv[1:]
    return None


def shim_main() -> None:
    argv = sys.argv[1:]
    real = os.environ[REAL_PYTHON_VAR]
    target = _target(argv)
    path = os.environ.get(SOCKET_VAR, "")
    if target is None or not path or os.environ.get(NETNS_VAR) != _netns():
        os.execv(real, [real, *argv])
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
    except OSError:
        os.execv(real, [real, *argv])  # no server (any more): the real interpreter, only slower
    request = json.dumps({"target": target, "env": dict(os.environ), "cwd": os.getcwd()}).encode()
    socket.send_fds(conn, [struct.pack("!I", len(request)) + request], [0, 1, 2])
    for s in FORWARDED_SIGNALS:
        signal.signal(s, lambda signum, frame: _send(conn, {"signal": signum}))
    reply = _recv(conn)
    status = reply["status"] if isinstance(reply, dict) else None
    if status is None:
        sys.exit(1)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    sys.exit(os.waitstatus_to_exitcode(status))


# -- the server -------------------------------------------------------------------------------------------------

def serve(path: str, ready_fd: int) -> None:
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # monitors are reaped by the kernel
    os.write(ready_fd, b"ready\n")
    os.close(ready_fd)
    while True:
        conn, _ = listener.accept()
        if os.fork() == 0:
            listener.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            try:
                _monitor(conn)
            finally:
                os._exit(0)
        conn.close()


def _monitor(conn: socket.socket) -> None:
    """Receive one launch, fork it, pass signals on, report how it ended; kill it if the shim goes away."""
    import select

    head, fds, _, _ = socket.recv_fds(conn, 4, 3)
    size = struct.unpack("!I", head)[0]
    request = json.loads(_recv_exact(conn, size) or b"null")
    pid = os.fork()
    if pid == 0:
        conn.close()
        _worker(request, fds)
    for fd in fds:
        os.close(fd)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *a: None)
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            _send(conn, {"status": status})
            return
        readable, _, _ = select.select([conn, wake_r], [], [], 1.0)
        if wake_r in readable:
            os.read(wake_r, 4096)
        if conn in readable:
            message = _recv(conn)
            if message is None:  # the shim is gone (killed): take the launch and its children with it
                _kill_group(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return
            _kill_group(pid, message["signal"], group=False)


def _kill_group(pid: int, sig: int, group: bool = True) -> None:
    try:
        os.killpg(pid, sig) if group else os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _worker(request: dict, fds: list[int]) -> None:
    """Become the launched process: its streams, environment, folder and argv, then run it as __main__."""
    import atexit
    import io
    import runpy
    import threading
    import traceback
    import warnings

    os.setpgid(0, 0)
    for s in FORWARDED_SIGNALS:
        signal.signal(s, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    for target_fd, fd in zip((0, 1, 2), fds):
        os.dup2(fd, target_fd)
        os.close(fd)
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False))
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=True, line_buffering=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), write_through=True, line_buffering=True)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    kind, name, args = request["target"]
    warnings.filterwarnings("ignore", message=".*found in sys.modules after import of package", category=RuntimeWarning)
    sys.executable = os.environ.get("GEOKD_TEST_PYTHON", sys.executable)
    code = 0
    try:
        import torch

        threads = os.environ.get("OMP_NUM_THREADS")
        torch.set_num_threads(int(threads) if threads and threads.isdigit() else len(os.sched_getaffinity(0)))
        if kind == "module":
            sys.argv = [name, *args]
            sys.path[0] = os.getcwd()
            runpy.run_module(name, run_name="__main__", alter_sys=True)
        else:
            sys.argv = [name, *args]
            sys.path[0] = os.path.dirname(name)
            runpy.run_path(name, run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except KeyboardInterrupt:
        code = 130
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        threading._shutdown()  # what the interpreter does at exit: wait for the threads that are not daemons
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


# -- the tests' side ---------------------------------------------------------------------------------------------

_STATE: dict[str, object] = {}


def python_for_stages() -> str:
    """The shim's path, the server started on first use (about 5 s, once per test session)."""
    if "shim" in _STATE:
        return str(_STATE["shim"])
    import atexit
    import subprocess
    import tempfile
    from pathlib import Path

    here = Path(__file__).resolve().parent
    root = here.parent
    folder = Path(tempfile.mkdtemp(prefix="geokd-forkserver-"))
    sock, shim = folder / "server.sock", folder / "python"
    shim.write_text(f"#!{sys.executable} -I\nimport sys\nsys.path.insert(0, {str(here)!r})\n"
                    "import forkserver\nforkserver.shim_main()\n")
    shim.chmod(0o755)
    launch_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launch_vars}
    env.update(PYTHONPATH=f"{root}{os.pathsep}{here}", OMP_NUM_THREADS="1")
    ready_r, ready_w = os.pipe()
    server = subprocess.Popen([sys.executable, "-c", f"import forkserver; forkserver.serve({str(sock)!r}, {ready_w})"],
                              cwd=root, env=env, pass_fds=[ready_w], stdin=subprocess.DEVNULL)
    os.close(ready_w)
    with os.fdopen(ready_r) as ready:
        if ready.readline().strip() != "ready":
            raise RuntimeError("the tests' fork server did not start (see its traceback above)")

    def stop() -> None:
        server.kill()
        server.wait()
        for p in (sock, shim):
            p.unlink(missing_ok=True)
        folder.rmdir()

    atexit.register(stop)
    os.environ.update({SOCKET_VAR: str(sock), NETNS_VAR: _netns(), REAL_PYTHON_VAR: sys.executable,
                       "GEOKD_TEST_PYTHON": str(shim)})
    _STATE["shim"] = shim
    return str(shim)
