"""Resume through a kill -9, with two data-parallel ranks (gloo) reading the WebDataset shards
through DataLoader workers: 2N steps in one run, and N steps + kill -9 of every process + resume
+ N steps, give bitwise-identical losses and final weights and optimizer state, and one MLflow
run on a real server with every step once (the killed job had logged steps past the checkpoint,
which the resumed job runs again). The SFT objective (its recipe, from scratch on a small SFT
set) resumes through a kill -9 bitwise the same way. Resumes under other layouts and ZeRO
stages: test_elastic_resume.py."""

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import (DEBUG_RECIPE, REPO, SFT_RECIPE, cli_command, quick_overrides,
                            run_cli, tracking_overrides, validation_overrides)

pytestmark = pytest.mark.slow

N = 5


def overrides(run_dir, dataset, heldout):
    # evaluated at the start, at steps 3, 6, 9 and at the end: step 6 runs twice in the killed
    # run (before the kill and after the resume from step 5), and is logged once
    return ["train", str(DEBUG_RECIPE), *quick_overrides(run_dir, dataset, steps=2 * N),
            "tracking.log_interval=1", f"checkpoint.interval={N}", "checkpoint.save_final=true",
            "data.num_workers=1", "objective.variable_length_prob=0.3",
            *validation_overrides(heldout, sequences=9, t_samples=2), "eval.interval=3",
            "eval.at_start=true"]


def descendants(pid: int) -> list:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


