"""framework/checkpoint/reshard.py and saved_state.py on one-process checkpoints of a tiny model:
what is refused (one line, naming the file, the parameter or the layout), the weights of ZeRO-0
and ZeRO-3 checkpoints, which export reads, and that reading a parameter reads only its part of
the files. The multi-process layouts and continued runs: tests/distributed/test_reshard.py."""

import shutil

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from framework.config import load_config
from framework.model.weights import full_state_dict, shard
from framework.checkpoint.reshard import (FullState, Layout, ReshardError, load_full_state,
                                          load_resharded, read_full_state, read_weights)
from framework.checkpoint.saved_state import KINDS, SavedState
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


@pytest.fixture(scope="module")
def zero3(world, tmp_path_factory, small_dataset):
    return saved_run(tmp_path_factory.mktemp("zero3"), small_dataset, 3)


def one_line_error(fn, *args) -> str:
    with pytest.raises(ReshardError) as err:
        fn(*args)
    msg = str(err.value)
    assert "\n" not in msg and msg
    return msg


def live_of(engine) -> dict:
    """name -> {kind: the live fp32 value} of a ZeRO-1/2/3 engine, by DeepSpeed's accessors."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

    zero = engine.optimizer  # ZeRO-1/2 link the no-decay group's views only at a later step
    for lp_params, hp in zip(getattr(zero, "bit16_groups", ()),
                             getattr(zero, "single_partition_of_fp32_groups", ())):
        lazy_init_hp_params_optimizer_state(lp_params, hp, zero.optimizer.state)
    return {n: {"weights": safe_get_full_fp32_param(p).clone(),
                "exp_avg": safe_get_full_optimizer_state(p, "exp_avg").clone(),
                "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq").clone()}
            for n, p in engine.module.named_parameters()}


def test_an_unknown_zero_stage_is_named(tmp_path):
    msg = one_line_error(read_weights, tmp_path, Layout(tp=2, pp=1, dp=4, zero_stage=4))
    assert str(tmp_path) in msg and "unknown ZeRO stage 4" in msg


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


def edited_copy(tag_dir, to, edit):
    """A copy of a one-process ZeRO-1/2 checkpoint whose ``param_shapes`` went through ``edit``."""
    shutil.copytree(tag_dir, to)
    path = to / "mp_rank_00_model_states.pt"
    sd = torch.load(path, weights_only=False)
    sd["param_shapes"] = [dict(edit(list(group.items()))) for group in sd["param_shapes"]]
    torch.save(sd, path)
    return to


def test_load_names_a_missing_or_misshapen_parameter_and_changes_nothing(zero1, tmp_path):
    trainer, tag_dir, layout = zero1
    engine = trainer.engine
    state = read_full_state(tag_dir, layout)
    name = "2.layer.mlp.linear_fc1.weight"
    before = live_of(engine)

    missing = FullState({k: v for k, v in state.weights.items() if k != name}, state.exp_avg,
                        state.exp_avg_sq, state.step)
    msg = one_line_error(load_full_state, engine, engine.module, missing, 0, 1)
    assert f"parameter {name}: not in the checkpoint's weights" in msg

    misshapen = FullState(state.weights, {**state.exp_avg, name: state.exp_avg[name][:-1]},
                          state.exp_avg_sq, state.step)
    msg = one_line_error(load_full_state, engine, engine.module, misshapen, 0, 1)
    assert f"parameter {name}: the checkpoint's exp_avg have shape" in msg

    # from the files, the last parameter renamed, or a matrix transposed (the same numel)
    renamed = edited_copy(tag_dir, tmp_path / "renamed", lambda items: [
        (n if n != "5.output_layer.weight" else "5.other.weight", s) for n, s in items])
    msg = one_line_error(load_resharded, renamed, layout, engine, 0, 1)
    assert f"parameter 5.output_layer.weight: not in the checkpoint {renamed}" in msg
    transposed = edited_copy(tag_dir, tmp_path / "transposed", lambda items: [
        (n, s if n != name else torch.Size(reversed(s))) for n, s in items])
    msg = one_line_error(load_resharded, transposed, layout, engine, 0, 1)
    assert f"parameter {name}: the checkpoint's weights have shape (64, 256), this layout needs " \
           f"(256, 64)" in msg
    after = live_of(engine)
    assert all(torch.equal(after[n][k], v[k]) for n, v in before.items() for k in KINDS)


def test_zero0_weights_read(world, tmp_path, small_dataset):
    trainer, tag_dir, layout = saved_run(tmp_path, small_dataset, 0)
    want = full_state_dict(trainer.engine.module, 0)
    got = read_weights(tag_dir, layout)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[n], w) for n, w in want.items())


def test_zero3_weights_read(zero3):
    trainer, tag_dir, layout = zero3
    want = full_state_dict(trainer.engine.module, 3)
    got = read_weights(tag_dir, layout)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[n], w) for n, w in want.items())
    assert set(read_weights(tag_dir, layout, {"0.word_embeddings.weight"})) == \
        {"0.word_embeddings.weight"}


class FileReads(TorchDispatchMode):
    """Bytes that torch operations read out of the tensors of the given (memory-mapped) storages:
    a view reads nothing; anything else reads its whole input."""

    def __init__(self, storages: set):
        super().__init__()
        self.storages, self.bytes = storages, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            for t in tree_leaves((args, kwargs)):
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() in self.storages:
                    self.bytes += t.numel() * t.element_size()
        return func(*args, **(kwargs or {}))


def file_storages(saved: SavedState) -> set:
    """The storages of every tensor in the files the reader has opened."""
    found = set()

    def walk(x):
        if isinstance(x, torch.Tensor):
            found.add(x.untyped_storage().data_ptr())
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
    walk(list(saved._files.values()))
    return found


@pytest.mark.parametrize("which", ["zero1", "zero3"])
def test_reading_a_parameter_reads_only_its_part_of_the_files(request, which):
    trainer, tag_dir, layout = request.getfixturevalue(which)
    live = live_of(trainer.engine)
    saved = SavedState(tag_dir, layout)
    saved.check(saved.names)  # every file opened (mapped), before the reads are counted
    name = "3.layer.self_attention.linear_proj.weight"  # in the flat group of every matrix
    with FileReads(file_storages(saved)) as reads:
        got = {kind: saved.read(name, kind) for kind in KINDS}
    assert all(torch.equal(got[k], live[name][k]) for k in KINDS)
    assert 0 < reads.bytes <= 3 * live[name]["weights"].numel() * 4, reads.bytes
    # a matrix as the slice of tensor-parallel rank 1 of 2: cut from the saved tensor, no more
    matrix = "2.layer.mlp.linear_fc1.weight"
    with FileReads(file_storages(saved)) as reads:
        got = saved.read(matrix, "exp_avg", 1, 2)
    assert torch.equal(got, shard(matrix, live[matrix]["exp_avg"], 1, 2))
    assert reads.bytes <= live[matrix]["exp_avg"].numel() * 4
    # and all of them: the reads are all seen
    with FileReads(file_storages(saved)) as reads:
        for n in saved.names:
            for kind in KINDS:
                saved.read(n, kind)
    assert reads.bytes >= 3 * sum(v["weights"].numel() for v in live.values()) * 4
