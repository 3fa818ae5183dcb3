"""The project's own sbatch script on a real Slurm cluster (one node of slurm/local-cluster): a
job stopped by a signal checkpoints, requeues itself and resumes at the right step; a crashing
job is retried, then fails; the 8B recipe's rendered script is one Slurm accepts.

Slurm holds a requeued job for about two minutes before it may start again (its begin time is
set ahead, past the revoked job credential's lifetime); the tests release it two seconds after the
requeue with ``scontrol update StartTime=now+2``, as an operator could, instead of waiting.
"""

from __future__ import annotations

import json
import os
from collections import Counter
import signal
import subprocess
import time
from pathlib import Path

import pytest

from framework.checkpoint.checkpointer import complete_checkpoints
from framework.checkpoint.files import tag_for
from framework.launch.cli import main
from framework.training.faults import ENV as FAULTS
from framework.training.watchdog import EXIT_HUNG
from tests.conftest import REPO, stdlib_glob
from tests.integration.slurm_cluster import (SlurmCluster, job_log, job_ranks, logged_steps,
                                             release_when_requeued, submit, wait_for,
                                             wait_until_done, why_not_available)
from tests.unit.data_helpers import documents_in, packed_stream

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = why_not_available()
    if why is not None:
        if os.environ.get("LLADA_REQUIRE_SLURM"):  # CI installs Slurm: never skip there
            pytest.fail(f"LLADA_REQUIRE_SLURM is set but {why}")
        pytest.skip(why)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def slurm_env(cluster, monkeypatch):
    """What `llada slurm submit` and the job see: this cluster, one thread per rank."""
    for key, value in cluster.env().items():  # SLURM_CONF, and PATH to its clients
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return cluster


def rank_pid(run_dir: Path, rank: int) -> int:
    """The pid of one rank of run_dir's running job (0: none yet)."""
    return next((pid for pid, r in job_ranks(run_dir).items() if r == rank), 0)


def test_signalled_job_checkpoints_requeues_and_resumes(slurm_env, capsys, tmp_path,
                                                        small_dataset):
    cluster, steps = slurm_env, 60
    job = submit(capsys, tmp_path, small_dataset, steps)
    ckpt = tmp_path / "checkpoints"
    # a few steps in, the signal Slurm sends ahead of the time limit (to the batch shell only)
    wait_for(cluster, tmp_path, job, "3 logged steps", lambda: len(logged_steps(tmp_path)) >= 3)
    cluster.run("scancel", "--signal=USR1", "--batch", job)
    release_when_requeued(cluster, tmp_path, job, restarts=1)
    state = wait_until_done(cluster, tmp_path, job)
    log = job_log(tmp_path, job)
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", (state, log[-4000:])
    assert state["Restarts"] == "1"
    # stopped at a step boundary with a checkpoint of that step, then requeued
    assert "USR1 received: every rank finishes its step" in log
    stop = int(log.split("llada: stopping after step ")[1].split("/")[0])
    assert 3 <= stop < steps, "the signal must land mid-run"
    assert f"checkpoint {ckpt / tag_for(stop)}" in log
    assert f"stopped with a checkpoint: requeueing job {job}" in log
    assert stop in [s for s, _ in complete_checkpoints(ckpt, print)]
    # the second start resumed exactly there and finished train.steps; not requeued again
    assert f"job {job}, start 2" in log and log.count("start 1,") == 1  # one appended log
    assert f"resumed from {ckpt / tag_for(stop)} at step {stop}" in log
    assert "finished: train.steps reached; not requeued" in log
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["final_step"] == steps
    assert summary["steps"] == steps - stop and summary["world_size"] == 2
    # one continuous loss history: every step once, none missing, none twice
    assert logged_steps(tmp_path) == list(range(1, steps + 1))


