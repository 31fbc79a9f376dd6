"""Two real hosts on one machine: Linux network namespaces joined by a veth pair, an sshd in each.

    with two_hosts(workdir) as hosts:
        hosts.deepspeed(["--module", "stages.train", ...])   # the real launcher, from host 1, over ssh + pdsh

Host i is namespace `geokd<pid>h<i>` with address 10.231.0.<i> on an interface named `gkn0` in both (so one
GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME fits every host, as on a cluster); nothing is routed off the machine.
Both hosts see the same filesystem, so the repository and the virtual environment are at the same path on each,
as on a cluster with shared storage. ssh uses a throwaway key pair through a wrapper first on PATH (`ssh -F
CONFIG`), so neither the user's ~/.ssh nor the system's configuration is touched. Everything is taken down on
exit, and namespaces a killed test run left behind are removed the next time.

Needs root (namespaces), iproute2, openssh-server and pdsh (Debian packages; .ci/run installs them).
"""
from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

SUBNET = "10.231.0"
IFNAME = "gkn0"
PREFIX = "geokd"
PACKAGES = {"ip": "iproute2", "sshd": "openssh-server", "ssh": "openssh-client", "ssh-keygen": "openssh-client",
            "pdsh": "pdsh"}


class Unavailable(RuntimeError):
    """This machine cannot create network namespaces (not root, or no permission): the tests skip."""


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=check)


def missing_packages() -> list[str]:
    found = {name: shutil.which(name) or (Path("/usr/sbin") / name).exists() for name in PACKAGES}
    return sorted({PACKAGES[n] for n, ok in found.items() if not ok})


def can_run_here() -> bool:
    """True where the two-host tests run (root, the packages, working namespaces): local multi-rank twins of them
    can stand down, their property is shown across real hosts."""
    return os.geteuid() == 0 and not missing_packages() and _run("ip", "netns", "list", check=False).returncode == 0


def _remove_leftovers() -> None:
    """Namespaces of earlier test runs whose process is gone (a SIGKILLed pytest cannot clean up)."""
    listing = _run("ip", "netns", "list", check=False).stdout.split()
    for name in listing:
        if name.startswith(PREFIX) and "h" in name:
            pid = name[len(PREFIX):].split("h")[0]
            if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                _delete_namespace(name)


def _delete_namespace(name: str) -> None:
    pids = _run("ip", "netns", "pids", name, check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    _run("ip", "netns", "del", name, check=False)


@dataclass
class TwoHosts:
    workdir: Path  # keys, ssh config, the wrapper, the hostfile
    namespaces: tuple[str, str]
    addrs: tuple[str, str] = (f"{SUBNET}.1", f"{SUBNET}.2")
    _port: list[int] = field(default_factory=lambda: [29500])

    @property
    def hostfile(self) -> Path:
        return self.workdir / "hostfile"

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """`base` (default: this process's environment) with the ssh wrapper first on PATH."""
        base = dict(os.environ if base is None else base)
        return {**base, "PATH": f"{self.workdir / 'bin'}:{base.get('PATH', os.defpath)}"}

    def on(self, host: int, *cmd: str, cwd: Path | None = None, env: dict[str, str] | None = None,
           timeout: float = 600) -> subprocess.CompletedProcess:
        """Run `cmd` on host 0 or 1 (inside its namespace)."""
        return subprocess.run(["ip", "netns", "exec", self.namespaces[host], *cmd], cwd=cwd, env=env or self.env(),
                              capture_output=True, text=True, timeout=timeout)

    def deepspeed(self, args: list[str], cwd: Path, env: dict[str, str] | None = None,
                  timeout: float = 600) -> subprocess.CompletedProcess:
        """`deepspeed --hostfile HOSTFILE --master_addr HOST1 ...ARGS` launched from host 1 in `cwd`; the ranks run
        on both hosts over ssh (pdsh, DeepSpeed's default multi-node runner). A fresh port each call, so no
        launch waits on the last one's sockets."""
        self._port[0] += 1
        launcher = str(Path(sys.executable).with_name("deepspeed"))
        return self.on(0, launcher, "--hostfile", str(self.hostfile), "--master_addr", self.addrs[0],
                       "--master_port", str(self._port[0]), *args, cwd=cwd, env=env, timeout=timeout)


def _write_ssh_files(work: Path) -> None:
    for name in ("id_ed25519", "host_ed25519"):
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "geokd-test", "-f", str(work / name))
    shutil.copy(work / "id_ed25519.pub", work / "authorized_keys")
    os.chmod(work / "authorized_keys", 0o600)
    (work / "ssh_config").write_text(
        "Host *\n"
        f"  IdentityFile {work / 'id_ed25519'}\n  IdentitiesOnly yes\n  BatchMode yes\n"
        "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n  ConnectTimeout 10\n")
    (work / "bin").mkdir()
    wrapper = work / "bin" / "ssh"
    ssh, config = shlex.quote(shutil.which("ssh") or "ssh"), shlex.quote(str(work / "ssh_config"))
    wrapper.write_text(f"#!/bin/sh\nexec {ssh} -F {config} \"$@\"\n")
    wrapper.chmod(0o755)


