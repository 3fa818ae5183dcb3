"""A checkpoint loaded into an engine of another layout (resharding: another data-, tensor- or
pipeline-parallel size, ZeRO stage or precision), and checkpoints as full, layout-independent
tensors (export, init.from, the tests).

Both go through framework/checkpoint/saved_state.py, which reads one parameter at a time from the
memory-mapped files of any ZeRO stage 0-3: a load reads, for each of the engine's own parameters
in turn, this tensor-parallel rank's slice of its fp32 master weight and Adam moments and writes
this rank's part of them into the engine, so a rank never holds more than one parameter's state
beyond its own. Names are global (framework/model/model.py), so tensor-parallel slices only need
joining (weights.unshard) and pipeline stages only merging.

Into each kind of engine (DeepSpeed 0.19.8):
- ZeRO-1/2 (DeepSpeedZeroOptimizer): the module's weight, and the fp32 master weight and moments
  through DeepSpeed's safe_set_full_* (each rank keeps its slice of the flat groups).
- ZeRO-3 (DeepSpeedZeroOptimizer_Stage3): this rank's partition of each parameter (padded to a
  multiple of the data-parallel size, as DeepSpeed cuts it) into the module's partition
  (``ds_tensor``), and through safe_set_local_* into the fp32 master and moments; a parameter that
  ZeRO-3 keeps gathered (persistent, small) also in full.
- ZeRO-0: torch AdamW on the module's own parameters (fp32), or FP16_UnfusedOptimizer (bf16) with
  an fp32 master per parameter; the state written directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import torch

from framework.checkpoint.saved_state import KINDS, MOMENTS, ReshardError, SavedState
from framework.model.weights import full_shape, shard

Tensors = Dict[str, torch.Tensor]
__all__ = ["FullState", "Layout", "MOMENTS", "ReshardError", "load_full_state", "load_resharded",
           "read_full_state", "read_weights"]


@dataclass(frozen=True)
class Layout:
    """The layout a checkpoint was saved under (from our checkpoint metadata)."""
    tp: int
    pp: int
    dp: int
    zero_stage: int

    @classmethod
    def saved(cls, layout: dict) -> "Layout":
        """From the ``layout`` of a checkpoint's meta.json."""
        return cls(tp=layout["tp"], pp=layout["pp"], dp=layout["dp"],
                   zero_stage=layout["zero_stage"])


@dataclass
class FullState:
    """Model and optimizer as one process would hold them, by global parameter name."""
    weights: Tensors  # fp32 master weights
    exp_avg: Tensors
    exp_avg_sq: Tensors
    step: int  # Adam's step count (steps applied; skipped ones are not counted)


# ----------------------------------------------------------------------------- full tensors
def read_weights(tag_dir: Path, layout: Layout, names: Optional[set] = None) -> Tensors:
    """Full fp32 master weights by global name (only ``names`` when given), of a checkpoint of
    any ZeRO stage and layout: bitwise the trained values, also under bf16."""
    saved = SavedState(tag_dir, layout)
    try:
        return {n: saved.read(n, "weights") for n in saved.names if names is None or n in names}
    finally:
        saved.close()


def read_full_state(tag_dir: Path, layout: Layout, names: Optional[set] = None) -> FullState:
    """Full fp32 master weights, Adam moments and step (only for ``names`` when given) of a
    checkpoint of any ZeRO stage and layout. The whole model's state at once: a load reads per
    parameter instead (load_resharded)."""
    saved = SavedState(tag_dir, layout)
    try:
        wanted = [n for n in saved.names if names is None or n in names]
        saved.check(wanted)
        full = {kind: {n: saved.read(n, kind) for n in wanted} for kind in KINDS}
        return FullState(**full, step=saved.step(wanted[0]) if wanted else 0)
    finally:
        saved.close()


# ----------------------------------------------------------------------------- loading
def load_resharded(tag_dir: Path, saved: Layout, engine, tp_rank: int, tp: int) -> None:
    """Into a live DeepSpeed engine of any ZeRO stage, precision and layout (its module may be a
    pipeline stage: only its own parameters are read): each local parameter's module weight (this
    tensor-parallel rank's slice, in the module's dtype), fp32 master weight, both Adam moments
    (this data-parallel rank's part) and Adam's step, read one parameter at a time. Everything is
    checked before anything changes; ReshardError names the file or the parameter."""
    state = SavedState(tag_dir, saved)
    try:
        _load(_StateSource(state), engine, engine.module, tp_rank, tp)
    finally:
        state.close()


