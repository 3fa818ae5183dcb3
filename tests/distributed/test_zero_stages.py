"""Two gloo processes under torchrun: each ZeRO stage trains the debug model (shrunk), tensor
parallelism splits it, and a global batch that the data-parallel size does not divide is refused."""

import json

import pytest

from tests.conftest import DEBUG_RECIPE, REPO, run_cli, quick_overrides

pytestmark = pytest.mark.slow


def train(tmp_path, dataset, *extra, steps=40):
    args = ["train", str(DEBUG_RECIPE), *quick_overrides(tmp_path, dataset, steps), *extra]
    return run_cli(args, nproc=2, timeout=600)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_trains_with_two_processes(tmp_path, small_dataset, stage):
    proc = train(tmp_path, small_dataset, f"deepspeed.zero_stage={stage}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 40
    assert summary["data_parallel"] == 2 and summary["zero_stage"] == stage
    assert summary["skipped_steps"] == 0
    assert summary["last_loss"] < 0.85 * summary["first_loss"], summary
    assert "x 1 accumulation x 2 data-parallel" in proc.stdout


def test_tensor_parallel_two_ranks_train(tmp_path, small_dataset):
    proc = train(tmp_path, small_dataset, "parallel.tensor=2", "deepspeed.zero_stage=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["tensor_parallel"] == 2 and summary["data_parallel"] == 1
    assert summary["last_loss"] < 0.85 * summary["first_loss"], summary


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
