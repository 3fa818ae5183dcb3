"""Jobs across hosts on a 3-node slurm/local-cluster (each node its own network namespace, host
name and address on a bridge): ranks find each other across hosts (gloo over eth0), a stop
signal checkpoints on both nodes and resumes, a lost node ends the job's other ranks and the job
resumes on the nodes left (the same number, or, with a node range, fewer: half the data-parallel
ranks and twice the accumulation), a cut link ends both sides by their watchdogs. Every job
gives the losses of one uninterrupted run on one host (1e-5, fp32), each step once in
metrics.jsonl and in one MLflow run (a server on the login node).

The cluster, the MLflow server and the one-host run start together, once for the module."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

from framework.checkpoint.checkpointer import complete_checkpoints
from framework.checkpoint.files import tag_for
from framework.training.watchdog import EXIT_HUNG
from tests.conftest import DEBUG_RECIPE, REPO, cli_command, quick_overrides, tracking_overrides
from tests.integration.mlflow_server import MlflowServer
from tests.integration.slurm_cluster import (PREFIX, SlurmCluster, job_log, job_ranks,
                                             logged_steps, release_when_requeued, submit, tool, wait_for,
                                             wait_until_done, why_not_available)

pytestmark = pytest.mark.slow

STEPS, INTERVAL = 16, 3
# 4 ranks of 4 samples: 16 = 4 x 1 x 4 data-parallel on two nodes, 4 x 2 x 2 on one
COMMON = ["train.micro_batch_size=4", "data.num_workers=1", f"checkpoint.interval={INTERVAL}"]
HANG_S = 12  # the watchdog's limit for a step (steps take under a second); a start's first
# step and a save: 60 s
WATCHDOG = [f"train.hang_timeout_minutes={HANG_S / 60}", "train.hang_floor_minutes=1"]


@pytest.fixture(scope="module")
def site(tmp_path_factory, small_dataset):
    """The 3-node cluster, an MLflow server on its login node, and the one-host reference run
    (4 ranks under torchrun on this machine), started together."""
    why = why_not_available()
    if why is not None:
        if os.environ.get("LLADA_REQUIRE_SLURM"):  # CI: never skip
            pytest.fail(f"LLADA_REQUIRE_SLURM is set but {why}")
        pytest.skip(why)
    root = tmp_path_factory.mktemp("multinode")
    ref_dir = root / "one-host"
    cmd, env = cli_command(["train", str(DEBUG_RECIPE), *quick_overrides(ref_dir, small_dataset,
                                                                        STEPS),
                            *COMMON, "tracking.log_interval=1"], nproc=4)
    with open(root / "one-host.err", "w") as err:
        reference = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                     stderr=err, start_new_session=True)
    cluster = SlurmCluster(root, nodes=3, cpus=8, gpus=0)
    server = None
    try:
        cluster.start()
        server = MlflowServer(root / "mlflow", host=tool.HEAD,
                              on=lambda argv: cluster.on(tool.HEAD, argv))
        server.launch()
        yield {"cluster": cluster, "mlflow": server, "reference": (reference, ref_dir, root)}
    finally:
        if reference.poll() is None:  # torchrun and its 4 ranks
            os.killpg(reference.pid, signal.SIGKILL)
            reference.wait()
        if server is not None:
            server.stop()
        cluster.stop()


@pytest.fixture
def env(site, monkeypatch):
    """What `llada slurm submit` and the job see: this cluster, gloo on the nodes' bridge
    interface, one thread per rank."""
    cluster = site["cluster"]
    for key, value in cluster.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", tool.IFACE)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield site
    # a test that failed must not leave its job to the next one's nodes
    cluster.run("scancel", "--user=root", check=False)


def one_host_losses(site) -> Dict[int, float]:
    proc, run_dir, root = site["reference"]
    assert proc.wait(600) == 0, (root / "one-host.err").read_text()[-4000:]
    return losses(run_dir)


def losses(run_dir: Path) -> Dict[int, float]:
    return {r["step"]: r["train/loss"] for r in
            map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def only_up(cluster: SlurmCluster, nodes: List[str]) -> None:
    """These nodes idle, the others drained: the cluster as a test wants it."""
    for node in cluster.nodes:
        cluster.restore(node) if node in nodes else cluster.drain(node)


def hosts_of_lines(log: str) -> List[str]:
    """Each start's `ranks by host` line (``node1 0-1, node2 2-3``)."""
    return re.findall(r"llada: ranks by host: (.*?) \(rendezvous", log)


