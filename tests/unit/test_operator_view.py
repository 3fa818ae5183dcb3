"""What an operator reads of a run: each record's window means (skipped steps excluded and
counted), where the time went, the ETA, the same numbers on the console, in metrics.jsonl and in
MLflow; the loss curve at 200 steps and at a million; MLflow's system metrics."""

import json
import re
import statistics
import time

import numpy as np
import pytest
import torch

from framework.config import ModelConfig, TrackingConfig
from framework.tracking.plot import MAX_POINTS, _binned, _si, draw_curve
from framework.tracking.system import PREFIX, SystemSampler, next_step
from framework.tracking.tracker import Tracker
from framework.training.flops import FlopCounter
from framework.training.metrics import (ETA, FRACTION, PLOT, MetricsStream, StepResult, Window,
                                        console_line, duration)
from framework.training import metrics, phases
from framework.training.objective import LossByT
from framework.training.phases import (DATA, FORWARD_BACKWARD, OPTIMIZER, SYNC, Heartbeat,
                                       OptimizerTimer, StepTimes)

TINY = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_kv_heads=2,
                   ffn_hidden_size=96, vocab_size=300)
# steps 1..10: (loss, grad norm, seconds); None: a skipped (non-finite) step
STEPS = {1: (4.0, 2.0, 1.0), 2: (3.0, 1.0, 1.0), 3: None, 4: (2.0, 3.0, 2.0),
         5: (1.5, 1.0, 1.0), 6: None, 7: None, 8: (1.0, 0.5, 1.0), 9: (0.8, 0.4, 1.0),
         10: (0.6, 0.2, 3.0)}


def result(step):
    good = STEPS[step]
    loss, grad, seconds = good if good else (float("nan"), None, 1.5)
    # a tenth of each step waiting for data, 60% forward and backward, 20% optimizer
    times = StepTimes(own=seconds, data=0.1 * seconds, forward_backward=0.6 * seconds,
                      optimizer=0.2 * seconds)
    return StepResult(step=step, loss=loss, lr=1e-3 * step, grad_norm=grad, tokens=100,
                      seq_len=10, masked=5, seconds=seconds, skipped=good is None, times=times)


def test_records_are_window_means_and_console_file_and_mlflow_agree(world, tmp_path,
                                                                     mlflow_server, capsys):
    cfg = TrackingConfig(log_interval=4, experiment="operator-view", send_interval_s=0.05,
                         progress_bar=False, system_metrics_interval_s=0)
    tracker = Tracker(cfg, tmp_path / "tracking", uri=mlflow_server.uri, artifact_location=None,
                      run_name="window", run_id=None, resumed_at=None, plot=PLOT)
    stream = MetricsStream(cfg, console=True, path=tmp_path / "metrics.jsonl", tracker=tracker,
                           total_steps=10, resumed_at=None, rollback=False)
    window = Window(world, FlopCounter(TINY), peak=None)
    skipped = 0
    for step in range(1, 11):
        r = result(step)
        skipped += r.skipped
        window.add(r)
        if step == 2:
            window.note("validation", 1.0)  # an evaluation inside the first window
        if stream.due(step):
            stream.write(step, window.take(r, consumed_tokens=100 * step, skipped_steps=skipped,
                                           data_counters={}, loss_by_t=LossByT(),
                                           steps_left=10 - step))
        if step == 4:
            window.note("checkpoint", 2.0)  # the save after step 4: in the next window
    stream.close("completed")
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [4, 8, 10]
    first, second, last = records

    # the loss and gradient norm over the good steps of each window; skipped ones counted
    assert first["train/loss"] == pytest.approx((4.0 + 3.0 + 2.0) / 3)
    assert second["train/loss"] == pytest.approx((1.5 + 1.0) / 2)
    assert last["train/loss"] == pytest.approx((0.8 + 0.6) / 2)
    assert [r["train/loss_step"] for r in records] == [2.0, 1.0, 0.6]
    assert [(r["train/window_steps"], r["train/window_skipped"]) for r in records] == \
        [(4, 1), (4, 2), (2, 0)]
    assert first["train/grad_norm"] == pytest.approx(2.0) and first["train/grad_norm_max"] == 3.0
    assert second["train/grad_norm"] == pytest.approx(0.75)
    assert first["train/lr"] == pytest.approx(4e-3)  # the step's own
    assert first["train/skipped_steps"] == 1 and last["train/skipped_steps"] == 3

    # where the time went: steps 1-4 took 1 + 1 + 1.5 + 2 s, plus the 1 s evaluation
    wall = 5.5 + 1.0
    assert first[FRACTION.format("data")] == pytest.approx(0.1 * 5.5 / wall)
    assert first[FRACTION.format("forward_backward")] == pytest.approx(0.6 * 5.5 / wall)
    assert first[FRACTION.format("optimizer")] == pytest.approx(0.2 * 5.5 / wall)
    assert first[FRACTION.format("validation")] == pytest.approx(1.0 / wall)
    assert first[FRACTION.format("checkpoint")] == 0.0
    assert second[FRACTION.format("checkpoint")] == pytest.approx(2.0 / (5.0 + 2.0))
    assert first["time/step_seconds"] == pytest.approx(5.5 / 4)
    assert first["time/step_seconds_median"] == statistics.median([1.0, 1.0, 1.5, 2.0])
    assert first["time/step_seconds_p90"] == 2.0
    assert first["train/tokens_per_s"] == pytest.approx(400 / 5.5)
    assert last[ETA] == 0.0 and first[ETA] > 0.0  # this job's pace x the steps left
    assert first["memory/rss_gib"] > 0

    # the console says the same, over the same steps
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert len(lines) == 3
    assert f"loss {first['train/loss']:.4f} (steps 1-4, 1 skipped)" in lines[0]
    assert f"loss {last['train/loss']:.4f} (steps 9-10) |" in lines[2]
    assert "grad norm 2.000 (max 3.000)" in lines[0]
    assert f"data wait {100 * first[FRACTION.format('data')]:.0f}% " in lines[0]
    assert "eval 15%" in lines[0] and "save 29%" in lines[1]
    assert re.search(r"\| eta \d+s \|", lines[0]), lines[0]

    # and MLflow holds every value of every record at its step
    client = mlflow_server.client()
    (run,) = client.search_runs([client.get_experiment_by_name("operator-view").experiment_id])
    for name in {k for r in records for k in r} - {"step", "time"}:
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, name)}
        assert history == pytest.approx({r["step"]: r[name] for r in records if name in r}), name