def test_crashing_job_is_retried_then_fails_with_the_error(slurm_env, capsys, tmp_path,
                                                           small_dataset, monkeypatch):
    # a rank dies as soon as it starts (as with its node), at both starts; the other one waits
    # in the rendezvous for it, and srun ends it 5 s after the first one went
    monkeypatch.setenv("LLADA_SRUN_WAIT", "5")
    cluster = slurm_env
    job = submit(capsys, tmp_path, small_dataset, 10, "--max-crash-retries", "1")
    for start in (1, 2):
        wait_for(cluster, tmp_path, job, f"start {start}",
                 lambda: f"start {start}," in job_log(tmp_path, job))
        os.kill(wait_for(cluster, tmp_path, job, "rank 1", lambda: rank_pid(tmp_path, 1)),
                signal.SIGKILL)
        if start == 1:
            release_when_requeued(cluster, tmp_path, job, restarts=1)
    state = wait_until_done(cluster, tmp_path, job)
    log = job_log(tmp_path, job)
    assert state["JobState"] == "FAILED" and state["Restarts"] == "1", (state, log[-4000:])
    rc = int(state["ExitCode"].split(":")[0])
    assert rc not in (0, 2, 3)  # a crash: neither done, nor bad input, nor a clean stop
    assert log.count("task 1: Killed") == 2
    assert f"crashed (exit {rc}), 1 of at most 1 in a row: requeueing job {job}" in log
    assert f"crashed (exit {rc}) 2 times in a row without a new checkpoint: giving up" in log


def test_hung_job_is_requeued_once_and_resumes(slurm_env, capsys, tmp_path, small_dataset,
                                               monkeypatch):
    # rank 1 hangs in step 5 of the first start (an injected fault, handed on by sbatch);
    # both watchdogs end their ranks 6 s later with the crash status; the job is requeued once
    monkeypatch.setenv(FAULTS, "hang=1:5")
    cluster, steps = slurm_env, 8
    job = submit(capsys, tmp_path, small_dataset, steps, "checkpoint.interval=2",
                 f"train.hang_timeout_minutes={6 / 60}")
    release_when_requeued(cluster, tmp_path, job, restarts=1)
    state = wait_until_done(cluster, tmp_path, job)
    log = job_log(tmp_path, job)
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", (state, log[-4000:])
    assert "rank 1 hangs in step 5" in log
    for rank in (0, 1):
        assert f"llada: watchdog: rank {rank}: no progress for" in log
        assert f"[rank {rank}] thread MainThread:" in log
    assert f"crashed (exit {EXIT_HUNG}), 1 of at most 3 in a row: requeueing job {job}" in log
    ckpt = tmp_path / "checkpoints"
    assert f"resumed from {ckpt / tag_for(4)} at step 4" in log
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["final_step"] == steps
    assert logged_steps(tmp_path) == list(range(1, steps + 1))


def test_8b_script_is_accepted_by_sbatch_test_only(slurm_env, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["slurm", "submit", str(REPO / "recipes" / "llada-8b.yaml"), "--nodes", "16",
                 "--gpus-per-node", "8", "--time", "48:00:00", "--dry-run"])
    out = capsys.readouterr()
    assert code == 0, out.err
    script = tmp_path / "llada-8b.sbatch"
    script.write_text(out.out)
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing
    # this cluster has one node (of 64 CPUs and 8 GPUs): the node count aside, Slurm takes it
    accepted = slurm_env.run("sbatch", "--test-only", "--nodes=1", str(script), check=False)
    assert accepted.returncode == 0 and "to start at" in accepted.stderr, accepted.stderr
    refused = slurm_env.run("sbatch", "--test-only", str(script), check=False)
    assert refused.returncode != 0 and "node configuration is not available" in refused.stderr
    # the rendered script is itself clean shell
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


PREPARE = ["--seq-len", "64", "--samples-per-shard", "40", "--vocab-size", "512",
           "--tokenizer-train-bytes", "300000", "--holdout-fraction", "0.1", "--name", "small"]