def hosts_of_start(log: str, start: int) -> List[str]:
    """The hosts of a start, in rank order."""
    hosts = []
    for part in hosts_of_lines(log)[start - 1].split(", "):
        host, ranks = part.split()
        for span in ranks.split(","):
            a, _, b = span.partition("-")
            hosts += [host] * (int(b or a) - int(a) + 1)
    return hosts


def tracking(site, experiment: str) -> List[str]:
    site["mlflow"].wait()
    return tracking_overrides(site["mlflow"], experiment)


def check_one_history(site, run_dir: Path, experiment: str, reference: Dict[int, float]) -> None:
    """Every step once in metrics.jsonl and in the run's one MLflow run; the losses of the
    one-host run."""
    assert logged_steps(run_dir) == list(range(1, STEPS + 1))
    mine = losses(run_dir)
    for step, loss in reference.items():
        assert abs(mine[step] - loss) <= 1e-5 * abs(loss), f"step {step}: {mine[step]} vs {loss}"
    client = site["mlflow"].client()
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1
    history = client.get_metric_history(runs[0].info.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, STEPS + 1))
    for m in history:
        assert abs(m.value - mine[m.step]) <= 1e-6 * abs(mine[m.step])


def resumes(log: str) -> List[Tuple[str, int]]:
    """(checkpoint, step) of each start that resumed."""
    return [(path, int(step)) for path, step in re.findall(r"resumed from (\S+) at step (\d+)",
                                                           log)]


def newest_checkpoint(run_dir: Path) -> int:
    steps = [s for s, _ in complete_checkpoints(run_dir / "checkpoints", lambda _: None)]
    return max(steps, default=0)


def test_two_node_job_stops_and_resumes_then_loses_a_node_and_finishes_on_two_others(
        env, capsys, tmp_path, small_dataset):
    cluster = env["cluster"]
    only_up(cluster, cluster.nodes)
    job = submit(capsys, tmp_path, small_dataset, STEPS, *COMMON, *tracking(env, "two-nodes"),
                 nodes="2")
    log = lambda: job_log(tmp_path, job)  # noqa: E731
    # start 1: 4 ranks, 2 per host; a stop signal checkpoints on both and requeues
    wait_for(cluster, tmp_path, job, "2 logged steps", lambda: len(logged_steps(tmp_path)) >= 2)
    first = hosts_of_start(log(), 1)
    assert len(set(first)) == 2 and first[0] == first[1] and first[2] == first[3], first
    cluster.run("scancel", "--signal=USR1", "--batch", job)
    release_when_requeued(cluster, tmp_path, job, restarts=1)
    # start 2: past a checkpoint of its own, its first host fails: rank 0, the rendezvous and
    # the batch script go with it
    stop = int(log().split("llada: stopping after step ")[1].split("/")[0])
    wait_for(cluster, tmp_path, job, "a checkpoint after the stop",
             lambda: newest_checkpoint(tmp_path) > stop and len(hosts_of_lines(log())) >= 2)
    second = hosts_of_start(log(), 2)
    lost = second[0]
    assert cluster.job(job)["JobState"] == "RUNNING"
    cluster.lose(lost)
    newest = newest_checkpoint(tmp_path)  # rank 0 publishes checkpoints: it is gone
    release_when_requeued(cluster, tmp_path, job, restarts=2)
    state = wait_until_done(cluster, tmp_path, job)
    text = log()
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "2", (state, text[-5000:])
    third = hosts_of_start(text, 3)
    assert lost not in third and len(set(third)) == 2, third
    assert f"(rendezvous at {third[0]}:" in text.split(f"job {job}, start 3")[1]  # new master
    resumed = resumes(text)
    assert len(resumed) == 2 and resumed[0][1] == stop
    assert resumed[1] == (str(tmp_path / "checkpoints" / tag_for(newest)), newest)
    assert newest > stop
    check_one_history(env, tmp_path, "two-nodes", one_host_losses(env))
    cluster.restore(lost)



