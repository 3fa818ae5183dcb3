"""One process of the runs of test_reshard.py, started by torchrun: for each layout in turn, train
STEPS optimizer steps, save a DeepSpeed checkpoint and record the live state (fp32 master weights,
Adam moments and step, gathered from every ZeRO partition, tensor slice and stage); then wipe
that state, load the checkpoint back through framework.checkpoint.reshard.load_resharded (each
rank reading only its own stage's parameters), record it again, and take STEPS more steps. A
layout named in CROSS_JSON then loads an earlier layout's checkpoint (another layout, ZeRO stage)
over its trained state and records that too. Rank 0 saves the records and the losses of the
last steps.

    python -m torch.distributed.run --nproc-per-node N -m tests.distributed.reshard_worker \
        OUT_DIR MANIFEST LAYOUTS_JSON [CROSS_JSON]
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from framework.config import load_config
from framework.model.weights import split_dim, unshard
from framework.checkpoint.reshard import MOMENTS, FullState, Layout, load_resharded
from framework.training.factory import build_trainer
from tests.conftest import DEBUG_RECIPE
from tests.distributed.layout_worker import layout_overrides, reset_parallel_state

STEPS = 2  # before the checkpoint, and again after it
TAG = "t"


def overrides(run_dir: Path, manifest: Path, extra: list) -> list:
    # the tiny model and the 2 data readers of the layout tests; a schedule long enough for both
    return layout_overrides(run_dir, manifest, [*extra, f"train.steps={2 * STEPS}"])


def _state_of(engine):
    """(param -> {kind: this rank's full fp32 tensor}, Adam's step) by DeepSpeed's own accessors
    where it has them (ZeRO-1/2/3; collective over the data-parallel group), else from the
    optimizer's own tensors (ZeRO-0: torch AdamW, or FP16_UnfusedOptimizer under bf16)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

    zero = engine.optimizer
    if hasattr(zero, "single_partition_of_fp32_groups"):  # ZeRO-1/2
        # ZeRO-1/2 step their param groups one at a time and link each parameter's view into
        # the Adam state right after the *first* group's step, before the later groups have any
        # state; so safe_get_full_optimizer_state fails for the no-decay group unless linked again
        for lp_params, hp in zip(zero.bit16_groups, zero.single_partition_of_fp32_groups):
            lazy_init_hp_params_optimizer_state(lp_params, hp, zero.optimizer.state)
        step = zero.optimizer.state[zero.single_partition_of_fp32_groups[0]]["step"]
    elif hasattr(zero, "fp32_partitioned_groups_flat"):  # ZeRO-3
        step = zero.optimizer.state[zero.fp32_partitioned_groups_flat[0]]["step"]
    else:  # ZeRO-0
        adam = getattr(zero, "optimizer", zero)
        master = {id(lp): hp for lps, hps in zip(zero.fp16_groups, zero.fp32_groups)
                  for lp, hp in zip(lps, hps)} if adam is not zero else {}
        hps = {p: master.get(id(p), p) for p in engine.module.parameters()}
        step = adam.state[next(iter(hps.values()))]["step"]
        return (lambda p: {"weights": hps[p], **{k: adam.state[hps[p]][k] for k in MOMENTS}},
                int(step))
    return (lambda p: {"weights": safe_get_full_fp32_param(p),
                       **{k: safe_get_full_optimizer_state(p, k) for k in MOMENTS}}, int(step))


def live_state(engine) -> Optional[FullState]:
    """The engine's fp32 master weights, Adam moments and step as full tensors, on global rank 0
    (None on the others). Collective: every rank calls it."""
    values_of, step = _state_of(engine)
    tp, tp_group = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_group()
    local = {"weights": {}, **{key: {} for key in MOMENTS}}
    for name, p in engine.module.named_parameters():
        name = name.removeprefix("module.")
        for kind, t in values_of(p).items():
            t = t.detach().float().cpu().clone()
            if tp > 1 and split_dim(name) is not None:
                parts = [torch.empty_like(t) for _ in range(tp)]
                dist.all_gather(parts, t.contiguous(), group=tp_group)
                t = unshard(name, parts)
            local[kind][name] = t
    # one copy per pipeline stage goes to rank 0
    mine = local if ps.get_tensor_model_parallel_rank() == 0 and \
        ps.get_data_parallel_rank() == 0 else None
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    if dist.get_rank() != 0:
        return None
    merged = {kind: {} for kind in local}
    for part in filter(None, gathered):
        for kind, tensors in part.items():
            merged[kind].update(tensors)
    return FullState(**merged, step=step)


def wipe(engine) -> None:
    """Zero every weight, master weight, moment and the step, so that a load must restore all."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.utils import (safe_set_full_fp32_param, safe_set_full_optimizer_state,
                                 safe_set_local_fp32_param, safe_set_local_optimizer_state)

    zero = engine.optimizer
    adam = getattr(zero, "optimizer", zero)
    with torch.no_grad():
        for p in engine.module.parameters():
            p.data.zero_()
            if hasattr(p, "ds_tensor"):  # ZeRO-3: this rank's partitions
                p.ds_tensor.data.zero_()
                zeros = torch.zeros(p.ds_tensor.numel())
                safe_set_local_fp32_param(p, zeros)
                for key in MOMENTS:
                    safe_set_local_optimizer_state(p, zeros, key)
            elif hasattr(zero, "single_partition_of_fp32_groups"):  # ZeRO-1/2
                zeros = torch.zeros(p.shape, dtype=torch.float32)
                safe_set_full_fp32_param(p, zeros)
                for key in MOMENTS:
                    safe_set_full_optimizer_state(p, zeros, key)
        if isinstance(zero, FP16_UnfusedOptimizer):  # ZeRO-0, bf16: the fp32 masters
            for hp in (hp for group in zero.fp32_groups for hp in group):
                hp.data.zero_()
        for state in adam.state.values():  # ZeRO-0's moments, and everyone's step
            for t in state.values():
                t.zero_()


def run_layout(out: Path, manifest: Path, name: str, extra: list, cross: Optional[str]) -> None:
    cfg = load_config(DEBUG_RECIPE, overrides(out / name, manifest, extra))
    reset_parallel_state(cfg)
    trainer = build_trainer(cfg)
    engine, world = trainer.engine, trainer.world
    for _ in range(STEPS):
        trainer.train_step()
    root = out / name / "ckpt"
    engine.save_checkpoint(str(root), tag=TAG, client_state={"step": STEPS})
    dist.barrier()
    live = live_state(engine)

    wipe(engine)
    layout = Layout(tp=world.tp, pp=world.pp, dp=world.dp, zero_stage=cfg.deepspeed.zero_stage)
    load_resharded(root / TAG, layout, engine, world.tp_rank, world.tp)
    record = {"live": live, "reloaded": live_state(engine), "layout": layout}

    record["losses"] = [trainer.train_step().loss for _ in range(STEPS)]
    trainer.data.close()
    if cross is not None:  # over the state trained since: the load must replace all of it
        source = torch.load(out / f"{cross}.pt", weights_only=False)["layout"]
        load_resharded(out / cross / "ckpt" / TAG, source, engine, world.tp_rank, world.tp)
        record["cross"] = live_state(engine)
    if dist.get_rank() == 0:
        torch.save(record, out / f"{name}.pt")
    del trainer, engine
    gc.collect()
    dist.barrier()


def main(out: str, manifest: str, layouts: str, cross: str = "{}") -> None:
    cross = json.loads(cross)
    for name, extra in json.loads(layouts).items():
        run_layout(Path(out), Path(manifest), name, extra, cross.get(name))
    from framework.parallel.world import shutdown_world
    shutdown_world()


if __name__ == "__main__":
    main(*sys.argv[1:])
