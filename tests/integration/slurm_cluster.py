"""A real single-node Slurm cluster on loopback, for tests: its own munge key and socket, its own
slurm.conf, state and logs under one directory, daemons in the foreground of processes we own and
stop by pid. Nothing is installed here: the packages (slurmctld, slurmd, slurm-client, munge) come
from the system (`install.sh --with-slurm`); the system's own munge and Slurm are left alone.

The node advertises 64 CPUs and 8 GPUs (``SlurmdParameters=config_overrides``; the GPUs are count
only, no devices) so that a production script's requests (8 tasks x 8 GPUs per node) are accepted
by ``sbatch --test-only``; jobs that run here use CPU tasks only.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Optional

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "scancel", "squeue", "sinfo")


def missing_binaries() -> List[str]:
    return [b for b in DAEMONS + CLIENTS
            if shutil.which(b) is None and not Path(f"/usr/sbin/{b}").exists()]


def why_not_available() -> Optional[str]:
    """The reason a cluster cannot be started on this machine, or None."""
    missing = missing_binaries()
    if missing:
        return (f"Slurm/munge not installed ({', '.join(missing)} missing): "
                f"run `bash install.sh --with-slurm` as root")
    if os.geteuid() != 0:
        return "slurmd must run as root to launch jobs; run the tests as root"
    return None


def _binary(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    def __init__(self, root: Path, cpus: int = 64, gpus: int = 8):
        self.root = root
        self.host = socket.gethostname().split(".")[0]
        self.cpus, self.gpus = cpus, gpus
        self.conf = root / "slurm.conf"
        self.procs: Dict[str, subprocess.Popen] = {}

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 60.0) -> "SlurmCluster":
        for d in ("state", "spool", "log", "run"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)  # munged refuses keys in group/world-writable directories
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        self._write_config()
        self._spawn("munged", [_binary("munged"), "--foreground", "--force",
                               f"--key-file={key}", f"--socket={self.munge_socket}",
                               f"--pid-file={self.root / 'run/munged.pid'}",
                               f"--log-file={self.root / 'log/munged.log'}",
                               f"--seed-file={self.root / 'state/munged.seed'}"])
        self._wait(lambda: self.munge_socket.exists(), timeout, "munged's socket")
        self._spawn("slurmctld", [_binary("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._spawn("slurmd", [_binary("slurmd"), "-D", "-f", str(self.conf)])
        self._wait(self._node_idle, timeout, "the node to be idle")
        return self

    def stop(self) -> None:
        for name in reversed(list(self.procs)):
            proc = self.procs[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs.clear()

    @property
    def munge_socket(self) -> Path:
        return self.root / "run" / "munge.socket"

    @property
    def env(self) -> Dict[str, str]:
        """The environment of a client command (sbatch, scontrol, ...) talking to this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(args), env=kw.pop("env", self.env), capture_output=True,
                              text=True, timeout=kw.pop("timeout", 60), **kw)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)}: exit {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def job(self, job_id: str) -> Dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self.run("scontrol", "-o", "show", "job", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}"
                         for p in sorted((self.root / "log").glob("*.log")))

    # ------------------------------------------------------------------ internals
    def _spawn(self, name: str, argv: List[str]) -> None:
        out = open(self.root / "log" / f"{name}.stdout", "w")
        self.procs[name] = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                            env=self.env, start_new_session=True)

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode} while waiting for "
                                       f"{what}:\n{self.logs()}")
            if ready():
                return
            time.sleep(0.2)
        raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}:\n{self.logs()}")

    def _node_idle(self) -> bool:
        proc = self.run("sinfo", "-h", "-N", "-o", "%t", check=False, timeout=10)
        return proc.returncode == 0 and proc.stdout.strip() == "idle"

    def _write_config(self) -> None:
        r = self.root
        self.conf.write_text("\n".join([
            "ClusterName=llada-test",
            f"SlurmctldHost={self.host}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "MpiDefault=none",
            "ReturnToService=2",
            "SlurmdParameters=config_overrides",
            "GresTypes=gpu",
            "MinJobAge=3600",
            "KillWait=10",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'run/slurmctld.pid'}",
            f"SlurmdPidFile={r / 'run/slurmd.pid'}",
            f"SlurmctldLogFile={r / 'log/slurmctld.log'}",
            f"SlurmdLogFile={r / 'log/slurmd.log'}",
            f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory=20000 "
            f"Gres=gpu:{self.gpus} State=UNKNOWN",
            f"PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP",
            "",
        ]))
        # GPUs by count only: empty files stand for the device nodes slurmd would otherwise find
        (r / "dev").mkdir(exist_ok=True)
        for i in range(self.gpus):
            (r / "dev" / f"gpu{i}").touch()
        (r / "gres.conf").write_text(
            f"NodeName={self.host} Name=gpu File={r / 'dev'}/gpu[0-{self.gpus - 1}]\n")