def _start_sshd(work: Path, namespace: str, addr: str, i: int) -> None:
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    _run("ip", "netns", "exec", namespace, sshd, "-f", "/dev/null", "-o", f"ListenAddress={addr}", "-o", "Port=22",
         "-o", f"HostKey={work / 'host_ed25519'}", "-o", f"AuthorizedKeysFile={work / 'authorized_keys'}",
         "-o", f"PidFile={work / f'sshd{i}.pid'}", "-o", "PermitRootLogin=prohibit-password", "-o", "UsePAM=no",
         "-o", "StrictModes=no", "-o", "PasswordAuthentication=no", "-o", "MaxStartups=100")


def _wait_for_ssh(hosts: TwoHosts) -> None:
    deadline = time.monotonic() + 30
    for addr in hosts.addrs:
        while True:
            r = hosts.on(0, "ssh", addr, "true", timeout=30)
            if r.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"ssh to {addr} never answered: {r.stderr.strip()}")
            time.sleep(0.2)


@contextlib.contextmanager
def two_hosts(workdir: Path) -> Iterator[TwoHosts]:
    """Bring up the two hosts; take them down (daemons, every process inside, the namespaces) however the body
    ends. Raises Unavailable when namespaces cannot be created here."""
    missing = missing_packages()
    if missing:
        raise RuntimeError(f"the two-host harness needs {', '.join(missing)}: apt-get install -y {' '.join(missing)} "
                           f"(.ci/run does this)")
    if os.geteuid() != 0:
        raise Unavailable("network namespaces need root (CI runs as root); the two-host tests cannot run here")
    _remove_leftovers()
    names = (f"{PREFIX}{os.getpid()}h1", f"{PREFIX}{os.getpid()}h2")
    probe = _run("ip", "netns", "add", names[0], check=False)
    if probe.returncode != 0:
        raise Unavailable(f"`ip netns add` failed here ({probe.stderr.strip()}); the two-host tests cannot run")
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    hosts = TwoHosts(workdir=work, namespaces=names)
    try:
        _run("ip", "netns", "add", names[1])
        veth = (f"gk{os.getpid() % 100000}a", f"gk{os.getpid() % 100000}b")
        _run("ip", "link", "add", veth[0], "type", "veth", "peer", "name", veth[1])
        for ns, dev, addr in zip(names, veth, hosts.addrs):
            _run("ip", "link", "set", dev, "netns", ns)
            _run("ip", "-n", ns, "link", "set", dev, "name", IFNAME)
            _run("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", IFNAME)
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            _run("ip", "-n", ns, "link", "set", IFNAME, "up")
        _write_ssh_files(work)
        for i, (ns, addr) in enumerate(zip(names, hosts.addrs), start=1):
            _start_sshd(work, ns, addr, i)
        hosts.hostfile.write_text("".join(f"{a} slots=1\n" for a in hosts.addrs))
        _wait_for_ssh(hosts)
        yield hosts
    finally:
        for ns in names:
            _delete_namespace(ns)  # sshd and anything a test left running inside die with it