def load_full_state(engine, model: torch.nn.Module, state: FullState, tp_rank: int, tp: int
                    ) -> None:
    """A FullState (full tensors) into a live engine of any ZeRO stage and layout, as
    load_resharded does. ``model`` is the engine's module."""
    _load(_FullSource(state), engine, model, tp_rank, tp)


class _StateSource:
    """What a load reads: from a saved checkpoint, per parameter."""

    def __init__(self, state: SavedState):
        self.state = state

    def check(self, names, shapes: Dict[str, torch.Size]) -> int:
        """Every name there with the given full shape; returns Adam's step."""
        self.state.check(names)
        for name in names:
            if self.state.shape(name) != shapes[name]:
                raise ReshardError(f"parameter {name}: the checkpoint's weights have shape "
                                   f"{tuple(self.state.shape(name))}, this layout needs "
                                   f"{tuple(shapes[name])}")
        return self.state.step(names[0]) if names else 0

    def read(self, name: str, kind: str, tp_rank: int, tp: int) -> torch.Tensor:
        return self.state.read(name, kind, tp_rank, tp)


class _FullSource:
    """What a load reads: full tensors already in memory."""

    def __init__(self, state: FullState):
        self.state = state

    def check(self, names, shapes: Dict[str, torch.Size]) -> int:
        for name in names:
            for kind in KINDS:
                tensors = getattr(self.state, kind)
                if name not in tensors:
                    raise ReshardError(f"parameter {name}: not in the checkpoint's {kind}")
                if tensors[name].shape != shapes[name]:
                    raise ReshardError(f"parameter {name}: the checkpoint's {kind} have shape "
                                       f"{tuple(tensors[name].shape)}, this layout needs "
                                       f"{tuple(shapes[name])}")
        return self.state.step

    def read(self, name: str, kind: str, tp_rank: int, tp: int) -> torch.Tensor:
        return shard(name, getattr(self.state, kind)[name], tp_rank, tp)


def _load(source, engine, module: torch.nn.Module, tp_rank: int, tp: int) -> None:
    """``module``'s parameters (names may carry a "module." prefix) from ``source``."""
    target = _target(engine)
    params = [(n.removeprefix("module."), p) for n, p in module.named_parameters()]
    shapes = {n: full_shape(n, target.local_shape(p), tp) for n, p in params}
    step = source.check([n for n, _ in params], shapes)  # all checked before anything changes
    target.prepare(step)
    with torch.no_grad():
        for name, p in params:
            target.load(p, {kind: source.read(name, kind, tp_rank, tp) for kind in KINDS})


