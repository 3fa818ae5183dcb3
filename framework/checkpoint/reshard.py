"""Checkpoints as full, layout-independent tensors, and such a state loaded into an engine of
another layout (resharding: another data-, tensor- or pipeline-parallel size).

What is read here (the files' names and contents: framework/checkpoint/files.py): the fp32
master weights and Adam state of ZeRO-1/2 (exactly the trained values, bf16 or not), the module
weights of ZeRO-0, and DeepSpeed's zero_to_fp32 for ZeRO-3.

A flat group is its parameters flattened and concatenated in ``param_shapes`` order (plus any
per-parameter alignment padding), padded at the end to a multiple of 2 x DP and cut into DP equal
slices; so the slices of all ranks, concatenated, give the group back from its start, which is
also how DeepSpeed's zero_to_fp32 reads them. Names are global (framework/model/model.py), so
tensor-parallel slices only need joining (weights.unshard) and pipeline stages only merging.
"""

from __future__ import annotations

import contextlib
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch

from framework.checkpoint.files import model_states, optim_states
from framework.model.weights import full_shape, shard, split_dim, unshard

Tensors = Dict[str, torch.Tensor]
MOMENTS = ("exp_avg", "exp_avg_sq")


class ReshardError(RuntimeError):
    """A checkpoint cannot be read or loaded as asked. One line, names the file or the reason."""


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


# ----------------------------------------------------------------------------- files
def _model_file(tag_dir: Path, mp: int) -> Path:
    return tag_dir / model_states(mp)


def _optim_file(tag_dir: Path, dp: int, mp: int, bf16: bool) -> Path:
    return tag_dir / optim_states(dp, mp, bf16)


def _load(path: Path) -> dict:
    if not path.is_file():
        raise ReshardError(f"{path}: missing (the checkpoint is incomplete)")
    try:  # mmap: tensors are read when used, so a stage's reader touches only its own part
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # noqa: BLE001 - truncated or foreign files fail in many ways
        detail = str(e).splitlines()[0] if str(e) else ""
        raise ReshardError(f"{path}: unreadable ({type(e).__name__}: {detail})") from None


def _layout_text(layout: Layout) -> str:
    return f"tp={layout.tp}, pp={layout.pp}, dp={layout.dp}"


def _check_saved_layout(path: Path, sd: dict, layout: Layout) -> None:
    """The layout the caller names against what DeepSpeed recorded in the file: a mismatch would
    otherwise surface as missing files or, worse, wrongly joined tensors."""
    dims = sd.get("checkpoint_parallel_dimensions") or {}
    recorded = {"tp": dims.get("tp_degree"), "pp": dims.get("pp_degree"),
                "dp": sd.get("dp_world_size"),
                "zero_stage": (sd.get("ds_config") or {}).get("zero_optimization", {}).get("stage")}
    for key, value in recorded.items():
        if value is not None and value != getattr(layout, key):
            raise ReshardError(f"{path}: saved with {key}={value}, but the layout says "
                               f"{key}={getattr(layout, key)}")


def _is_bf16(sd: dict) -> bool:
    return bool((sd.get("ds_config") or {}).get("bf16", {}).get("enabled", False))


# ----------------------------------------------------------------------------- ZeRO-1/2 partitions
def _adam_state(optim_sd: dict, group: int) -> dict:
    """The Adam state of one flat group's slice: a torch state_dict (the default) or DeepSpeed's
    'elastic' list of per-group states. Empty when no step was ever applied."""
    base = optim_sd["base_optimizer_state"]
    states = base["state"] if isinstance(base, dict) else dict(enumerate(base))
    return states.get(group, {})


