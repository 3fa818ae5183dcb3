"""The project's local Slurm cluster (``slurm/local-cluster``) as the tests use it: every node a
host of its own (network, UTS and mount namespaces) on a bridge, one slurmctld and munged on the
login node ``head``; Debian's Slurm from ``install.sh --with-slurm``. Nodes advertise 64 CPUs and
8 GPUs by default (count only, no devices) so that a production script's requests are accepted by
``sbatch --test-only``; the jobs that run here use CPU tasks only.

Client commands (``sbatch``, ``scontrol``, ...) run on the login node through the cluster's
``bin/`` wrappers: ``env`` puts them first on PATH.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import pytest

from tests.conftest import REPO

TOOL = REPO / "slurm" / "local-cluster"


def _load_tool():
    """slurm/local-cluster is a script (no .py: users run it by name); imported as a module."""
    loader = importlib.machinery.SourceFileLoader("llada_local_cluster", str(TOOL))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


tool = _load_tool()


def why_not_available() -> Optional[str]:
    return tool.why_not_available()


PREFIX = "lt"  # the tests' clusters: lt<pid of the pytest>-<nodes>n-*, apart from a user's


def remove_stale_clusters() -> None:
    """The namespaces (and every process in them) of test clusters whose pytest died before
    its teardown (killed, timed out): their directories may be gone with pytest's tmp dirs."""
    stale = {}
    for ns in tool._netns_names():
        m = re.match(rf"{PREFIX}(\d+)-", ns)
        if m and not tool._alive(int(m.group(1))):
            stale.setdefault(m.group(1), []).append(ns)
    for namespaces in stale.values():
        tool.remove(namespaces, [])


class SlurmCluster(tool.Cluster):
    """The tool's cluster, with what the tests ask of it besides: client commands and job
    states as Python values, draining a node."""

    def __init__(self, root: Path, nodes: int = 1, cpus: int = 64, gpus: int = 8):
        super().__init__(root / "cluster")
        # one cluster per test module at a time; the pid names the pytest that owns it
        self.spec = dict(name=f"{PREFIX}{os.getpid()}-{nodes}n", nodes=nodes, cpus=cpus,
                         gpus=gpus, memory_mb=20000)

    def start(self) -> "SlurmCluster":
        remove_stale_clusters()
        self.up(**self.spec)
        return self

    def stop(self) -> None:
        self.down()

    def run(self, *args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        """A client command (sbatch, scontrol, ...) from this machine, as a user's shell
        would run it after ``local-cluster env``."""
        proc = subprocess.run(list(args), env=kw.pop("env", {**os.environ, **self.env()}),
                              capture_output=True, text=True, timeout=kw.pop("timeout", 60), **kw)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)}: exit {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def job(self, job_id: str) -> Dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self.run("scontrol", "-o", "show", "job", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def drain(self, node: str) -> None:
        """Out of service (as an operator would take it), until ``restore``."""
        self.run("scontrol", "update", f"NodeName={node}", "State=DRAIN", "Reason=test")


def job_ranks(run_dir: Path, pids: Optional[Iterable[int]] = None) -> Dict[int, int]:
    """The ranks of run_dir's job as {pid: SLURM_PROCID}: the `llada train` processes that
    Slurm's step daemon started (not their DataLoader workers), among ``pids`` (default: every
    process of the machine)."""
    if pids is None:
        pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
    found = {}
    for pid in pids:
        proc = Path(f"/proc/{pid}")
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            if "-m framework train" not in cmd or f"run.dir={run_dir}" not in cmd:
                continue
            env = (proc / "environ").read_bytes().split(b"\0")
            ppid = (proc / "stat").read_text().rsplit(")", 1)[1].split()[1]
            parent = Path(f"/proc/{ppid}/comm").read_text().strip()
        except (OSError, IndexError):
            continue  # gone meanwhile, or not ours to read
        rank = next((e.split(b"=", 1)[1] for e in env if e.startswith(b"SLURM_PROCID=")), None)
        if parent == "slurmstepd" and rank is not None:
            found[pid] = int(rank)
    return found


# ---------------------------------------------------------------------- jobs of the tests
def submit(capsys, run_dir: Path, dataset: Path, steps: int, *extra: str, nodes: str = "1",
           tasks_per_node: int = 2) -> str:
    """``llada slurm submit`` of the debug recipe's quick variant (CPU tasks); the job id."""
    from framework.launch.cli import main
    from tests.conftest import DEBUG_RECIPE, quick_overrides

    code = main(["slurm", "submit", str(DEBUG_RECIPE), "--nodes", nodes, "--gpus-per-node", "0",
                 "--tasks-per-node", str(tasks_per_node), "--time", "20:00",
                 "--signal-minutes", "1", *quick_overrides(run_dir, dataset, steps),
                 "tracking.log_interval=1", *extra])
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out.split("submitted job ")[1].split()[0]


def job_log(run_dir: Path, job: str) -> str:
    path = run_dir / "slurm" / f"debug-cpu-{job}.out"
    return path.read_text(errors="replace") if path.exists() else "(no job log yet)"


def wait_for(cluster: SlurmCluster, run_dir: Path, job: str, what: str, ready,
             timeout: float = 240.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = ready()
        if value:
            return value
        time.sleep(0.3)
    pytest.fail(f"job {job}: timed out waiting for {what}; state {cluster.job(job)}\n"
                f"--- job log\n{job_log(run_dir, job)[-6000:]}\n{cluster.logs(tail=4000)}")


def release_when_requeued(cluster: SlurmCluster, run_dir: Path, job: str, restarts: int,
                          idle: List[str] = ()) -> None:
    """Once the job is pending its next start, and the ``idle`` nodes are (a node that was cut
    off may still be finishing the old start), let it start."""
    wait_for(cluster, run_dir, job, f"requeue number {restarts}",
             lambda: (lambda j: j["JobState"] == "PENDING" and j["Restarts"] == str(restarts))(
                 cluster.job(job)))
    wait_for(cluster, run_dir, job, f"{', '.join(idle)} idle",
             lambda: all(cluster.node_states().get(n) == "idle" for n in idle))
    # not `now`: slurmd refuses a start in the same second its last one was revoked (the reason
    # for Slurm's own delay), which fails the job with "Job credential revoked"
    cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now+2")


def wait_until_done(cluster: SlurmCluster, run_dir: Path, job: str) -> Dict[str, str]:
    wait_for(cluster, run_dir, job, "the job to end",
             lambda: cluster.job(job)["JobState"] in ("COMPLETED", "FAILED", "CANCELLED"))
    return cluster.job(job)


def logged_steps(run_dir: Path) -> List[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line]