def kill_9_past_checkpoint(args, run_dir, tag_dir: Path, logged_steps=None, ready=None,
                           env_extra=None) -> None:
    """Start the run and SIGKILL it, torchrun and every worker and the tracking courier (they run
    in their own sessions), once the checkpoint at step N is complete and step N + 1 logged
    (``logged_steps(run_dir)``: by default the MLflow outbox's), or once ``ready()``."""
    logged_steps = logged_steps or outbox_steps
    ready = ready or (lambda: (tag_dir / "meta.json").exists() and
                      N + 1 in logged_steps(run_dir))
    cmd, env = cli_command(args, nproc=2)
    env.update(env_extra or {})
    with open(run_dir.parent / "killed.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while not ready():
            assert proc.poll() is None, (run_dir.parent / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint at step N, or no step N + 1"
            time.sleep(0.02)
        for pid in [proc.pid, *descendants(proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()


def outbox_steps(run_dir) -> list:
    """The steps in the MLflow outbox (sent or not: the courier may be killed before it sends)."""
    outbox = run_dir / "tracking" / "outbox.jsonl"
    lines = outbox.read_text().splitlines() if outbox.exists() else []
    records = [json.loads(line) for line in lines[:-1]]  # the last one may be half-written
    return [r["step"] for r in records if r.get("stream") == "step"]


def metrics_file_steps(run_dir) -> list:
    """The trained steps in metrics.jsonl (without tracking)."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [r["step"] for r in map(json.loads, lines[:-1]) if "train/loss" in r]


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir):
    return [(r["step"], r["train/loss"], r["train/seq_len"]) for r in records(run_dir)
            if "train/loss" in r]  # not the evaluation at step 0


# the loss is over the steps the line names: here, one (tracking.log_interval=1)
CONSOLE = re.compile(r"^step +(\d+)/\d+ \| loss ([\d.]+|nan) \(step \1[^)]*\) "
                     r"\| lr ([\d.e+-]+) \|", re.M)


def console(*outputs):
    """{step: (loss, lr) as printed}, the first line of each step across the jobs' outputs."""
    seen = {}
    for out in outputs:
        for step, loss, lr in CONSOLE.findall(out):
            seen.setdefault(int(step), (loss, lr))
    return seen


def tensors(obj, path=""):
    if torch.is_tensor(obj):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from tensors(v, f"{path}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from tensors(v, f"{path}[{i}]")


def final_state(run_dir):
    tag = run_dir / "checkpoints" / f"step_{2 * N:08d}"
    state = {}
    for f in sorted(tag.glob("*.pt")):
        obj = torch.load(f, map_location="cpu", weights_only=False)
        keep = {k: obj[k] for k in ("module", "optimizer_state_dict") if k in obj}
        state.update({f"{f.name}{p}": t for p, t in tensors(keep)})
    return state


@pytest.fixture(scope="module")
def whole(tmp_path_factory, small_dataset, small_heldout):
    """2N steps in one run on two data-parallel ranks, checkpoints at N and 2N."""
    run = tmp_path_factory.mktemp("whole")
    proc = run_cli(overrides(run, small_dataset, small_heldout), nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def test_kill_9_and_resume_is_bitwise_identical(tmp_path, small_dataset, small_heldout, whole,
                                                 mlflow_server):
    killed = tmp_path / "killed"
    killed.mkdir()
    args = overrides(killed, small_dataset, small_heldout) + \
        tracking_overrides(mlflow_server, "kill-9") + [
        "tracking.send_interval_s=0.05"]
    kill_9_past_checkpoint(args, killed, killed / "checkpoints" / f"step_{N:08d}")
    assert not (killed / "checkpoints" / f"step_{2 * N:08d}").exists(), \
        "the run finished before it was killed: the test proves nothing"
    proc = run_cli(args, nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {killed / 'checkpoints' / f'step_{N:08d}'} at step {N} (same layout)" \
        in proc.stdout

    reference = losses(whole)
    assert [s for s, _, _ in reference] == list(range(1, 2 * N + 1))
    assert any(length < 64 for _, _, length in reference)  # a 1% cut happened, and was replayed
    assert losses(killed) == reference  # exact floats, every step once

    a, b = final_state(whole), final_state(killed)
    assert a.keys() == b.keys() and len(a) > 10
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]

    # one MLflow run: steps 1..2N each once, the values of the uninterrupted run
    client = mlflow_server.client()
    (run,) = client.search_runs([client.get_experiment_by_name("kill-9").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["resumed_at_step"] == str(N)
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, 2 * N + 1))
    assert {m.step: m.value for m in history} == {s: loss for s, loss, _ in reference}
    saves = client.get_metric_history(run.info.run_id, "checkpoint/save_seconds")
    assert sorted(m.step for m in saves) == [N, 2 * N]
    # each evaluation once, in MLflow as in metrics.jsonl, with the uninterrupted run's values
    evaluated = {r["step"]: r["val/small/loss"] for r in records(whole) if "val/small/loss" in r}
    assert sorted(evaluated) == [0, 3, 6, 9, 2 * N]
    assert {r["step"]: r["val/small/loss"] for r in records(killed)
            if "val/small/loss" in r} == evaluated
    history = client.get_metric_history(run.info.run_id, "val/small/loss")
    assert sorted(m.step for m in history) == sorted(evaluated)
    assert {m.step: m.value for m in history} == evaluated

    # the console (both jobs' lines), metrics.jsonl and MLflow agree on steps and values
    printed = console((killed.parent / "killed.log").read_text(), proc.stdout)
    assert sorted(printed) == list(range(1, 2 * N + 1))
    lr = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/lr")}
    for r in records(killed)[1:]:  # after the evaluation at step 0
        assert printed[r["step"]] == (f"{r['train/loss']:.4f}", f"{r['train/lr']:.3e}"), r
        assert lr[r["step"]] == r["train/lr"]


def test_kill_9_during_a_background_save_resumes_from_the_one_before(tmp_path, small_dataset,
                                                                    small_heldout, whole):
    """checkpoint.async_save: killed while the final checkpoint's files are being written in
    the background (held back there), the run resumes from step N's, complete before it, and
    ends as the uninterrupted synchronous run did, bitwise: async checkpoints hold what the
    synchronous ones do."""
    killed = tmp_path / "killed"
    killed.mkdir()
    args = overrides(killed, small_dataset, small_heldout) + ["checkpoint.async_save=true"]
    last = killed / "checkpoints" / f"step_{2 * N:08d}.tmp"
    seen = []

    def writing_the_last_one():  # its save began 2 s ago: it is in its (held back) background
        if last.exists() and not seen:
            seen.append(time.monotonic())
        return bool(seen) and time.monotonic() - seen[0] > 2.0

    kill_9_past_checkpoint(args, killed, None, ready=writing_the_last_one,
                           env_extra={"LLADA_FAULTS": f"save_delay={2 * N}:120"})
    assert (killed / "checkpoints" / f"step_{N:08d}" / "meta.json").exists()
    assert not (killed / "checkpoints" / f"step_{2 * N:08d}").exists()
    assert (killed / "checkpoints" / "latest").read_text() == f"step_{N:08d}"
    proc = run_cli(args, nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {killed / 'checkpoints' / f'step_{N:08d}'} at step {N}" in proc.stdout
    assert losses(killed) == losses(whole)
    a, b = final_state(whole), final_state(killed)
    assert a.keys() == b.keys() and len(a) > 10
    assert not [k for k in a if not torch.equal(a[k], b[k])]


def sft_overrides(run_dir, dataset):
    # the data in each training process (DataLoader workers and their resume: the test above)
    holdout = dataset.parent / "holdout" / "manifest.json"
    return ["train", str(SFT_RECIPE), *quick_overrides(run_dir, dataset, steps=2 * N),
            "init.from=null", "tracking.log_interval=1", f"checkpoint.interval={N}",
            "checkpoint.save_final=true", "data.num_workers=0",
            *validation_overrides(holdout, sequences=9, t_samples=2), "eval.interval=3",
            "eval.at_start=true"]


def test_sft_kill_9_and_resume_is_bitwise_identical(tmp_path, small_sft_dataset):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    proc = run_cli(sft_overrides(whole, small_sft_dataset), nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    killed.mkdir()
    args = sft_overrides(killed, small_sft_dataset)
    kill_9_past_checkpoint(args, killed, killed / "checkpoints" / f"step_{N:08d}",
                           metrics_file_steps)
    assert not (killed / "checkpoints" / f"step_{2 * N:08d}").exists(), \
        "the run finished before it was killed: the test proves nothing"
    proc = run_cli(args, nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout
    reference = losses(whole)
    assert [s for s, _, _ in reference] == list(range(1, 2 * N + 1))
    assert losses(killed) == reference  # exact floats, every step once
    a, b = final_state(whole), final_state(killed)
    assert a.keys() == b.keys() and len(a) > 10
    assert not [k for k in a if not torch.equal(a[k], b[k])]
    evaluated = {r["step"]: r["val/small/loss"] for r in records(whole) if "val/small/loss" in r}
    assert sorted(evaluated) == [0, 3, 6, 9, 2 * N]
    assert {r["step"]: r["val/small/loss"] for r in records(killed)
            if "val/small/loss" in r} == evaluated