def _read_partitions(tag_dir: Path, layout: Layout, mp: int, model_sd: dict, wanted: set,
                     moments: bool) -> tuple[Dict[str, Tensors], int]:
    """{"fp32"[, "exp_avg", "exp_avg_sq"]} -> {name: full-size tensor of this model-parallel
    rank} for the wanted names, joined from every data-parallel rank's slice; and Adam's step."""
    bf16 = _is_bf16(model_sd)
    files = [_optim_file(tag_dir, d, mp, bf16) for d in range(layout.dp)]
    parts = [_load(f)["optimizer_state_dict"] for f in files]
    for f, p in zip(files, parts):
        count = p.get("partition_count")
        count = max(count) if isinstance(count, list) else count
        if count != layout.dp:
            raise ReshardError(f"{f}: partitioned over {count} data-parallel ranks, but the "
                               f"layout says dp={layout.dp}")
    keys = ("fp32", *MOMENTS) if moments else ("fp32",)
    out: Dict[str, Tensors] = {k: {} for k in keys}
    paddings = parts[0].get("param_alignment_paddings")
    for g, shapes in enumerate(model_sd["param_shapes"]):
        flat = {"fp32": torch.cat([p["single_partition_of_fp32_groups"][g] for p in parts])}
        states = [_adam_state(p, g) for p in parts]
        for key in keys[1:]:  # never stepped: Adam's zeros
            flat[key] = (torch.cat([s[key] for s in states]) if all(states)
                         else torch.zeros_like(flat["fp32"]))
        offset = 0
        for j, (name, shape) in enumerate(shapes.items()):
            numel = math.prod(shape)
            if offset + numel > flat["fp32"].numel():
                raise ReshardError(f"{files[0].parent}: the optimizer slices of model-parallel "
                                   f"rank {mp} hold {flat['fp32'].numel()} values of group {g}, "
                                   f"fewer than its parameters need")
            if name in wanted:  # clone: the flat group is released once the stage is read
                for key in keys:
                    out[key][name] = flat[key].narrow(0, offset, numel).view(shape).float().clone()
            offset += numel + (paddings[g][j] if paddings else 0)
    state0 = _adam_state(parts[0], 0)
    step = int(state0["step"]) if "step" in state0 else 0
    return out, step


def _read_zero12(tag_dir: Path, layout: Layout, names: Optional[set], moments: bool
                 ) -> tuple[Dict[str, Tensors], int]:
    """Every model-parallel rank's partitions, tensor-parallel slices joined."""
    slices: Dict[str, Dict[str, List[torch.Tensor]]] = {}
    step = 0
    for pp_rank in range(layout.pp):
        for tp_rank in range(layout.tp):
            mp = pp_rank * layout.tp + tp_rank
            path = _model_file(tag_dir, mp)
            model_sd = _load(path)
            _check_saved_layout(path, model_sd, layout)
            if not model_sd.get("param_shapes"):
                raise ReshardError(f"{path}: no param_shapes (not a ZeRO-1/2 checkpoint)")
            in_stage = [n for group in model_sd["param_shapes"] for n in group]
            # a replicated tensor (norm gains) is the same on every tensor-parallel rank: rank 0's
            wanted = {n for n in in_stage if (names is None or n in names)
                      and (tp_rank == 0 or split_dim(n) is not None)}
            if not wanted:  # another pipeline stage's parameters: its files are not opened
                continue
            parts, step = _read_partitions(tag_dir, layout, mp, model_sd, wanted, moments)
            for key, tensors in parts.items():
                for name, t in tensors.items():
                    slices.setdefault(key, {}).setdefault(name, []).append(t)
    full = {key: {name: unshard(name, ts) for name, ts in by_name.items()}
            for key, by_name in slices.items()}
    return full, step


# ----------------------------------------------------------------------------- public API
def _unsupported(layout: Layout, what: str) -> ReshardError:
    return ReshardError(f"{what} a ZeRO-{layout.zero_stage} checkpoint is not supported; resume "
                        f"it with the layout it was saved under ({_layout_text(layout)})")


def read_weights(tag_dir: Path, layout: Layout, names: Optional[set] = None) -> Tensors:
    """Full fp32 weights by global name (only ``names`` when given). ZeRO-1/2: the fp32 master
    weights from the optimizer slices (bitwise the trained values, also under bf16); ZeRO-0: the
    module weights (bf16 ones widened); ZeRO-3: DeepSpeed's zero_to_fp32, for tp=1 only."""
    tag_dir = Path(tag_dir)
    if layout.zero_stage in (1, 2):
        full, _ = _read_zero12(tag_dir, layout, names, moments=False)
        return full.get("fp32", {})
    if layout.zero_stage == 0:
        return _read_module_weights(tag_dir, layout, names)
    if layout.zero_stage == 3:
        return _read_zero3_weights(tag_dir, layout, names)
    raise ReshardError(f"{tag_dir}: unknown ZeRO stage {layout.zero_stage}")


def _read_module_weights(tag_dir: Path, layout: Layout, names: Optional[set]) -> Tensors:
    if layout.pp > 1:  # pipeline stages write per-layer files; our config pairs them with ZeRO-1
        raise ReshardError(f"{tag_dir}: reading a ZeRO-0 checkpoint saved with pipeline "
                           f"parallelism (pp={layout.pp}) is not supported")
    slices: Dict[str, List[torch.Tensor]] = {}
    for tp_rank in range(layout.tp):
        path = _model_file(tag_dir, tp_rank)
        sd = _load(path)
        _check_saved_layout(path, sd, layout)
        buffers = set(sd.get("buffer_names") or ())
        for name, t in sd["module"].items():
            wanted = names is None or name in names
            if not torch.is_tensor(t) or name in buffers or not wanted:
                continue  # megatron's _extra_state entries, buffers, other names
            if tp_rank == 0 or split_dim(name) is not None:
                slices.setdefault(name, []).append(t.float())
    return {name: unshard(name, ts) for name, ts in slices.items()}


