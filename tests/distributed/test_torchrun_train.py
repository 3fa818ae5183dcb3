"""``llada train`` under torchrun with two gloo processes: a pipeline-parallel run trains through
the CLI (the layouts' numerics are test_layouts.py's), and a global batch that the data-parallel
size does not divide is refused by every rank."""

import json

import pytest

from tests.conftest import DEBUG_RECIPE, REPO, run_cli, quick_overrides

pytestmark = pytest.mark.slow


def train(tmp_path, dataset, *extra, steps=40):
    args = ["train", str(DEBUG_RECIPE), *quick_overrides(tmp_path, dataset, steps), *extra]
    return run_cli(args, nproc=2, timeout=600)


def test_pipeline_parallel_run_trains(tmp_path, small_dataset):
    proc = train(tmp_path, small_dataset, "parallel.pp=2", "deepspeed.zero_stage=1",
                 "checkpoint.save_final=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 40
    assert summary["pipeline_parallel"] == 2 and summary["data_parallel"] == 1
    assert summary["skipped_steps"] == 0
    assert summary["last_loss"] < 0.85 * summary["first_loss"], summary
    # the whole model's parameter count, though each stage holds half
    assert "(tp 1, pp 2, dp 1)" in proc.stdout
    # one data-stream file per data-parallel rank, written by the first stage only
    data = list((tmp_path / "checkpoints" / "step_00000040" / "data").iterdir())
    assert [p.name for p in data] == ["dp_rank_00000.json"]


def test_global_batch_not_divisible_by_data_parallel_size(tmp_path, small_dataset):
    proc = train(tmp_path, small_dataset, "train.micro_batch_size=8",
                 "train.global_batch_size=8", steps=2)
    # torchrun itself exits 1 and reports the worker's own exit code, 2
    assert proc.returncode != 0
    assert "exitcode  : 2" in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("llada: error:")]
    assert errors and all("train.global_batch_size: 8 is not a multiple of" in e and "8 x 2" in e
                          for e in errors)
    # torchrun prints its own ChildFailedError traceback; the workers print none
    assert f'File "{REPO / "framework"}' not in proc.stderr