# ----------------------------------------------------------------------------- engines
def _target(engine):
    """The writer for the engine's optimizer; ReshardError for one we cannot load into."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    opt = engine.optimizer
    if isinstance(opt, DeepSpeedZeroOptimizer):
        return _Zero12Target(opt)
    if isinstance(opt, DeepSpeedZeroOptimizer_Stage3):
        return _Zero3Target(opt)
    if isinstance(opt, FP16_UnfusedOptimizer):
        return _Zero0Target(opt.optimizer, {id(lp): hp for lps, hps in zip(opt.fp16_groups,
                                                                           opt.fp32_groups)
                                            for lp, hp in zip(lps, hps)})
    if isinstance(opt, torch.optim.AdamW):
        return _Zero0Target(opt)
    raise ReshardError(f"loading a resharded state into a ZeRO-{engine.zero_optimization_stage()}"
                       f" engine with a {type(opt).__name__} optimizer is not supported")


def _adam_state(adam: torch.optim.Optimizer, hp: torch.Tensor, group: dict, step: int) -> dict:
    """Adam's state of one fp32 tensor (a parameter or a flat slice), created as torch.optim.AdamW
    makes it at its first step when there is none yet (a freshly built engine), with ``step``."""
    st = adam.state[hp]
    for key in MOMENTS:
        st.setdefault(key, torch.zeros_like(hp, memory_format=torch.preserve_format))
    if "step" in st:
        st["step"].fill_(float(step))
    else:  # on the device only for fused/capturable
        on_device = group.get("fused") or group.get("capturable")
        st["step"] = torch.tensor(float(step), dtype=torch.float32,
                                  device=hp.device if on_device else "cpu")
    return st


class _Zero0Target:
    """ZeRO-0: the optimizer on the module's own parameters. fp32: torch AdamW, each parameter
    its own master; bf16: DeepSpeed's FP16_UnfusedOptimizer, an fp32 master per parameter
    (``masters``: module parameter's id -> its master)."""

    def __init__(self, adam: torch.optim.Optimizer, masters: Optional[dict] = None):
        self.adam, self.masters = adam, masters or {}

    def local_shape(self, p) -> torch.Size:
        return p.shape

    def prepare(self, step: int) -> None:
        for group in self.adam.param_groups:
            for hp in group["params"]:
                _adam_state(self.adam, hp, group, step)

    def load(self, p, values: Tensors) -> None:
        hp = self.masters.get(id(p), p)
        p.data.copy_(values["weights"])  # bf16: rounded, as the optimizer's step would
        if hp is not p:
            hp.data.copy_(values["weights"])
        for key in MOMENTS:
            self.adam.state[hp][key].copy_(values[key])


class _Zero12Target:
    """ZeRO-1/2: each rank's slice of flat fp32 groups, written through DeepSpeed's helpers."""

    def __init__(self, zero):
        self.zero = zero

    def local_shape(self, p) -> torch.Size:
        return p.shape

    def prepare(self, step: int) -> None:
        """Adam's state for each flat fp32 slice, and DeepSpeed's per-parameter views into it
        (which safe_set_full_optimizer_state writes through). ZeRO links the views once, right
        after its first group's first step, when the later groups have no state yet: so every
        group is linked here (ZeRO's own link after the next step finds these same tensors)."""
        from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

        zero, adam = self.zero, self.zero.optimizer
        for group, lp_params, hp in zip(adam.param_groups, zero.bit16_groups,
                                        zero.single_partition_of_fp32_groups):
            _adam_state(adam, hp, group, step)
            lazy_init_hp_params_optimizer_state(lp_params, hp, adam.state)

    def load(self, p, values: Tensors) -> None:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        p.data.copy_(values["weights"])  # the module's copy, a view of ZeRO's flat buffer
        safe_set_full_fp32_param(p, values["weights"])
        for key in MOMENTS:
            safe_set_full_optimizer_state(p, values[key], key)


class _Zero3Target:
    """ZeRO-3: each parameter's partition on this rank, written through DeepSpeed's local
    helpers (its full-tensor setters cut the last partition without its padding)."""

    def __init__(self, zero):
        self.zero = zero

    def local_shape(self, p) -> torch.Size:
        return p.ds_shape

    def prepare(self, step: int) -> None:
        zero, adam = self.zero, self.zero.optimizer
        # the fp32 sub-groups join the base optimizer's groups only while it steps
        for i, hp in enumerate(zero.fp32_partitioned_groups_flat):
            _adam_state(adam, hp, adam.param_groups[zero.sub_group_to_group_id[i]], step)

    def _mine(self, p, full: torch.Tensor) -> torch.Tensor:
        """This rank's partition of a full tensor: DeepSpeed pads it to a multiple of the
        partition count and gives rank r the r-th equal piece (partition_parameters.py)."""
        import torch.distributed as dist

        group = getattr(p, "ds_process_group", self.zero.dp_process_group)
        rank, size = dist.get_rank(group=group), p.ds_tensor.numel()
        flat = full.reshape(-1)
        piece = flat[rank * size:(rank + 1) * size]
        return torch.cat([piece, flat.new_zeros(size - piece.numel())]) \
            if piece.numel() < size else piece

    def load(self, p, values: Tensors) -> None:
        from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

        weights, mine = values["weights"], self._mine(p, values["weights"])
        p.ds_tensor.data.copy_(mine)  # the module's partition (bf16: rounded)
        if p.data.numel() == p.ds_numel:  # gathered (persistent): the module's full copy too
            p.data.copy_(weights.view(p.data.shape))
        safe_set_local_fp32_param(p, mine)
        for key in MOMENTS:
            safe_set_local_optimizer_state(p, self._mine(p, values[key]), key)
