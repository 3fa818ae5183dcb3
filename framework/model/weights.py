"""Weights independent of the parallel layout: initialisation, and the full (consolidated) state
dict of a model that is split across tensor-parallel ranks and pipeline stages.

Every parameter has one *full* form, the tensor a single process holds (its shape and split
dimension: the parameter table, framework/model/params.py). A tensor-parallel rank holds a slice
of it along the parameter's split dimension; the SwiGLU ``linear_fc1`` is the one exception: its
full form is [gate; up] and rank r holds [gate_r; up_r]. Initialisation draws the
full tensor from a generator seeded by (seed, parameter name) and keeps this rank's slice, so a
run starts from the same weights under every layout (the layout tests compare against one
process) and the names are global (framework/model/model.py), so stages never collide.
"""

from __future__ import annotations

import math
import zlib
from typing import Dict, Optional

import torch
import torch.distributed as dist

from framework.config import ModelConfig
from framework.model.params import full_shapes, kind_of


def split_dim(name: str) -> Optional[int]:
    return kind_of(name).split_dim


def full_shape(name: str, local: torch.Size, tp: int) -> torch.Size:
    """The full shape of a parameter from this rank's slice of it."""
    dim = split_dim(name)
    if dim is None:
        return local
    shape = list(local)
    shape[dim] *= tp
    return torch.Size(shape)


def shard(name: str, full: torch.Tensor, tp_rank: int, tp: int) -> torch.Tensor:
    """This tensor-parallel rank's slice of a full tensor."""
    dim = split_dim(name)
    if dim is None or tp == 1:
        return full
    if kind_of(name).gated:
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, dim=0)[tp_rank], up.chunk(tp, dim=0)[tp_rank]], dim=0)
    return full.chunk(tp, dim=dim)[tp_rank]


def unshard(name: str, parts: list) -> torch.Tensor:
    """The full tensor from every tensor-parallel rank's slice, in rank order."""
    dim = split_dim(name)
    if dim is None or len(parts) == 1:
        return parts[0]
    if kind_of(name).gated:
        halves = [p.chunk(2, dim=0) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(parts, dim=dim)


def _seed(seed: int, name: str) -> int:
    return (seed * 0x9E3779B1 + zlib.crc32(name.encode())) & 0x7FFF_FFFF_FFFF_FFFF


@torch.no_grad()
def init_weights(model: torch.nn.Module, cfg: ModelConfig, seed: int, tp_rank: int, tp: int
                 ) -> None:
    """Normal(0, init_std) matrices (std / sqrt(2 x layers) for the residual projections), unit
    norm gains; drawn in full (the parameter table's shape) per parameter on its device, then
    sliced for this rank. Also marks each parameter's tensor-parallel split (megatron's
    attributes)."""
    shapes = full_shapes(cfg)
    for name, p in model.named_parameters():
        kind = kind_of(name)
        # what DeepSpeed's gradient norm reads to count a slice once per rank and a replicated
        # tensor once per tensor-parallel group
        p.tensor_model_parallel = kind.split_dim is not None
        p.partition_dim, p.partition_stride = kind.split_dim or 0, 1
        if p.ndim == 1:  # RMSNorm gains 1, biases 0
            p.fill_(0.0 if kind.bias else 1.0)
            continue
        std = cfg.init_std / math.sqrt(2.0 * cfg.num_layers) if kind.residual else cfg.init_std
        gen = torch.Generator(device=p.device).manual_seed(_seed(seed, name))
        full = torch.empty(shapes[name], device=p.device, dtype=torch.float32)
        full.normal_(0.0, std, generator=gen)
        p.copy_(shard(name, full, tp_rank, tp))


def full_state_dict(module: torch.nn.Module, zero_stage: int) -> Optional[Dict[str, torch.Tensor]]:
    """The whole model's weights as one process would hold them, on global rank 0 (None on the
    others): ZeRO-3 partitions gathered, tensor-parallel slices joined, pipeline stages merged.
    Collective: every rank calls it."""
    from contextlib import nullcontext

    from megatron.core import parallel_state as ps

    params = list(module.parameters())
    if zero_stage == 3:
        import deepspeed
        gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    else:
        gather = nullcontext()
    tp_group, tp = ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_world_size()
    local: Dict[str, torch.Tensor] = {}
    with gather:
        for name, p in module.named_parameters():
            name = name.removeprefix("module.")
            t = p.detach().float()
            if split_dim(name) is not None and tp > 1:
                parts = [torch.empty_like(t) for _ in range(tp)]
                dist.all_gather(parts, t.contiguous(), group=tp_group)
                t = unshard(name, parts)
            local[name] = t.cpu()
    # one copy per stage goes to rank 0: tensor-parallel rank 0 of data-parallel rank 0
    mine = local if ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0 \
        else {}
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    if dist.get_rank() != 0:
        return None
    merged: Dict[str, torch.Tensor] = {}
    for part in gathered:
        merged.update(part)
    return dict(sorted(merged.items(), key=lambda kv: _order(kv[0])))


def _order(name: str):
    head, _, rest = name.partition(".")
    return (int(head), rest) if head.isdigit() else (1 << 30, name)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """The optimizer's parameter groups, in the order DeepSpeed flattens them: decay matrices
    (attention, MLP, embedding, head), never norms' gains. Resharding a ZeRO-0 checkpoint, whose
    optimizer state is stored by position, reads the same rule (checkpoint/saved_state.py)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]
