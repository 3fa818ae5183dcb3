"""Resharding (framework/checkpoint/reshard.py): a checkpoint saved under a multi-process layout
reads back as exactly the live state (fp32 master weights, Adam moments, step), loads back into
that layout, and loads into one process (dp 1, tp 1, pp 1), which then continues the run: its next steps' losses
are the saved layout's within 1e-5 relative.

Two torchrun launches (2 and 4 processes) each save several layouts in turn (reshard_worker.py);
the one-process engines are built in this process (a world of one)."""

import json

import pytest
import torch

from framework.config import load_config
from framework.checkpoint.reshard import (MOMENTS, FullState, load_full_state, read_full_state,
                                          read_weights)
from framework.training.factory import build_trainer
from tests.conftest import DEBUG_RECIPE, run_cli
from tests.distributed.reshard_worker import STEPS, TAG, live_state, overrides

pytestmark = pytest.mark.slow

DP2 = "data.num_workers=1"  # 2 data-parallel ranks x 1 worker: the one process's 2 readers
LAUNCHES = {  # processes -> layouts saved by one torchrun launch
    2: {
        "dp2-zero1": [DP2, "deepspeed.zero_stage=1"],
        "dp2-zero2-bf16": [DP2, "deepspeed.zero_stage=2", "train.precision=bf16"],
        "tp2": ["parallel.tp=2", "deepspeed.zero_stage=1"],
        "pp2": ["parallel.pp=2", "deepspeed.zero_stage=1", "parallel.pp_layers=[1,3]"],
    },
    4: {  # tensor slices joined across data-parallel partitions, and across stages
        "tp2xdp2-zero2": ["parallel.tp=2", DP2, "deepspeed.zero_stage=2"],
        "tp2xpp2": ["parallel.tp=2", "parallel.pp=2", "deepspeed.zero_stage=1"],
    },
}
CASES = [pytest.param(nproc, name, id=name) for nproc, layouts in LAUNCHES.items()
         for name in layouts]


@pytest.fixture(scope="module")
def saved(tmp_path_factory, small_dataset):
    """nproc -> the directory of that launch's records and checkpoints; each launch runs when a
    test first needs it."""
    done = {}

    def launch(nproc: int):
        if nproc not in done:
            out = tmp_path_factory.mktemp(f"reshard-{nproc}")
            proc = run_cli([], nproc=nproc, timeout=600, module="tests.distributed.reshard_worker",
                           module_args=[str(out), str(small_dataset),
                                        json.dumps(LAUNCHES[nproc])])
            assert proc.returncode == 0, proc.stderr[-4000:]
            done[nproc] = out
        return done[nproc]
    return launch


def record(out, name) -> dict:
    return torch.load(out / f"{name}.pt", weights_only=False)


def assert_same(got: FullState, want: FullState, what: str) -> None:
    assert got.step == want.step, f"{what}: step {got.step} vs {want.step}"
    for kind in ("weights", *MOMENTS):
        a, b = getattr(got, kind), getattr(want, kind)
        assert a.keys() == b.keys(), f"{what}: {kind} names differ: {sorted(a.keys() ^ b.keys())}"
        for name in b:
            assert torch.equal(a[name], b[name]), f"{what}: {kind} of {name} differ"


@pytest.mark.parametrize("nproc, name", CASES)
def test_checkpoint_reads_as_the_live_state(saved, nproc, name):
    out = saved(nproc)
    rec = record(out, name)
    tag_dir = out / name / "ckpt" / TAG
    assert_same(read_full_state(tag_dir, rec["layout"]), rec["live"], f"{name} read")
    weights = read_weights(tag_dir, rec["layout"])
    assert weights.keys() == rec["live"].weights.keys()
    assert all(torch.equal(weights[n], w) for n, w in rec["live"].weights.items()), name
    # wiped and loaded back into the saving layout, each rank from its own stage's names
    assert_same(rec["reloaded"], rec["live"], f"{name} reloaded")


@pytest.mark.parametrize("nproc, name", CASES)
def test_one_process_continues_the_saved_run(saved, world, tmp_path, small_dataset, nproc, name):
    out = saved(nproc)
    rec = record(out, name)
    precision = [o for o in LAUNCHES[nproc][name] if o.startswith("train.precision")]
    trainer = build_trainer(load_config(DEBUG_RECIPE, overrides(tmp_path, small_dataset,
                                                          ["deepspeed.zero_stage=1", *precision])))
    state = read_full_state(out / name / "ckpt" / TAG, rec["layout"])
    load_full_state(trainer.engine, trainer.engine.module, state, tp_rank=0, tp=1)
    assert_same(live_state(trainer.engine), rec["live"], f"{name} -> one process")
    # the data stream where the saved run was: past its first STEPS steps' micro-batches
    for _ in range(STEPS * trainer.accum):
        next(trainer.data)
    trainer.step = STEPS
    losses = [trainer.train_step().loss for _ in range(STEPS)]
    trainer.data.close()
    for step, (a, b) in enumerate(zip(losses, rec["losses"])):
        assert abs(a - b) <= 1e-5 * abs(b), f"{name}: step {STEPS + step} loss {a} vs {b}"
