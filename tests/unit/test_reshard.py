"""framework/checkpoint/reshard.py on one-process checkpoints of a tiny model: what is refused (one line,
naming the file, the parameter or the layout to resume with), and the weights of ZeRO-0 and
ZeRO-3 checkpoints, which export reads. The multi-process layouts: tests/distributed/."""

import shutil

import pytest
import torch

from framework.config import load_config
from framework.model.weights import full_state_dict
from framework.checkpoint.reshard import (FullState, Layout, ReshardError, load_full_state, read_full_state,
                               read_weights)
from framework.training.factory import build_trainer
from tests.conftest import DEBUG_RECIPE
from tests.distributed.layout_worker import layout_overrides

TAG = "t"


def saved_run(run_dir, dataset, zero_stage: int):
    """A trainer after one step, saved; with the checkpoint's tag directory and layout."""
    cfg = load_config(DEBUG_RECIPE, layout_overrides(run_dir, dataset,
                                                     [f"deepspeed.zero_stage={zero_stage}"]))
    trainer = build_trainer(cfg)
    trainer.train_step()
    trainer.data.close()
    trainer.engine.save_checkpoint(str(run_dir / "ckpt"), tag=TAG, client_state={"step": 1})
    return trainer, run_dir / "ckpt" / TAG, Layout(tp=1, pp=1, dp=1, zero_stage=zero_stage)


@pytest.fixture(scope="module")
def zero1(world, tmp_path_factory, small_dataset):
    return saved_run(tmp_path_factory.mktemp("zero1"), small_dataset, 1)


def one_line_error(fn, *args) -> str:
    with pytest.raises(ReshardError) as err:
        fn(*args)
    msg = str(err.value)
    assert "\n" not in msg and msg
    return msg


@pytest.mark.parametrize("stage", [0, 3])
def test_resharding_zero0_and_zero3_is_refused_naming_the_layout(tmp_path, stage):
    msg = one_line_error(read_full_state, tmp_path, Layout(tp=2, pp=1, dp=4, zero_stage=stage))
    assert f"ZeRO-{stage} checkpoint is not supported" in msg
    assert "resume it with the layout it was saved under (tp=2, pp=1, dp=4)" in msg


def test_zero3_weights_with_tensor_parallelism_are_refused(tmp_path):
    msg = one_line_error(read_weights, tmp_path, Layout(tp=2, pp=1, dp=2, zero_stage=3))
    assert "ZeRO-3" in msg and "tp=2" in msg


@pytest.mark.parametrize("victim", ["zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                    "mp_rank_00_model_states.pt"])
def test_a_missing_shard_file_is_named(zero1, tmp_path, victim):
    _, tag_dir, layout = zero1
    copy = tmp_path / TAG
    shutil.copytree(tag_dir, copy)
    (copy / victim).unlink()
    for read in (read_full_state, read_weights):
        msg = one_line_error(read, copy, layout)
        assert str(copy / victim) in msg and "missing" in msg


def test_a_truncated_shard_file_is_named(zero1, tmp_path):
    _, tag_dir, layout = zero1
    copy = tmp_path / TAG
    shutil.copytree(tag_dir, copy)
    victim = copy / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    victim.write_bytes(victim.read_bytes()[:1000])
    msg = one_line_error(read_full_state, copy, layout)
    assert str(victim) in msg and "unreadable" in msg


def test_a_wrong_layout_is_named(zero1):
    _, tag_dir, _ = zero1
    msg = one_line_error(read_full_state, tag_dir, Layout(tp=1, pp=1, dp=2, zero_stage=1))
    assert "mp_rank_00_model_states.pt: saved with dp=1, but the layout says dp=2" in msg


def test_load_names_a_missing_or_misshapen_parameter_and_changes_nothing(zero1):
    from deepspeed.utils import safe_get_full_fp32_param

    trainer, tag_dir, layout = zero1
    engine = trainer.engine
    state = read_full_state(tag_dir, layout)
    name = "2.layer.mlp.linear_fc1.weight"
    param = dict(engine.module.named_parameters())[name]
    before = safe_get_full_fp32_param(param).clone()

    missing = FullState({k: v for k, v in state.weights.items() if k != name}, state.exp_avg,
                        state.exp_avg_sq, state.step)
    msg = one_line_error(load_full_state, engine, engine.module, missing, 0, 1)
    assert f"parameter {name}: not in the checkpoint's weights" in msg

    misshapen = FullState(state.weights, {**state.exp_avg, name: state.exp_avg[name][:-1]},
                          state.exp_avg_sq, state.step)
    msg = one_line_error(load_full_state, engine, engine.module, misshapen, 0, 1)
    assert f"parameter {name}: the checkpoint's exp_avg have shape" in msg
    assert torch.equal(safe_get_full_fp32_param(param), before)


def test_zero0_weights_read_and_its_engine_refuses_a_load(world, tmp_path, small_dataset, zero1):
    trainer, tag_dir, layout = saved_run(tmp_path, small_dataset, 0)
    want = full_state_dict(trainer.engine.module, 0)
    got = read_weights(tag_dir, layout)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[n], w) for n, w in want.items())
    state = read_full_state(zero1[1], zero1[2])
    msg = one_line_error(load_full_state, trainer.engine, trainer.engine.module, state, 0, 1)
    assert "needs a ZeRO-1/2 engine; this one is ZeRO-0" in msg


def test_zero3_weights_read(world, tmp_path, small_dataset):
    trainer, tag_dir, layout = saved_run(tmp_path, small_dataset, 3)
    want = full_state_dict(trainer.engine.module, 3)
    got = read_weights(tag_dir, layout)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[n], w) for n, w in want.items())
    assert set(read_weights(tag_dir, layout, {"0.word_embeddings.weight"})) == \
        {"0.word_embeddings.weight"}
