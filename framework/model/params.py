"""The parameter table: every parameter of the model, defined once.

For a ``ModelConfig``: each parameter's global name (what ``named_parameters`` of a one-process
model gives: ``{piece}.{module path}``, see framework/model/model.py), its full shape (what one
process holds), the dimension tensor parallelism splits it along, and whether it takes part in a
matmul. FLOPs and MFU, ``llada plan``, the Hugging Face mapping, weight initialisation, resharding
and the parameter count all read it; tests/unit/test_params.py holds it against the model built
on the meta device. Plain arithmetic, no torch: ``llada plan`` stays light.

Pieces: 0 is the embedding, 1..L the Transformer layers, L + 1 the head (final norm and output
projection). The vocabulary is padded to ``pad_vocab_to_multiple_of`` (a multiple of the
tensor-parallel size, checked in the config): each rank holds an equal, aligned slice, and the
shapes are the same under every layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import Dict, List, Optional, Tuple

from framework.config import ModelConfig


@dataclass(frozen=True)
class Kind:
    """What a parameter's name says about it, by the last two parts of the name."""

    split_dim: Optional[int]  # tensor-parallel split dimension; None: replicated on every rank
    matmul: bool  # a matmul weight (FLOPs); the embedding is a lookup, norm gains are elementwise
    gated: bool = False  # SwiGLU fc1 [gate; up]: rank r holds [gate_r; up_r] (weights.shard)
    residual: bool = False  # projects into the residual stream: initialised std / sqrt(2 layers)
    bias: bool = False  # an additive bias: initialised to zero


KINDS: Dict[str, Kind] = {
    "word_embeddings.weight": Kind(split_dim=0, matmul=False),
    "input_layernorm.weight": Kind(split_dim=None, matmul=False),
    "linear_qkv.weight": Kind(split_dim=0, matmul=True),  # query groups contiguous: whole groups
    "linear_qkv.bias": Kind(split_dim=0, matmul=False, bias=True),  # model.qkv_bias (Qwen2)
    # model.qk_norm (Qwen3): one gain per head dimension, shared by every head; a rank's heads
    # give part of its gradient (summed over tensor parallelism: model/spec.py HeadNorm)
    "q_layernorm.weight": Kind(split_dim=None, matmul=False),
    "k_layernorm.weight": Kind(split_dim=None, matmul=False),
    "linear_proj.weight": Kind(split_dim=1, matmul=True, residual=True),
    "pre_mlp_layernorm.weight": Kind(split_dim=None, matmul=False),
    "linear_fc1.weight": Kind(split_dim=0, matmul=True, gated=True),
    "linear_fc2.weight": Kind(split_dim=1, matmul=True, residual=True),
    "final_layernorm.weight": Kind(split_dim=None, matmul=False),
    "output_layer.weight": Kind(split_dim=0, matmul=True),
}


def kind_of(name: str) -> Kind:
    """The kind of a parameter by its (global or local) name; KeyError for a foreign one."""
    return KINDS[".".join(name.split(".")[-2:])]


@dataclass(frozen=True)
class Param:
    name: str  # global name
    shape: Tuple[int, ...]  # full shape
    piece: int  # 0 embedding, 1..L layers, L + 1 head
    kind: Kind

    @property
    def numel(self) -> int:
        return prod(self.shape)

    @property
    def split_dim(self) -> Optional[int]:
        return self.kind.split_dim

    @property
    def is_head(self) -> bool:
        """The output projection: it runs at the masked positions only."""
        return self.name.endswith("output_layer.weight")


def padded_vocab_size(vocab_size: int, multiple: int) -> int:
    """The vocabulary rounded up to ``multiple``."""
    return ((vocab_size + multiple - 1) // multiple) * multiple


def head_dim(cfg: ModelConfig) -> int:
    return cfg.kv_channels


def param_table(cfg: ModelConfig) -> List[Param]:
    """Every parameter of the model for ``cfg``, in module order."""
    h, f, d = cfg.hidden_size, cfg.ffn_hidden_size, head_dim(cfg)
    vocab = padded_vocab_size(cfg.vocab_size, cfg.pad_vocab_to_multiple_of)

    def param(piece: int, path: str, *shape: int) -> Param:
        name = f"{piece}.{path}"
        return Param(name, tuple(shape), piece, kind_of(name))

    table = [param(0, "word_embeddings.weight", vocab, h)]
    heads, kv_heads = cfg.num_attention_heads, cfg.num_kv_heads
    qkv = (heads + 2 * kv_heads) * d
    for i in range(1, cfg.num_layers + 1):
        attn = "layer.self_attention."
        table += [param(i, "layer.input_layernorm.weight", h),
                  param(i, attn + "linear_proj.weight", h, heads * d),
                  param(i, attn + "linear_qkv.weight", qkv, h)]
        if cfg.qkv_bias:
            table.append(param(i, attn + "linear_qkv.bias", qkv))
        if cfg.qk_norm:
            table += [param(i, attn + "q_layernorm.weight", d),
                      param(i, attn + "k_layernorm.weight", d)]
        table += [param(i, "layer.pre_mlp_layernorm.weight", h),
                  param(i, "layer.mlp.linear_fc1.weight", 2 * f, h),
                  param(i, "layer.mlp.linear_fc2.weight", h, f)]
    head = cfg.num_layers + 1
    table += [param(head, "final_layernorm.weight", h),
              param(head, "output_layer.weight", vocab, h)]
    return table


def full_shapes(cfg: ModelConfig) -> Dict[str, Tuple[int, ...]]:
    """{global name: full shape}, in module order."""
    return {p.name: p.shape for p in param_table(cfg)}


def total_params(cfg: ModelConfig) -> int:
    return sum(p.numel for p in param_table(cfg))
