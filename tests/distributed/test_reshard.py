"""Resharding (framework/checkpoint/reshard.py): a checkpoint saved under a multi-process layout
of any ZeRO stage reads back as exactly the live state (fp32 master weights, Adam moments, step),
loads back into that layout, loads into another layout and ZeRO stage (CROSS: the state equals
the source's), and loads into one process (dp 1, tp 1, pp 1; ZeRO-1, and another stage for some),
which then continues the run: its next steps' losses are the saved layout's within 1e-5 relative.

Two torchrun launches (2 and 4 processes) each save several layouts in turn (reshard_worker.py);
the one-process engines are built in this process (a world of one)."""

import json

import pytest
import torch

from framework.config import load_config
from framework.checkpoint.reshard import (MOMENTS, FullState, load_resharded, read_full_state,
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
        "dp2-zero0-bf16": [DP2, "deepspeed.zero_stage=0", "train.precision=bf16"],
        "tp2-zero0": ["parallel.tp=2", "deepspeed.zero_stage=0"],
        "dp2-zero3": [DP2, "deepspeed.zero_stage=3"],
    },
    4: {  # tensor slices joined across data-parallel partitions, and across stages
        "tp2xdp2-zero2": ["parallel.tp=2", DP2, "deepspeed.zero_stage=2"],
        "tp2xpp2": ["parallel.tp=2", "parallel.pp=2", "deepspeed.zero_stage=1"],
        "tp2xdp2-zero3": ["parallel.tp=2", DP2, "deepspeed.zero_stage=3"],
    },
}
# a layout -> the earlier layout of its launch whose checkpoint it loads after its own run
CROSS = {"tp2-zero0": "dp2-zero1", "dp2-zero3": "tp2", "tp2xdp2-zero3": "tp2xpp2"}
CASES = [pytest.param(nproc, name, id=name) for nproc, layouts in LAUNCHES.items()
         for name in layouts]
# the one-process continuations: ZeRO-1 for every layout, and other stages for some
CONTINUATIONS = [pytest.param(nproc, name, 1, id=f"{name}-as-zero1")
                 for nproc, layouts in LAUNCHES.items() for name in layouts] + [
    pytest.param(2, "dp2-zero3", 0, id="dp2-zero3-as-zero0"),
    pytest.param(4, "tp2xdp2-zero3", 0, id="tp2xdp2-zero3-as-zero0"),
    pytest.param(2, "tp2-zero0", 3, id="tp2-zero0-as-zero3"),
]


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
                                        json.dumps(LAUNCHES[nproc]), json.dumps(CROSS)])
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
    if name in CROSS:  # another layout's checkpoint, loaded over this one's trained state
        assert_same(rec["cross"], record(out, CROSS[name])["live"], f"{CROSS[name]} -> {name}")


@pytest.mark.parametrize("nproc, name, zero_stage", CONTINUATIONS)
def test_one_process_continues_the_saved_run(saved, world, tmp_path, small_dataset, nproc, name,
                                             zero_stage):
    out = saved(nproc)
    rec = record(out, name)
    precision = [o for o in LAUNCHES[nproc][name] if o.startswith("train.precision")]
    trainer = build_trainer(load_config(DEBUG_RECIPE, overrides(
        tmp_path, small_dataset, [f"deepspeed.zero_stage={zero_stage}", *precision])))
    load_resharded(out / name / "ckpt" / TAG, rec["layout"], trainer.engine, tp_rank=0, tp=1)
    assert_same(live_state(trainer.engine), rec["live"], f"{name} -> one process")
    # the data stream where the saved run was: past its first STEPS steps' micro-batches
    for _ in range(STEPS * trainer.accum):
        next(trainer.data)
    trainer.step = STEPS
    losses = [trainer.train_step().loss for _ in range(STEPS)]
    trainer.data.close()
    for step, (a, b) in enumerate(zip(losses, rec["losses"])):
        assert abs(a - b) <= 1e-5 * abs(b), f"{name}: step {STEPS + step} loss {a} vs {b}"
