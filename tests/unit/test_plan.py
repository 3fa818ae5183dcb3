"""``llada plan``: layout checks and sizes without launching anything (its parameter counts are
the parameter table's, held against the model on the meta device in test_params.py)."""

import re

import pytest

from framework.launch.cli import main
from framework.config import load_config
from framework.launch.plan import piece_params
from framework.model.params import total_params
from tests.conftest import REPO

EIGHT_B = REPO / "recipes" / "llada-8b.yaml"


def plan(capsys, *args):
    code = main(["plan", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_plan_for_the_8b_recipe_on_1024_gpus(capsys):
    code, out, err = plan(capsys, EIGHT_B, "parallel.tp=8", "parallel.pp=4",
                          "parallel.world_size=1024")
    assert code == 0, err
    cfg = load_config(EIGHT_B, need_data=False)
    assert f"({total_params(cfg.model):,})" in out
    assert "world 1024 = tp 8 x pp 4 x dp 32" in out and "2 x 20 accumulation" in out
    rows = [line.split("|")[1:-1] for line in out.splitlines() if re.match(r"\| \d", line)]
    assert [int(r[0]) for r in rows] == [0, 1, 2, 3] and [int(r[1]) for r in rows] == [8] * 4
    # the stages' slices add up to the model: split parts x 8 ranks, norms once
    per_gpu = [float(r[2].strip().rstrip("M").replace(",", "")) * 1e6 for r in rows]
    replicated = sum(p.replicated for p in piece_params(cfg.model))
    assert abs(sum(per_gpu) * 8 - 7 * replicated - total_params(cfg.model)) < 1e6
    # the first stage holds the most activations under 1F1B
    acts = [float(r[5]) for r in rows]
    assert acts[0] == max(acts[:3]) and acts[0] > acts[1] > acts[2]
    assert re.search(r"expected step time at 40% MFU of 989 TFLOP/s per GPU: [\d.]+ s", out)


def test_zero_stage_shrinks_the_per_gpu_state(capsys):
    totals = []
    for stage in (1, 2, 3):
        code, out, err = plan(capsys, EIGHT_B, "parallel.world_size=64",
                              f"deepspeed.zero_stage={stage}")
        assert code == 0, err
        row = next(line for line in out.splitlines() if line.startswith("| 0 |"))
        totals.append(float(row.split("|")[5]))
    assert totals[0] > totals[1] > totals[2]


@pytest.mark.parametrize("overrides, needle", [
    (["parallel.tp=8"], "parallel.world_size: llada plan needs"),
    (["parallel.tp=3", "parallel.world_size=96"], "parallel.tp: 3 does not divide"),
    (["parallel.tp=8", "parallel.world_size=100"], "does not divide the world size 100"),
    (["parallel.world_size=96"], "train.global_batch_size: 1280 is not a multiple"),
    (["parallel.pp=2", "deepspeed.zero_stage=2", "parallel.world_size=16"], "ZeRO-2"),
    (["parallel.pp=40", "parallel.world_size=40"], "parallel.pp: 40 stages"),
])
def test_plan_refuses_layouts_that_do_not_fit(capsys, overrides, needle):
    code, out, err = plan(capsys, EIGHT_B, *overrides)
    assert code == 2 and out == ""
    assert err.count("llada: error:") == 1 and needle in err, err