def prepare_array(cluster: SlurmCluster, capsys, output: Path, *extra: str) -> dict:
    """`llada slurm prepare` of two stdlib packages as 3 parts; waits for the merge."""
    code = main(["slurm", "prepare", stdlib_glob("json"), stdlib_glob("email"), "-o",
                 str(output), "--array", "3", "--time", "10:00", "--cpus-per-task", "1",
                 *PREPARE, *extra])
    out = capsys.readouterr()
    assert code == 0, out.err
    merge = out.out.split("merge ")[1].split()[0].strip(" (,")
    logs = lambda: "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}"  # noqa: E731
                             for p in sorted((output / "slurm").glob("*.out")))
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        state = cluster.job(merge).get("JobState")
        if state == "COMPLETED":
            return json.loads((output / "manifest.json").read_text())
        if state in ("FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY"):
            break
        time.sleep(0.5)
    pytest.fail(f"merge job {merge}: {cluster.job(merge)}\n{logs()}\n{cluster.logs()}")


def part_documents(manifest: Path, eos: int) -> Counter:
    """The documents of each part's sequences in packing order (keys PART-INDEX), together."""
    keys, tokens = packed_stream(manifest)
    seq_len = len(tokens) // len(keys)
    parts = sorted({k.split("-")[0] for k in keys})
    docs: Counter = Counter()
    for part in parts:
        rows = [i for i, k in enumerate(keys) if k.startswith(part + "-")]
        docs.update(documents_in(tokens.reshape(len(keys), seq_len)[rows].reshape(-1), eos))
    return docs


def test_prepare_as_a_slurm_array_of_parts_then_a_merge(slurm_env, capsys, tmp_path):
    from data_pipeline.config import PrepareConfig, TokenizerConfig
    from data_pipeline.prepare import prepare
    from data_pipeline.tokenizer import load_tokenizer

    first = prepare_array(slurm_env, capsys, tmp_path / "a")  # the tokenizer, 3 parts, the merge
    assert first["parts"] == 3 and len({s["file"][:11] for s in first["shards"]}) == 3
    assert sorted(p.name.split("-")[2] for p in (tmp_path / "a" / "slurm").glob("*.sbatch")) \
        == ["merge", "part", "tokenizer"]
    tok = tmp_path / "a" / "tokenizer.model"
    # a one-process prepare of the same inputs with the same tokenizer: the same documents,
    # except at most one cut by each part's end (a part drops its last partial sequence)
    one = prepare(PrepareConfig(inputs=[stdlib_glob("json"), stdlib_glob("email")],
                                output=str(tmp_path / "one"), name="small", seq_len=64,
                                samples_per_shard=40, holdout_fraction=0.1,
                                tokenizer=TokenizerConfig(model=str(tok))), log=lambda _: None)
    eos = load_tokenizer(tok).eos_id
    single = Counter(documents_in(packed_stream(tmp_path / "one" / "manifest.json")[1], eos))
    parts = part_documents(tmp_path / "a" / "manifest.json", eos)
    assert not parts - single and sum((single - parts).values()) <= 2
    assert first["sources"]["documents"] == one["sources"]["documents"]
    assert abs(first["samples"] - one["samples"]) <= 2
    held = json.loads((tmp_path / "a" / "holdout" / "manifest.json").read_text())
    assert held["samples"] == first["holdout"]["samples"] > 0

    # a second array run with that tokenizer given (no tokenizer job): byte-identical shards
    second = prepare_array(slurm_env, capsys, tmp_path / "b", "--tokenizer", str(tok))
    assert len(list((tmp_path / "b" / "slurm").glob("*.sbatch"))) == 2
    assert [(s["file"], s["sha256"]) for s in second["shards"]] == \
        [(s["file"], s["sha256"]) for s in first["shards"]]
    for s in second["shards"]:
        assert (tmp_path / "b" / s["file"]).read_bytes() == \
            (tmp_path / "a" / s["file"]).read_bytes()
