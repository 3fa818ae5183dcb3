"""A saved DeepSpeed checkpoint read one parameter at a time: for a global parameter name, its
fp32 master weight, Adam moments (exp_avg, exp_avg_sq) and Adam's step, as the full tensor or as
one tensor-parallel slice of another tensor-parallel size, from a checkpoint of any ZeRO stage,
tensor-, pipeline- and data-parallel size, fp32 or bf16.

Every file is opened once, memory-mapped (``torch.load(mmap=True)``), and only the stretches of
flat partitions that hold the parameter asked for are copied out: reading a parameter costs about
that parameter (a tensor-parallel slice of it, when asked for one), never the model. So a rank
loading an 8B checkpoint holds one parameter's weight and moments beyond its own state.

Where DeepSpeed 0.19.8 puts a parameter (file names: framework/checkpoint/files.py), per
model-parallel rank m = pp_rank x tp + tp_rank, whose files hold that rank's tensor slices:

- ZeRO-1/2: mp_rank_m's ``param_shapes`` lists each flat group's parameters in order. A group is
  its parameters flattened and concatenated (each followed by its ``param_alignment_paddings``),
  padded at the end and cut into DP slices: data-parallel rank d's optimizer file holds slice d of
  the fp32 master weights (``single_partition_of_fp32_groups``) and of Adam's state (the base
  optimizer's state of group g). A parameter is a stretch of the ranks' slices concatenated.
- ZeRO-3: each parameter is padded to a multiple of DP and cut into DP equal partitions; rank d's
  flat sub-groups (``fp32_flat_groups``, concatenated) hold partition d of every parameter in
  ``param_shapes`` order, so a parameter is the same stretch [offset, offset + ceil(numel / DP))
  of every rank's flat groups: the ranks' stretches concatenated, cut to numel (as zero_to_fp32
  reads it). Adam's state: the base optimizer's state of sub-group g.
- ZeRO-0: nothing is partitioned: mp_rank_m holds the module's weights and the optimizer's
  state_dict, indexed by position in its param groups: torch AdamW's (fp32), or DeepSpeed's
  FP16_UnfusedOptimizer's (bf16: the inner AdamW's, with the fp32 master weights by position in
  ``fp32_groups``). The positions are the module's parameters, in order, grouped as
  framework/model/weights.py ``param_groups`` groups them: derived from the saved names and
  shapes, and checked against the saved groups' sizes and the state's shapes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from framework.checkpoint.files import model_states, optim_states, zero3_model_states
from framework.model.weights import full_shape, param_groups, shard, split_dim, unshard

MOMENTS = ("exp_avg", "exp_avg_sq")
KINDS = ("weights", *MOMENTS)  # what read() returns: the fp32 master weight, or a moment


class ReshardError(RuntimeError):
    """A checkpoint cannot be read or loaded as asked. One line, names the file or the reason."""


# ----------------------------------------------------------------------------- files
def open_file(path: Path) -> dict:
    """A saved file, memory-mapped: its tensors are read from disk only where used."""
    if not path.is_file():
        raise ReshardError(f"{path}: missing (the checkpoint is incomplete)")
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # noqa: BLE001 - truncated or foreign files fail in many ways
        detail = str(e).splitlines()[0] if str(e) else ""
        raise ReshardError(f"{path}: unreadable ({type(e).__name__}: {detail})") from None


def check_saved_layout(path: Path, sd: dict, layout) -> None:
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


def _adam_states(optim_sd: dict) -> dict:
    """Position -> Adam state: a torch state_dict's (the default) or DeepSpeed's 'elastic' list.
    Empty when no step was ever applied."""
    base = optim_sd.get("base_optimizer_state", optim_sd.get("optimizer_state_dict", optim_sd))
    states = base["state"] if isinstance(base, dict) else base
    return states if isinstance(states, dict) else dict(enumerate(states))


def _step(states: dict) -> int:
    first = next((s for s in states.values() if "step" in s), None)
    return int(first["step"]) if first is not None else 0


def _stretch(flats: Sequence[torch.Tensor], start: int, length: int) -> torch.Tensor:
    """Values [start, start + length) of the flat tensors concatenated, copied out of only the
    tensors that hold them (the others are never touched)."""
    if length == 0:
        return torch.zeros(0)
    pieces, offset = [], 0
    for flat in flats:
        lo, hi = max(start, offset), min(start + length, offset + flat.numel())
        if lo < hi:
            pieces.append(flat.narrow(0, lo - offset, hi - lo))
        offset += flat.numel()
    return torch.cat(pieces).float() if len(pieces) > 1 else pieces[0].to(torch.float32, copy=True)


def _partition_count(path: Path, optim_sd: dict, dp: int) -> None:
    count = optim_sd.get("partition_count")
    count = max(count) if isinstance(count, list) else count
    if count != dp:
        raise ReshardError(f"{path}: partitioned over {count} data-parallel ranks, but the "
                           f"layout says dp={dp}")


# ----------------------------------------------------------------------------- one mp rank
class _Zero12:
    """ZeRO-1/2: each flat group sliced over the data-parallel ranks' optimizer files."""

    def __init__(self, paths: List[Path], files: List[dict], param_shapes: List[dict]):
        self.parts = [f["optimizer_state_dict"] for f in files]
        for path, part in zip(paths, self.parts):
            _partition_count(path, part, len(paths))
        self.states = [_adam_states(p) for p in self.parts]
        self.step = _step(self.states[0])
        paddings = self.parts[0].get("param_alignment_paddings")
        self.where: Dict[str, tuple] = {}  # name -> (group, offset, shape)
        for g, shapes in enumerate(param_shapes):
            have = sum(p["single_partition_of_fp32_groups"][g].numel() for p in self.parts)
            offset = 0
            for j, (name, shape) in enumerate(shapes.items()):
                numel = math.prod(shape)
                if offset + numel > have:
                    raise ReshardError(f"{paths[0]}: the optimizer slices hold {have} values of "
                                       f"group {g}, fewer than its parameters need")
                self.where[name] = (g, offset, torch.Size(shape))
                offset += numel + (paddings[g][j] if paddings else 0)

    def read(self, name: str, kind: str) -> torch.Tensor:
        g, offset, shape = self.where[name]
        if kind == "weights":
            flats = [p["single_partition_of_fp32_groups"][g] for p in self.parts]
        elif all(g in s for s in self.states):
            flats = [s[g][kind] for s in self.states]
        else:  # never stepped: Adam's zeros
            return torch.zeros(shape)
        return _stretch(flats, offset, shape.numel()).view(shape)