def test_node_range_rides_out_a_cut_link_then_shrinks_to_the_node_left(env, capsys, tmp_path,
                                                                      small_dataset):
    cluster = env["cluster"]
    a, b = cluster.nodes[:2]
    only_up(cluster, [a, b])  # a 2-node cluster
    job = submit(capsys, tmp_path, small_dataset, STEPS, *COMMON, *WATCHDOG,
                 *tracking(env, "node-range"), nodes="1-2")
    log = lambda: job_log(tmp_path, job)  # noqa: E731
    # start 1 on both nodes; past its first checkpoint, b's link is cut: neither side hears from
    # the other, so every rank's watchdog ends it (exit 4, its stacks printed)
    wait_for(cluster, tmp_path, job, "a checkpoint and a step after it",
             lambda: newest_checkpoint(tmp_path) >= INTERVAL
             and len(logged_steps(tmp_path)) > INTERVAL)
    assert sorted(set(hosts_of_start(log(), 1))) == [a, b]
    cut = time.monotonic()
    cluster.cut(b)
    wait_for(cluster, tmp_path, job, "every rank on both nodes to end",
             lambda: not ranks(cluster, a, tmp_path) and not ranks(cluster, b, tmp_path), 120)
    ended = time.monotonic() - cut
    cluster.mend(b)  # the job's last words on b reach srun; the script requeues it
    release_when_requeued(cluster, tmp_path, job, restarts=1, idle=[a, b])
    # start 2 on both again: past a checkpoint of its own, b is lost before Slurm knows: the
    # ranks on a wait for it in a collective until their watchdogs end them; then b is DOWN,
    # and the range lets the job start again on a alone
    wait_for(cluster, tmp_path, job, "start 2 past a checkpoint of its own",
             lambda: resumes(log()) and newest_checkpoint(tmp_path) > resumes(log())[0][1])
    assert sorted(set(hosts_of_start(log(), 2))) == [a, b]
    assert cluster.job(job)["JobState"] == "RUNNING"
    cluster.lose(b, silently=True)
    wait_for(cluster, tmp_path, job, "the ranks left on a to end", lambda: not ranks(
        cluster, a, tmp_path) and log().count("llada: watchdog: rank 0: no progress") == 2, 120)
    newest = newest_checkpoint(tmp_path)
    cluster.down_node(b)
    release_when_requeued(cluster, tmp_path, job, restarts=2)
    state = wait_until_done(cluster, tmp_path, job)
    text = log()
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "2", (state, text[-5000:])
    for rank in range(4):
        assert f"llada: watchdog: rank {rank}: no progress for" in text
        assert f"[rank {rank}] thread MainThread:" in text
    limit = max(int(x) for x in re.findall(r"no progress for \d+ s in .*?\(limit (\d+) s", text))
    assert ended <= limit + 30, f"the ranks ended {ended:.0f} s after the cut (limit {limit} s)"
    assert f"crashed (exit {EXIT_HUNG}), 1 of at most 3 in a row: requeueing job {job}" in text
    assert "rank 1: no progress" in text.split(f"job {job}, start 2")[1]
    # start 3: half the data-parallel ranks, twice the accumulation, the same run
    assert hosts_of_start(text, 3) == [a, a]
    assert resumes(text)[1] == (str(tmp_path / "checkpoints" / tag_for(newest)), newest)
    assert "global batch 16 = 4 x 2 accumulation x 2 data-parallel" in text
    check_one_history(env, tmp_path, "node-range", one_host_losses(env))
    cluster.restore(b)


