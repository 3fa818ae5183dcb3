"""Validation inside a run: it changes nothing of training, is one record per evaluated step in
metrics.jsonl and summary.json, feeds checkpoint.keep_best, and ``llada validate`` reads the
same number from the saved checkpoint."""

import json

import pytest

from framework.config import load_config
from framework.model.weights import full_state_dict
from framework.training.factory import build_trainer
from tests.conftest import DEBUG_RECIPE, quick_overrides, run_cli, validation_overrides

STEPS = 12


def make_trainer(run_dir, dataset, *extra):
    cfg = load_config(DEBUG_RECIPE, quick_overrides(run_dir, dataset, steps=STEPS) + list(extra))
    return build_trainer(cfg)


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_values(record):
    return {k: v for k, v in record.items() if k.startswith(("train/", "data/"))
            and k != "train/tokens_per_s"}


@pytest.fixture(scope="module")
def with_and_without(world, tmp_path_factory, small_dataset, small_heldout):
    on_dir, off_dir = tmp_path_factory.mktemp("eval-on"), tmp_path_factory.mktemp("eval-off")
    on = make_trainer(on_dir, small_dataset, *validation_overrides(small_heldout),
                      "eval.interval=5", "eval.at_start=true", "checkpoint.save_final=true")
    on_summary = on.fit()
    off = make_trainer(off_dir, small_dataset, "checkpoint.save_final=true")
    off_summary = off.fit()
    return (on, on_dir, on_summary), (off, off_dir, off_summary)


def test_evaluation_changes_nothing_of_training(with_and_without):
    (on, on_dir, _), (off, off_dir, _) = with_and_without
    assert [r.loss for r in on.history] == [r.loss for r in off.history]
    a, b = full_state_dict(on.engine.module, 1), full_state_dict(off.engine.module, 1)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    # the logged steps carry the same training values; evaluated steps add theirs
    got, ref = records(on_dir), records(off_dir)
    assert [r["step"] for r in got] == [0, 5, 10, 12] and [r["step"] for r in ref] == [10, 12]
    by_step = {r["step"]: r for r in got}
    for r in ref:
        assert train_values(by_step[r["step"]]) == train_values(r)
    for step in (0, 5, 10, 12):
        rec = by_step[step]
        assert rec["val/small/loss"] > 0 and rec["val/small/bpb"] > 0, rec
        assert rec["val/small/loss_mc_stderr"] > 0 and rec["val/small/loss_seq_stderr"] > 0
        assert any(k.startswith("val/small/loss_by_ratio/") for k in rec)
        assert rec["time/val_seconds"] > 0 and "train/consumed_tokens" in rec
    assert "train/loss" not in by_step[0] and "train/loss" not in by_step[5]
    assert by_step[12]["val/small/loss"] < by_step[0]["val/small/loss"]


def test_summary_and_checkpoint_carry_the_evaluation(with_and_without):
    (_, on_dir, summary), _ = with_and_without
    last = {r["step"]: r for r in records(on_dir)}[12]
    saved = json.loads((on_dir / "summary.json").read_text())["validation"]["small"]
    assert saved["last"]["step"] == 12 and saved["last"]["loss"] == last["val/small/loss"]
    assert saved["best"]["loss"] == min(r["val/small/loss"] for r in records(on_dir))
    meta = json.loads((on_dir / "checkpoints" / "step_00000012" / "meta.json").read_text())
    assert meta["validation"] == {"set": "small", "loss": last["val/small/loss"]}


def test_llada_validate_reads_the_same_bound_from_the_checkpoint(with_and_without, tmp_path):
    (_, on_dir, _), _ = with_and_without
    last = {r["step"]: r for r in records(on_dir)}[12]
    out = tmp_path / "report.json"
    proc = run_cli(["validate", str(on_dir), "--micro-batch-size", "5", "--output", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["step"] == 12 and report["sets"]["small"]["sequences"] == 24
    for key in ("loss", "loss_mc_stderr", "loss_seq_stderr", "bpb"):
        assert report["sets"]["small"][key] == pytest.approx(last[f"val/small/{key}"], rel=1e-6)
    assert "small" in proc.stdout and "by mask ratio" in proc.stdout


def test_keep_best_keeps_the_lowest_validation_loss(world, tmp_path, small_dataset,
                                                    small_heldout):
    trainer = make_trainer(tmp_path, small_dataset, *validation_overrides(small_heldout, 4, 2),
                           "eval.interval=3", "eval.at_start=false", "checkpoint.interval=3",
                           "checkpoint.keep=1",
                           "checkpoint.keep_best=true")
    losses = iter([5.0, 3.0, 4.0, 6.0])  # steps 3, 6, 9, 12: the best is step 6's
    real = trainer.validator.evaluate

    def evaluate():  # the real evaluation, its loss replaced
        values, loss = real(), next(losses)
        trainer.validator.results["small"]["loss"] = loss
        return {**values, "val/small/loss": loss}

    trainer.validator.evaluate = evaluate
    trainer.fit()
    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert kept == ["step_00000006", "step_00000012"]
