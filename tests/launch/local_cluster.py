#!/usr/bin/env python
"""Throwaway clusters on this machine, for the launcher tests and for trying launchers by hand.

    python tests/launch/local_cluster.py sshd  /tmp/cluster   # two "nodes" over ssh on loopback
    python tests/launch/local_cluster.py slurm /tmp/cluster   # a one-node Slurm (ctld + slurmd)

Each prints the environment to use and runs until Ctrl-C. Everything (keys, configs, state,
logs, pid files) lives in the given directory; the daemons listen on free loopback ports.

* ``Sshd``: an OpenSSH server on 127.0.0.1 and 127.0.0.2 (the whole 127/8 is loopback on
  Linux) with its own host key, a client key in ``authorized_keys``, and an ssh client config
  in which the node names (``node-a``, ``node-b``) point at those addresses. A ``bin/ssh``
  wrapper adds ``-F <config>``: with ``bin`` first in ``PATH`` both DeepSpeed's ssh check and
  pdsh's ssh module reach the nodes without touching ``~/.ssh``. Needs root (sshd's privilege
  separation) and Debian's openssh-server, openssh-client, pdsh.
* ``Slurm``: slurmctld and slurmd from Debian's slurm-wlm (slurmctld, slurmd, slurm-client)
  with ``auth/none`` (no munge), one node named after this host with all its CPUs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

SSH_TOOLS = ("sshd", "ssh", "ssh-keygen", "pdsh")
SLURM_TOOLS = ("slurmctld", "slurmd", "srun", "salloc", "sinfo")
MPI_TOOLS = ("mpirun", "ompi_info")


def which(tool: str) -> str | None:
    return shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")  # sshd, slurmd


def missing(tools: tuple[str, ...]) -> list[str]:
    return [t for t in tools if which(t) is None]


def free_port(*hosts: str) -> int:
    """A TCP port free on every one of ``hosts``."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind((hosts[0] if hosts else "127.0.0.1", 0))
            port = s.getsockname()[1]
        ok = True
        for host in hosts[1:]:
            with socket.socket() as s:
                try:
                    s.bind((host, port))
                except OSError:
                    ok = False
        if ok:
            return port
    raise RuntimeError("no free port")


def wait_until(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None,
               log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.2)
    detail = log.read_text()[-3000:] if log is not None and log.is_file() else ""
    raise RuntimeError(f"{what} did not come up within {timeout:.0f} s\n{detail}")


def _stop(proc: subprocess.Popen | None, timeout: float = 10) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


class Sshd:
    """An sshd on loopback for ``nodes`` (name -> loopback address)."""

    def __init__(self, root: Path, nodes: dict[str, str] | None = None) -> None:
        self.root = Path(root)
        self.nodes = nodes or {"node-a": "127.0.0.1", "node-b": "127.0.0.2"}
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.bin = self.root / "bin"
        self.config = self.root / "ssh_config"

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        env["PATH"] = f"{self.bin}:{env.get('PATH', '/usr/bin:/bin')}"
        return env

    def start(self, timeout: float = 60) -> Sshd:
        r = self.root
        r.mkdir(parents=True, exist_ok=True)
        keygen = which("ssh-keygen")
        for name in ("host_key", "id_ed25519"):
            if not (r / name).exists():
                subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-f", str(r / name)],
                               check=True)
        (r / "authorized_keys").write_text((r / "id_ed25519.pub").read_text())
        os.chmod(r / "authorized_keys", 0o600)
        addresses = sorted(set(self.nodes.values()))
        self.port = free_port(*addresses)
        listen = "".join(f"ListenAddress {a}:{self.port}\n" for a in addresses)
        (r / "sshd_config").write_text(
            f"{listen}HostKey {r / 'host_key'}\nPidFile {r / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {r / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
            "PubkeyAuthentication yes\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPrintMotd no\n"
            "PrintLastLog no\nUseDNS no\nMaxStartups 100\nMaxSessions 100\nLogLevel ERROR\n")
        hosts = "".join(f"Host {name}\n  HostName {addr}\n" for name, addr in self.nodes.items())
        self.config.write_text(
            f"{hosts}Host *\n  Port {self.port}\n  User {_user()}\n"
            f"  IdentityFile {r / 'id_ed25519'}\n  IdentitiesOnly yes\n"
            "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n"
            "  BatchMode yes\n  ConnectTimeout 20\n  ServerAliveInterval 10\n")
        self.bin.mkdir(exist_ok=True)
        wrapper = self.bin / "ssh"
        wrapper.write_text(f'#!/bin/sh\nexec {which("ssh")} -F {self.config} "$@"\n')
        wrapper.chmod(0o755)
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # privilege separation dir
        log = r / "sshd.log"
        self.proc = subprocess.Popen([which("sshd"), "-D", "-e", "-f", str(r / "sshd_config")],
                                     stdout=open(log, "w"), stderr=subprocess.STDOUT,  # noqa: SIM115
                                     start_new_session=True)
        first = next(iter(self.nodes))
        wait_until(lambda: self.run(first, "true").returncode == 0, timeout, "sshd", self.proc,
                   log)
        return self

    def run(self, node: str, command: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.bin / "ssh"), node, command], capture_output=True,
                              text=True, env=self.env(), timeout=60)

    def stop(self) -> None:
        _stop(self.proc)

    def __enter__(self) -> Sshd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _user() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


class Slurm:
    """A one-node Slurm: slurmctld + slurmd in the foreground, state and logs under root."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.node = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.procs: list[subprocess.Popen] = []

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        return env

    def start(self, timeout: float = 60) -> Slurm:
        r = self.root
        for d in ("state", "spool", "log"):
            (r / d).mkdir(parents=True, exist_ok=True)
        user = _user()
        ctld_port, slurmd_port = free_port("127.0.0.1"), free_port("127.0.0.1")
        while slurmd_port == ctld_port:
            slurmd_port = free_port("127.0.0.1")
        self.conf.write_text(f"""ClusterName=launchtest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/none
CredType=cred/none
SlurmUser={user}
SlurmdUser={user}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
KillWait=5
InactiveLimit=0
MinJobAge=5
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={os.cpu_count() or 1} State=UNKNOWN
PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE
""")
        env = self.env()
        for daemon in ("slurmctld", "slurmd"):
            log = open(r / "log" / f"{daemon}.out", "w")  # noqa: SIM115
            cmd = [which(daemon), "-D", "-f", str(self.conf)]
            if daemon == "slurmd":
                cmd += ["-N", self.node]
            self.procs.append(subprocess.Popen(cmd, env=env, stdout=log,
                                               stderr=subprocess.STDOUT,
                                               start_new_session=True))

        def idle() -> bool:
            out = subprocess.run([which("sinfo"), "-h", "-o", "%t"], env=env,
                                 capture_output=True, text=True, timeout=30)
            return out.returncode == 0 and "idle" in out.stdout

        try:
            wait_until(idle, timeout, "slurm", None, r / "log" / "slurmctld.log")
        except RuntimeError:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for proc in reversed(self.procs):
            _stop(proc)

    def __enter__(self) -> Slurm:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("sshd", "slurm"):
        print(__doc__)
        return 2
    root = Path(argv[1]).resolve()
    cluster = Sshd(root) if argv[0] == "sshd" else Slurm(root)
    with cluster:
        if isinstance(cluster, Sshd):
            print(f"sshd on port {cluster.port}; nodes {', '.join(cluster.nodes)}")
            print(f"export PATH={cluster.bin}:$PATH")
        else:
            print(f"slurm node {cluster.node}")
            print(f"export SLURM_CONF={cluster.conf}")
        print("Ctrl-C stops it", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