def ranks(cluster: SlurmCluster, host: str, run_dir: Path) -> List[int]:
    """The ranks of run_dir on a host."""
    return list(job_ranks(run_dir, cluster.pids(host)))


def test_down_removes_every_namespace_daemon_and_file(tmp_path):
    """`local-cluster up` then `down` through its command line, with a job still running on
    both nodes: nothing of it is left (its namespaces, and with them their links and bridge,
    daemons, the job's processes, files)."""
    if why_not_available():
        pytest.skip(why_not_available())  # the module's other tests fail under CI instead
    ip = tool.binary("ip")
    name, home = f"{PREFIX}{os.getpid()}-down", tmp_path / "cluster"
    cli = [str(REPO / "slurm" / "local-cluster"), "--dir", str(home)]
    up = subprocess.run([*cli, "up", "--nodes", "2", "--name", name], capture_output=True,
                        text=True, timeout=120)
    try:
        assert up.returncode == 0, up.stderr
        state, sleepers = a_job_on_both_nodes(home, name, tmp_path)
        ours = {os.stat(f"/run/netns/{ns}").st_ino for ns in state["namespaces"]}
    finally:
        down = subprocess.run([*cli, "down"], capture_output=True, text=True, timeout=120)
    assert down.returncode == 0, down.stderr
    netns = subprocess.run([ip, "netns", "list"], capture_output=True, text=True).stdout
    assert not [n for n in netns.split() if n.startswith(f"{name}-")]
    for pid in [*state["pids"].values(), *sleepers]:
        assert not tool._alive(pid), pid
    assert not home.exists()
    assert len(ours) == 4 and not ours & net_namespaces()  # none kept alive by a mount
    # `down` again, or of nothing, is a no-op; a command on no cluster is one clear line
    assert subprocess.run([*cli, "down"], capture_output=True).returncode == 0
    status = subprocess.run([*cli, "status"], capture_output=True, text=True)
    assert status.returncode == 2 and "no cluster is up here" in status.stderr


def a_job_on_both_nodes(home: Path, name: str, tmp_path: Path):
    """The cluster's recorded state, and the pids of a job's task on each of its 2 nodes."""
    state = json.loads((home / tool.STATE).read_text())
    netns = subprocess.run([tool.binary("ip"), "netns", "list"], capture_output=True,
                           text=True).stdout
    assert {f"{name}-{h}" for h in ("switch", "head", "node1", "node2")} <= set(netns.split())
    cluster = tool.Cluster(home)
    job = cluster.client("sbatch", "--parsable", "--nodes=2", f"--output={tmp_path}/job.out",
                         "--wrap", "srun sleep 300")
    on_nodes = lambda: [p for n in cluster.nodes for p in cluster.pids(n)  # noqa: E731
                        if tool.is_command(p, "sleep")]
    deadline = time.monotonic() + 60
    while len(on_nodes()) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    sleepers = on_nodes()
    assert len(sleepers) == 2, cluster.client("squeue", "-j", job.strip(), check=False)
    return state, sleepers


def net_namespaces() -> set:
    """Every network namespace on the machine by its inode, named or not (lsns sees those that
    hold a process; /run/netns names the others)."""
    held = subprocess.run(["lsns", "-n", "-t", "net", "-o", "NS"], capture_output=True,
                          text=True).stdout.split()
    named = [os.stat(p).st_ino for p in Path("/run/netns").glob("*")] \
        if Path("/run/netns").is_dir() else []
    return set(map(int, held)) | set(named)