def test_the_90th_percentile_is_the_nearest_rank_and_the_eta_this_jobs_pace(world,
                                                                             monkeypatch):
    now = [100.0]  # the first step ends at 100 s
    monkeypatch.setattr(metrics.time, "monotonic", lambda: now[0])
    window = Window(world, FlopCounter(TINY), peak=None)
    for step in range(1, 11):  # 1 s .. 10 s, in a shuffled order
        window.add(StepResult(step=step, loss=1.0, lr=1e-3, grad_norm=1.0, tokens=1,
                              seq_len=1, masked=1, seconds=float((3 * step) % 10 + 1),
                              skipped=False))
    now[0] = 145.0  # the record
    values = window.take(result(10), consumed_tokens=10, skipped_steps=0, data_counters={},
                         loss_by_t=LossByT(), steps_left=30)
    monkeypatch.undo()
    assert values["time/step_seconds_p90"] == 9.0  # not the slowest: 9 of 10 are as fast
    assert values["time/step_seconds_median"] == 5.5
    assert values[ETA] == pytest.approx(30 * 45.0 / 9)  # 9 steps in the 45 s after the first


def test_a_window_that_waits_for_data_says_it_is_input_bound():
    values = {"train/loss": 2.0, "train/lr": 1e-3, "train/tokens_per_s": 10.0,
              "train/skipped_steps": 0, "train/window_steps": 10, "time/step_seconds_median": 1,
              "time/step_seconds_p90": 2, ETA: 3725.0, "time/job_seconds_left": 90000.0,
              **{FRACTION.format(p): f for p, f in [("data", 0.35), ("forward_backward", 0.5),
                                                    ("optimizer", 0.15), ("checkpoint", 0.0),
                                                    ("validation", 0.0)]}}
    line = console_line(20, 100, values)
    assert "INPUT-BOUND: data wait 35% fwd+bwd 50% optimizer 15% |" in line
    assert "| eta 1h02m (job ends in 1d01h)" in line
    values[FRACTION.format("data")] = 0.02
    assert "| data wait 2% " in console_line(20, 100, values)
    assert [duration(s) for s in (5, 65, 7260, 190000)] == ["5s", "1m05s", "2h01m", "2d04h"]


