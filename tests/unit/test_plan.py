"""``llada plan``: layout checks and sizes without launching anything (its parameter counts are
the parameter table's, held against the model on the meta device in test_params.py)."""

import json
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


ONE_B = REPO / "recipes" / "llada-1b.yaml"
ONE_GPU = ["parallel.world_size=1", "train.global_batch_size=4", "train.micro_batch_size=4"]


def measured_record(**changes):
    """A benchmarks/measured.json record of the 1B recipe's shape, as benchmarks/train_step.py
    writes it."""
    model = load_config(ONE_B, need_data=False).model
    rec = {"gpu": "NVIDIA H200", "recipe": "llada-1b.yaml",
           "model": {k: getattr(model, k) for k in ("num_layers", "hidden_size",
                                                    "num_attention_heads", "num_kv_heads",
                                                    "ffn_hidden_size", "vocab_size")},
           "seq_len": 4096, "micro_batch_size": 4, "tokens_per_s": 45000.0, "mfu": 0.5,
           "peak_memory_gib": 60.0, "date": "2026-12-04",
           "command": "python benchmarks/train_step.py --recipe recipes/llada-1b.yaml"}
    rec.update(changes)
    return rec


def write_json(tmp_path, records):
    path = tmp_path / "measured.json"
    path.write_text(json.dumps(records))
    return path


def test_plan_uses_the_mfu_measured_on_the_gpu(capsys, tmp_path):
    path = write_json(tmp_path, [measured_record(gpu="NVIDIA H100 80GB HBM3", mfu=0.3),
                                 measured_record()])
    code, out, err = plan(capsys, ONE_B, *ONE_GPU, "--gpu", "NVIDIA H200", "--measured", path)
    assert code == 0, err
    assert "expected step time at 50% MFU of 989 TFLOP/s per GPU" in out
    line = next(x for x in out.splitlines() if x.startswith("MFU:"))
    assert "50.0% measured on NVIDIA H200 on 2026-12-04" in line and "llada-1b.yaml" in line
    assert str(path) in line
    # an explicit --mfu wins, and the output says over what
    code, out, err = plan(capsys, ONE_B, *ONE_GPU, "--gpu", "NVIDIA H200", "--measured", path,
                          "--mfu", "0.25")
    assert code == 0, err
    assert "expected step time at 25% MFU" in out and "--mfu wins over the 50.0%" in out


@pytest.mark.parametrize("record", [
    measured_record(gpu="NVIDIA H100 80GB HBM3"),  # another GPU
    measured_record(seq_len=2048),  # another sequence length
    measured_record(model={**measured_record()["model"], "num_layers": 12}),  # another shape
    measured_record(mfu=None),  # a CPU row: no MFU
])
def test_plan_without_a_matching_measurement_uses_the_guess(capsys, tmp_path, record):
    path = write_json(tmp_path, [record])
    code, out, err = plan(capsys, ONE_B, *ONE_GPU, "--gpu", "NVIDIA H200", "--measured", path)
    assert code == 0, err
    assert "expected step time at 40% MFU of 989 TFLOP/s" in out
    assert f"MFU: 40% guessed: {path} has no measurement on NVIDIA H200" in out


def test_plan_without_gpu_says_the_mfu_is_a_guess(capsys):
    code, out, err = plan(capsys, ONE_B, *ONE_GPU)
    assert code == 0, err
    assert "MFU: 40% guessed; --gpu NAME takes a measured one" in out


@pytest.mark.parametrize("content, needle", [
    ("{not json", "not JSON"),
    ('{"gpu": "NVIDIA H200"}', "expected a JSON list"),
    (json.dumps([{"gpu": "NVIDIA H200", "mfu": 0.5}]), "record 0 lacks model, seq_len"),
    (json.dumps([measured_record(mfu=48)]), "record 0: mfu must be in (0, 1]"),
    (None, "cannot read the measurements"),  # the file named does not exist
])
def test_plan_refuses_a_bad_measurements_file(capsys, tmp_path, content, needle):
    path = tmp_path / "measured.json"
    if content is not None:
        path.write_text(content)
    code, out, err = plan(capsys, ONE_B, *ONE_GPU, "--gpu", "NVIDIA H200", "--measured", path)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"llada: error: {path}: ") and needle in err, err


def test_plan_refuses_an_unknown_gpu(capsys):
    code, out, err = plan(capsys, ONE_B, *ONE_GPU, "--gpu", "H200")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "--gpu 'H200': unknown" in err and "NVIDIA H200" in err
