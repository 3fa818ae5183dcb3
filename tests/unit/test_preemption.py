"""Stopping early without losing work: a stop signal or a near deadline ends the run at a step
boundary with a checkpoint of that step, and the next start continues from it; DataLoader
workers outlive the signals Slurm sends to every process of a job step."""

import json
import multiprocessing
import os
import signal
import subprocess
import sys

import pytest

from framework.config import ConfigError, PreemptionConfig, load_config
from framework.training.preemption import StopRequest, deadline_from_env
from framework.training.factory import build_trainer
from tests.conftest import DEBUG_RECIPE, REPO, quick_overrides


def test_deadline_guard_counts_the_next_step_and_a_save():
    now = [0.0]
    stop = StopRequest(PreemptionConfig(deadline_margin_minutes=1.0), deadline=1000.0,
                       clock=lambda: now[0])
    assert stop.reason is None
    stop.note_step(100.0)  # two steps (200 s) + margin (60 s) must fit
    stop.note_save(50.0)
    stop.note_step(20.0)  # the slowest step counts
    now[0] = 1000.0 - 311.0
    assert stop.reason is None
    now[0] = 1000.0 - 309.0
    assert stop.reason.startswith("time limit: 309 s left") and "~310 s" in stop.reason
    # a signal takes precedence, and only the first one is kept
    stop._on_signal(signal.SIGUSR1, None)
    stop._on_signal(signal.SIGTERM, None)
    assert stop.reason == "SIGUSR1 received"
    assert StopRequest(PreemptionConfig()).reason is None  # no deadline, no signal


def test_deadline_from_the_environment():
    assert deadline_from_env({}) is None and deadline_from_env({"LLADA_DEADLINE": " "}) is None
    assert deadline_from_env({"LLADA_DEADLINE": "1795591834"}) == 1795591834.0
    with pytest.raises(ConfigError, match="LLADA_DEADLINE: expected epoch seconds"):
        deadline_from_env({"LLADA_DEADLINE": "48:00:00"})


def test_install_and_uninstall_restore_the_previous_handlers():
    before = signal.getsignal(signal.SIGUSR2)
    stop = StopRequest(PreemptionConfig(signals=["sigusr2"])).install()
    os.kill(os.getpid(), signal.SIGUSR2)
    assert stop.reason == "SIGUSR2 received"
    stop.uninstall()
    assert signal.getsignal(signal.SIGUSR2) is before


def make_trainer(run_dir, dataset, steps, stop=None):
    cfg = load_config(DEBUG_RECIPE, quick_overrides(run_dir, dataset, steps) +
                      ["tracking.log_interval=1"])
    return build_trainer(cfg, stop if stop is not None else StopRequest(cfg.preemption))


def test_a_signal_mid_run_saves_that_step_and_the_next_start_finishes(world, tmp_path,
                                                                       small_dataset):
    cfg = load_config(DEBUG_RECIPE, quick_overrides(tmp_path, small_dataset, 6))
    stop = StopRequest(cfg.preemption).install()
    try:
        trainer = make_trainer(tmp_path, small_dataset, 6, stop)
        step = trainer.train_step

        def step_then_signal():  # the signal lands during step 3
            if trainer.step == 2:
                os.kill(os.getpid(), signal.SIGUSR1)
            return step()
        trainer.train_step = step_then_signal
        summary = trainer.fit()
    finally:
        stop.uninstall()
    assert summary["status"] == "stopped" and summary["final_step"] == 3
    assert summary["stop_reason"] == "SIGUSR1 received"
    assert [p.name for p in (tmp_path / "checkpoints").glob("step_*")] == ["step_00000003"]

    summary = make_trainer(tmp_path, small_dataset, 6).fit()
    assert summary["status"] == "completed" and summary["final_step"] == 6
    assert summary["resumed_from"].endswith("step_00000003") and summary["steps"] == 3
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").open()]
    assert steps == list(range(1, 7))


def test_a_near_deadline_stops_the_run_with_a_checkpoint(world, tmp_path, small_dataset):
    now = [0.0]
    stop = StopRequest(PreemptionConfig(deadline_margin_minutes=1.0), deadline=100.0,
                       clock=lambda: now[0])
    trainer = make_trainer(tmp_path, small_dataset, 5, stop)
    step = trainer.train_step

    def step_then_late():  # after step 2 less than the margin is left
        result = step()
        if trainer.step == 2:
            now[0] = 50.0
        return result
    trainer.train_step = step_then_late
    summary = trainer.fit()
    assert summary["status"] == "stopped" and summary["final_step"] == 2
    assert summary["stop_reason"].startswith("time limit: 50 s left")
    assert (tmp_path / "checkpoints" / "step_00000002" / "meta.json").is_file()


def test_loader_workers_survive_the_stop_signals(world, tmp_path, small_dataset):
    trainer = make_trainer(tmp_path, small_dataset, 3)
    loader = trainer.data
    assert loader.workers == 1 and loader.cfg.num_workers == 1
    before = set(multiprocessing.active_children())
    next(loader)
    workers = [p for p in multiprocessing.active_children() if p not in before]
    assert len(workers) == 1
    for sig in (signal.SIGUSR1, signal.SIGTERM):  # what Slurm sends every process of the step
        os.kill(workers[0].pid, sig)
    for _ in range(4):
        next(loader)
    assert workers[0].is_alive()
    loader.close()


def test_a_process_with_workers_left_running_still_exits(small_dataset):
    # workers ignore the stop signals, yet interpreter exit (which TERMinates and joins them)
    # must not wait on them forever, nor must a close that finds one stuck
    code = f"""
import signal, sys
sys.path.insert(0, {str(REPO)!r})
from tests.unit.data_helpers import make_loader
a = make_loader([{str(small_dataset)!r}], workers=1, ignore_signals=[signal.SIGTERM])
b = make_loader([{str(small_dataset)!r}], workers=1, ignore_signals=[signal.SIGTERM])
next(a); next(b)
b.close()
print("exiting", flush=True)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "exiting" in proc.stdout, proc.stderr[-2000:]