def _read_zero3_weights(tag_dir: Path, layout: Layout, names: Optional[set]) -> Tensors:
    if layout.tp > 1 or layout.pp > 1:
        raise ReshardError(f"{tag_dir}: reading a ZeRO-3 checkpoint saved with tensor or pipeline "
                           f"parallelism ({_layout_text(layout)}) is not supported")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    try:
        # it reports its progress on stdout and stderr (tqdm); errors come back as exceptions
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            sd = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    except (OSError, ValueError, RuntimeError) as e:
        raise ReshardError(f"{tag_dir}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                           ) from None
    return {n: t.float() for n, t in sd.items() if names is None or n in names}


def read_full_state(tag_dir: Path, layout: Layout, names: Optional[set] = None) -> FullState:
    """Full fp32 master weights, Adam moments and step of a ZeRO-1/2 checkpoint (fp32 or bf16),
    only for ``names`` when given (a pipeline stage needs only its own). ZeRO-0 and ZeRO-3
    checkpoints are refused: their optimizer state is laid out otherwise."""
    tag_dir = Path(tag_dir)
    if layout.zero_stage not in (1, 2):
        raise _unsupported(layout, "resharding")
    full, step = _read_zero12(tag_dir, layout, names, moments=True)
    return FullState(weights=full.get("fp32", {}), exp_avg=full.get("exp_avg", {}),
                     exp_avg_sq=full.get("exp_avg_sq", {}), step=step)


def load_full_state(engine, model: torch.nn.Module, state: FullState, tp_rank: int, tp: int
                    ) -> None:
    """Into a live ZeRO-1/2 engine of any layout: each local parameter's module weight (this
    tensor-parallel rank's slice, in the module's precision), fp32 master weight and Adam moments
    (this data-parallel rank's part, through DeepSpeed's safe_set_* helpers), and Adam's step.
    ``model`` is the engine's module; its names may carry a "module." prefix."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    zero = engine.optimizer
    if not isinstance(zero, DeepSpeedZeroOptimizer):
        raise ReshardError(f"loading a resharded state needs a ZeRO-1/2 engine; this one is "
                           f"ZeRO-{engine.zero_optimization_stage()} "
                           f"({type(zero).__name__})")
    params = [(n.removeprefix("module."), p) for n, p in model.named_parameters()]
    for name, p in params:  # all checked before anything changes
        expect = full_shape(name, p.shape, tp)
        for kind in ("weights", *MOMENTS):
            tensors = getattr(state, kind)
            if name not in tensors:
                raise ReshardError(f"parameter {name}: not in the checkpoint's {kind}")
            if tensors[name].shape != expect:
                raise ReshardError(f"parameter {name}: the checkpoint's {kind} have shape "
                                   f"{tuple(tensors[name].shape)}, this layout needs "
                                   f"{tuple(expect)}")
    _prepare_adam_state(zero, state.step)
    with torch.no_grad():
        for name, p in params:
            weight = shard(name, state.weights[name], tp_rank, tp)
            p.data.copy_(weight)  # the module's (bit16 or fp32) copy, a view of ZeRO's flat buffer
            safe_set_full_fp32_param(p, weight)
            for key in MOMENTS:
                moment = shard(name, getattr(state, key)[name], tp_rank, tp)
                safe_set_full_optimizer_state(p, moment, key)


def _prepare_adam_state(zero, step: int) -> None:
    """Adam's state for each flat fp32 slice, with the given step, and DeepSpeed's per-parameter
    views into it (which safe_set_full_optimizer_state writes through). torch creates the state at
    the first step, so a freshly built engine has none; and ZeRO links the views once, right after
    its first group's first step, when the later groups have no state yet: so every group is
    linked here (ZeRO's own link after the next step finds these same tensors)."""
    from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

    adam = zero.optimizer
    for group, lp_params, hp in zip(adam.param_groups, zero.bit16_groups,
                                    zero.single_partition_of_fp32_groups):
        st = adam.state[hp]
        for key in MOMENTS:
            st.setdefault(key, torch.zeros_like(hp, memory_format=torch.preserve_format))
        if "step" in st:
            st["step"].fill_(float(step))
        else:  # as torch.optim.AdamW makes it: on the device only for fused/capturable
            on_device = group.get("fused") or group.get("capturable")
            st["step"] = torch.tensor(float(step), dtype=torch.float32,
                                      device=hp.device if on_device else "cpu")
        lazy_init_hp_params_optimizer_state(lp_params, hp, adam.state)
