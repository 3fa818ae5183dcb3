"""train.on_divergence=rollback: a run whose loss goes non-finite goes back to its newest
checkpoint before the divergence, continues at a lower learning rate on the same data and
completes; the detector's rules on known losses."""

import json

import pytest

from framework.checkpoint.files import tag_for
from framework.config import TrainConfig, load_config
from framework.tracking.courier import mlflow_client
from framework.training.divergence import DivergenceWatch, RollbackNeeded, TrainingError
from framework.training.metrics import StepResult
from framework.training.run import run_training
from framework.training.trainer import Trainer
from tests.conftest import DEBUG_RECIPE, quick_overrides, tracking_overrides

# warmup then constant: the schedule is proportional to optimizer.lr, so a run at 1/4 of the
# rate is the same run with optimizer.lr / 4
SETTINGS = ["tracking.log_interval=1", "schedule.decay_fraction=0", "checkpoint.interval=3",
            "train.max_consecutive_nonfinite=2"]


def config(run_dir, dataset, steps, *extra):
    return load_config(DEBUG_RECIPE, quick_overrides(run_dir, dataset, steps) + SETTINGS +
                       list(extra))


def losses(run_dir):
    return {r["step"]: r["train/loss"] for r in map(json.loads, (run_dir / "metrics.jsonl")
                                                       .read_text().splitlines())}


def poison_once(monkeypatch, bad_steps):
    """The loss of each of ``bad_steps`` is NaN the first time the step is taken (the replay
    after the rollback is clean), in every Trainer built meanwhile."""
    real_step, done = Trainer.train_step, set()

    def train_step(self):
        step = self.step + 1
        if step not in bad_steps or step in done:
            return real_step(self)
        done.add(step)
        real_loss = self.objective.loss.head_loss
        self.objective.loss.head_loss = lambda *a, **k: tuple(x * float("nan")
                                                               for x in real_loss(*a, **k))
        try:
            return real_step(self)
        finally:
            self.objective.loss.head_loss = real_loss
    monkeypatch.setattr(Trainer, "train_step", train_step)


def test_a_non_finite_run_rolls_back_and_completes_at_the_lower_rate(
        world, tmp_path, small_dataset, monkeypatch, capsys, mlflow_server):
    run = tmp_path / "run"
    poison_once(monkeypatch, {7, 8})
    summary = run_training(config(run, small_dataset, 12, "train.on_divergence=rollback",
                                  *tracking_overrides(mlflow_server, "divergence")))
    out = capsys.readouterr().out
    monkeypatch.undo()
    assert summary["status"] == "completed" and summary["final_step"] == 12
    assert "llada: divergence: 2 consecutive steps had a non-finite loss (steps 7..8" in out
    assert "rolling back to the newest complete checkpoint before step 7" in out
    assert f"resumed from {run / 'checkpoints' / tag_for(6)} at step 6" in out
    (rollback,) = summary["rollbacks"]
    assert rollback["to"] == 6 and rollback["at_step"] == 7 and rollback["lr_factor"] == 0.25
    # the rate factor lives in the checkpoints saved since: a later resume keeps it
    meta = json.loads((run / "checkpoints" / tag_for(12) / "meta.json").read_text())
    assert meta["lr_factor"] == 0.25 and meta["rollbacks"] == 1
    got = losses(run)
    assert sorted(got) == list(range(1, 13))  # each step once: the NaN records set aside
    (aside,) = run.glob("metrics-set-aside-*.jsonl")
    assert [json.loads(line)["step"] for line in aside.read_text().splitlines()] == [7, 8]

    # the same run without the fault, to step 7, then from its step 6 at a quarter of the rate
    ref = tmp_path / "ref"
    run_training(config(ref, small_dataset, 7))
    same_start = losses(ref)
    (ref / "metrics.jsonl").unlink()
    run_training(config(ref, small_dataset, 12, "optimizer.lr=7.5e-4",
                        f"checkpoint.resume={ref / 'checkpoints' / tag_for(6)}"))
    slow = losses(ref)
    assert [got[s] for s in range(1, 8)] == [same_start[s] for s in range(1, 8)]
    assert [got[s] for s in range(7, 13)] == pytest.approx([slow[s] for s in range(7, 13)],
                                                           rel=1e-6)
    # MLflow: the steps after the rollback point in a child run from that step
    client = mlflow_client(mlflow_server.uri)
    exp = client.get_experiment_by_name("divergence")
    runs = client.search_runs([exp.experiment_id])
    (child,) = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert child.data.tags["rolled_back_to_step"] == "6"
    steps = [m.step for m in client.get_metric_history(child.info.run_id, "train/loss")]
    assert steps == list(range(7, 13))


def result(step, loss, skipped=False):
    return StepResult(step=step, loss=loss, lr=1e-3, grad_norm=1.0, tokens=1, seq_len=1,
                      masked=1, seconds=0.1, skipped=skipped)


def test_a_lasting_spike_diverges_a_single_one_does_not():
    watch = DivergenceWatch(TrainConfig(steps=100, on_divergence="rollback", spike_factor=3.0,
                                        spike_steps=3, max_rollbacks=1), 1.0, 0, print)
    for step in range(1, 21):
        watch.observe(result(step, 5.0 + 0.1 * (step % 3)))
    watch.observe(result(21, 40.0))  # one noisy step
    watch.observe(result(22, 5.0))
    watch.observe(result(23, 16.0))
    watch.observe(result(24, 17.0))
    with pytest.raises(RollbackNeeded) as e:
        watch.observe(result(25, 18.0))
    assert e.value.request.before == 23 and e.value.request.lr_factor == 0.25
    # the rollbacks the run is allowed are used up: stop
    spent = DivergenceWatch(TrainConfig(steps=100, on_divergence="rollback", max_rollbacks=1,
                                        max_consecutive_nonfinite=1), 0.25, 1, print)
    with pytest.raises(TrainingError, match="1 rollbacks done already .train.max_rollbacks=1"):
        spent.observe(result(3, float("nan"), skipped=True))
    # stop (the default) never looks at spikes
    stop = DivergenceWatch(TrainConfig(steps=100), 1.0, 0, print)
    for step in range(1, 40):
        stop.observe(result(step, 5.0 if step < 20 else 50.0))