class _Zero3:
    """ZeRO-3: every parameter cut into data-parallel partitions, one per rank's flat groups."""

    def __init__(self, paths: List[Path], files: List[dict], param_shapes: List[dict]):
        self.parts = [f["optimizer_state_dict"] for f in files]
        dp = len(paths)
        for path, part in zip(paths, self.parts):
            _partition_count(path, part, dp)
        sizes = [t.numel() for t in self.parts[0]["fp32_flat_groups"]]
        for path, part in zip(paths, self.parts):
            if [t.numel() for t in part["fp32_flat_groups"]] != sizes:
                raise ReshardError(f"{path}: its flat groups differ in size from "
                                   f"{paths[0].name}'s (not one ZeRO-3 checkpoint)")
        self.states = [_adam_states(p) for p in self.parts]
        self.step = _step(self.states[0])
        self.groups = len(sizes)
        self.where: Dict[str, tuple] = {}  # name -> (offset in each rank's flat groups, shape)
        offset = 0
        for shapes in param_shapes:
            for name, shape in shapes.items():
                self.where[name] = (offset, torch.Size(shape))
                offset += -(-math.prod(shape) // dp)  # the partition: ceil(numel / dp)
        if offset != sum(sizes):
            raise ReshardError(f"{paths[0]}: its flat groups hold {sum(sizes)} values, the "
                               f"partitions of its parameters {offset}")

    def _flats(self, d: int, kind: str) -> Optional[List[torch.Tensor]]:
        if kind == "weights":
            return self.parts[d]["fp32_flat_groups"]
        states = self.states[d]
        return [states[g][kind] for g in range(self.groups)] \
            if all(g in states for g in range(self.groups)) else None

    def read(self, name: str, kind: str) -> torch.Tensor:
        offset, shape = self.where[name]
        flats = [self._flats(d, kind) for d in range(len(self.parts))]
        if any(f is None for f in flats):  # never stepped: Adam's zeros
            return torch.zeros(shape)
        partition = -(-shape.numel() // len(flats))
        pieces = [_stretch(f, offset, partition) for f in flats]
        return torch.cat(pieces).narrow(0, 0, shape.numel()).view(shape)


class _Zero0:
    """ZeRO-0: the module's weights and the optimizer's state by position."""

    def __init__(self, path: Path, sd: dict):
        module = sd.get("module")
        if module is None:  # pipeline stages write layer files; our config pairs them with ZeRO-1
            raise ReshardError(f"{path}: no module weights (a ZeRO-0 checkpoint saved with "
                               f"pipeline parallelism is not supported)")
        buffers = set(sd.get("buffer_names") or ())
        self.module = {n: t for n, t in module.items() if torch.is_tensor(t)
                       and n not in buffers and not n.endswith("_extra_state")}
        self.masters: Dict[str, torch.Tensor] = {}
        self.states: Dict[str, dict] = {}
        self.step = 0
        optimizer = sd.get("optimizer")
        if optimizer is None:  # weights only (read_weights); moments are refused when asked
            self.adam = None
            return
        self.adam = optimizer.get("optimizer_state_dict", optimizer)
        if "param_groups" not in self.adam:
            raise ReshardError(f"{path}: an optimizer state of an unknown kind "
                               f"({', '.join(sorted(map(str, optimizer)))})")
        self._index(path, optimizer.get("fp32_groups"))

    def _index(self, path: Path, fp32_groups: Optional[list]) -> None:
        order = _optimizer_order(list(self.module), [t.shape for t in self.module.values()])
        saved = [g["params"] for g in self.adam["param_groups"]]
        if [len(g) for g in saved] != [len(g) for g in order]:
            raise ReshardError(f"{path}: the optimizer's groups hold {[len(g) for g in saved]} "
                               f"parameters, the module's weights make {[len(g) for g in order]}")
        states = self.adam["state"]
        for g, (names, keys) in enumerate(zip(order, saved)):
            for j, (name, key) in enumerate(zip(names, keys)):
                shape = self.module[name].shape
                if fp32_groups is not None:
                    self.masters[name] = fp32_groups[g][j]
                    if self.masters[name].shape != shape:
                        raise ReshardError(f"{path}: the fp32 master weight at position {key} has "
                                           f"shape {tuple(self.masters[name].shape)}, {name} "
                                           f"{tuple(shape)}")
                if key in states:
                    self.states[name] = states[key]
                    if states[key]["exp_avg"].shape != shape:
                        raise ReshardError(f"{path}: the Adam state at position {key} has shape "
                                           f"{tuple(states[key]['exp_avg'].shape)}, {name} "
                                           f"{tuple(shape)}")
        self.step = _step(states)

    def read(self, name: str, kind: str) -> torch.Tensor:
        if kind == "weights":  # bf16: the fp32 master weight, not the rounded module copy
            return self.masters.get(name, self.module[name]).to(torch.float32, copy=True)
        if self.adam is None:
            raise ReshardError(f"parameter {name}: the checkpoint holds no optimizer state")
        if name not in self.states:  # never stepped: Adam's zeros
            return torch.zeros(self.module[name].shape)
        return self.states[name][kind].to(torch.float32, copy=True)


def _optimizer_order(names: List[str], shapes: List[torch.Size]) -> List[List[str]]:
    """The names in the optimizer's param groups, by the rule that built them (on shapes alone:
    meta tensors); DeepSpeed drops empty groups."""
    params = torch.nn.ParameterList(torch.nn.Parameter(torch.empty(s, device="meta"))
                                    for s in shapes)
    name_of = {id(p): n for p, n in zip(params, names)}
    return [[name_of[id(p)] for p in g["params"]] for g in param_groups(params, 0.0)
            if g["params"]]


# ----------------------------------------------------------------------------- the checkpoint
class SavedState:
    """One checkpoint directory saved under ``layout`` (reshard.Layout), read per parameter.
    The model files are opened at once (names and shapes); each model-parallel rank's optimizer
    files when one of its parameters is first read or checked."""

    def __init__(self, tag_dir: Path, layout):
        self.tag_dir, self.layout = Path(tag_dir), layout
        if layout.zero_stage not in (0, 1, 2, 3):
            raise ReshardError(f"{self.tag_dir}: unknown ZeRO stage {layout.zero_stage}")
        self._files: Dict[Path, dict] = {}
        self._ranks: Dict[int, object] = {}
        self._model: Dict[int, dict] = {}
        self._mp_of: Dict[str, int] = {}  # name -> the first model-parallel rank holding it
        self._local: Dict[str, torch.Size] = {}  # name -> the saved tensor-parallel slice's shape
        for pp_rank in range(layout.pp):
            for tp_rank in range(layout.tp):
                self._index_model_file(pp_rank * layout.tp + tp_rank)

    def _open(self, name: str) -> dict:
        path = self.tag_dir / name
        if path not in self._files:
            self._files[path] = open_file(path)
        return self._files[path]

    def _model_file(self, mp: int) -> str:
        return zero3_model_states(0, mp) if self.layout.zero_stage == 3 else model_states(mp)

    def _index_model_file(self, mp: int) -> None:
        name = self._model_file(mp)
        sd = self._model[mp] = self._open(name)
        check_saved_layout(self.tag_dir / name, sd, self.layout)
        if self.layout.zero_stage == 0:
            self._ranks[mp] = _Zero0(self.tag_dir / name, sd)
            shapes = {n: t.shape for n, t in self._ranks[mp].module.items()}
        elif not sd.get("param_shapes"):
            raise ReshardError(f"{self.tag_dir / name}: no param_shapes (not a "
                               f"ZeRO-{self.layout.zero_stage} checkpoint)")
        else:
            shapes = {n: s for group in sd["param_shapes"] for n, s in group.items()}
        for n, s in shapes.items():
            self._mp_of.setdefault(n, mp - mp % self.layout.tp)
            self._local[n] = torch.Size(s)

    def _rank(self, mp: int):
        """The reader of one model-parallel rank's partitions (its optimizer files opened)."""
        if mp not in self._ranks:
            sd, layout = self._model[mp], self.layout
            names = [optim_states(d, mp, _is_bf16(sd)) for d in range(layout.dp)]
            files = [self._open(n) for n in names]
            reader = _Zero3 if layout.zero_stage == 3 else _Zero12
            self._ranks[mp] = reader([self.tag_dir / n for n in names], files, sd["param_shapes"])
        return self._ranks[mp]

    # ------------------------------------------------------------------ public
    @property
    def names(self) -> List[str]:
        """Every parameter's global name, stage by stage."""
        return list(self._mp_of)

    def check(self, names: Sequence[str]) -> None:
        """Every name is in the checkpoint and its ranks' files are there and consistent: what
        a load checks before it changes anything."""
        for name in names:
            if name not in self._mp_of:
                raise ReshardError(f"parameter {name}: not in the checkpoint {self.tag_dir}")
            for s in range(self.layout.tp if split_dim(name) is not None else 1):
                rank = self._rank(self._mp_of[name] + s)
                if isinstance(rank, _Zero0) and rank.adam is None:
                    raise ReshardError(f"{self.tag_dir / self._model_file(self._mp_of[name] + s)}"
                                       f": no optimizer state")

    def shape(self, name: str, tp: int = 1) -> torch.Size:
        """The full shape (tp=1) or that of one slice of ``tp``."""
        full = full_shape(name, self._local[name], self.layout.tp)
        dim = split_dim(name)
        if dim is None or tp == 1:
            return full
        return torch.Size(full[:dim] + (full[dim] // tp,) + full[dim + 1:])

    def step(self, name: Optional[str] = None) -> int:
        """Adam's step count (steps applied; skipped ones are not counted), as recorded with
        ``name`` (default: the first parameter)."""
        name = name if name is not None else self.names[0]
        return self._rank(self._mp_of[name]).step

    def read(self, name: str, kind: str, tp_rank: int = 0, tp: int = 1) -> torch.Tensor:
        """``kind`` ("weights": the fp32 master weight, or a moment) of one parameter: the full
        tensor, or rank ``tp_rank``'s slice of ``tp`` (built from only the saved slices that
        hold it), as new fp32 memory."""
        if name not in self._mp_of:
            raise ReshardError(f"parameter {name}: not in the checkpoint {self.tag_dir}")
        saved = self.layout.tp

        def part(s: int) -> torch.Tensor:
            return self._rank(self._mp_of[name] + s).read(name, kind)

        if split_dim(name) is None or saved == tp:
            return part(tp_rank if split_dim(name) is not None else 0)
        if saved % tp == 0:  # coarser: join the saved slices that make this one
            k = saved // tp
            return unshard(name, [part(tp_rank * k + i) for i in range(k)])
        if tp % saved == 0:  # finer: cut the one saved slice that holds this one
            k = tp // saved
            return shard(name, part(tp_rank // k), tp_rank % k, k).clone()
        return shard(name, unshard(name, [part(s) for s in range(saved)]), tp_rank, tp).clone()

    def close(self) -> None:
        """Drops the mapped files (their mappings close with the last tensor read from them);
        nothing can be read after."""
        self._files.clear()
        self._ranks.clear()
        self._model.clear()