def records(n, every=1):
    """n step records as the outbox holds them: a falling loss, a held-out bound every 10."""
    out = []
    for i in range(1, n + 1):
        step = i * every
        metrics = {"train/consumed_tokens": 4096 * step, "train/loss": 8.0 / (1 + step) ** 0.1,
                   "train/loss_step": 8.2 / (1 + step) ** 0.1, "train/lr": 1e-3,
                   **{f"train/loss_by_t/0.{b}-0.{b + 1}": 3.0 + b / 5 for b in range(9)}}
        if i % 10 == 0:
            metrics["val/stdlib/loss"] = 8.1 / (1 + step) ** 0.1
        out.append({"step": step, "metrics": metrics})
    return out


def test_the_curve_draws_200_steps_and_a_million(tmp_path):
    for n, every in ((20, 10), (100_000, 10)):
        path = tmp_path / f"curve-{n}.png"
        assert draw_curve(records(n, every), path, PLOT)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # past MAX_POINTS records a curve is the means of equal runs, their range kept
    xs = np.arange(10 * MAX_POINTS, dtype=float)
    bx, mean, low, high = _binned(xs, 2 * xs)
    assert len(bx) == len(mean) == MAX_POINTS
    assert (bx[0], mean[0], low[0], high[0]) == (4.5, 9.0, 0.0, 18.0)  # records 0..9
    assert (bx[-1], high[-1]) == (xs[-1] - 4.5, 2 * xs[-1])
    small = np.arange(5.0)
    assert all(np.array_equal(v, w) for v, w in zip(_binned(small, small),
                                                     (small, small, small, small)))
    assert [_si(v) for v in (512, 12_000, 1.5e6, 2e9, 1.2e12)] == \
        ["512", "12K", "1.5M", "2B", "1.2T"]
    assert not draw_curve([], tmp_path / "none.png", PLOT)


def test_system_metrics_are_mlflows_sampled_off_the_step_and_kept_until_sent():
    lines = []
    sampler = SystemSampler(0.05, lines.append)
    time.sleep(0.3)
    sampler.close()
    samples = sampler.pending(10_000)
    assert len(samples) >= 2 and not lines
    assert [n for _, n, _ in samples] == list(range(len(samples)))
    names = set(samples[0][2])
    assert {f"{PREFIX}cpu_utilization_percentage", f"{PREFIX}system_memory_usage_megabytes",
            f"{PREFIX}disk_usage_percentage"} <= names
    assert len(sampler.pending(1)) == 1  # one sample at least, even past the limit
    sampler.done(samples[0][1])
    assert [n for _, n, _ in sampler.pending(10_000)] == [n for _, n, _ in samples[1:]]

    class M:  # MLflow's metric objects: a resumed job continues the run's system steps
        def __init__(self, key, step):
            self.key, self.step = key, step
    assert next_step([M("train/loss", 900), M("system/cpu_utilization_percentage", 41)]) == 42
    assert next_step([M("train/loss", 900)]) == 0


def test_a_steps_marks_split_its_time_and_the_pipelines_optimizer_is_timed(monkeypatch):
    """Which mark starts which part: data until forward_backward, then until the optimizer, then
    until the step's work is queued; the rank's own part until the gradient exchange."""
    clock = iter([0.0, 0.0, 1.0, 3.5, 4.0, 4.5, 9.0])
    monkeypatch.setattr(phases.time, "monotonic", lambda: next(clock))
    beat = Heartbeat(torch.device("cpu"))  # 0
    beat.mark(DATA, 1)  # 0: the step starts
    beat.mark(FORWARD_BACKWARD)  # 1: its micro-batches are in
    beat.mark(SYNC)  # 3.5: the last backward, where the ranks exchange gradients
    beat.mark(OPTIMIZER)  # 4
    beat.work_queued()  # 4.5
    assert beat.now[0] == OPTIMIZER  # the watchdog still sees the optimizer phase
    times = beat.times()  # 9: the loss on the host
    assert (times.data, times.forward_backward, times.optimizer, times.own) == (1.0, 3.0, 0.5,
                                                                                3.5)

    class Adam:
        def step(self):
            pass

    clock = iter([10.0, 12.5, 20.0, 21.0])  # two steps: 2.5 s and 1 s
    optimizer = Adam()
    timer = OptimizerTimer(optimizer, torch.device("cpu"))
    optimizer.step()
    optimizer.step()
    assert timer.take() == pytest.approx(2.5 + 1.0) and timer.take() == 0.0
