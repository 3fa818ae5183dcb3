"""Non-causal core attention on ``torch.nn.functional.scaled_dot_product_attention``.

megatron-core's own ``DotProductAttention`` assumes CUDA and a causal/padding mask; LLaDA needs
every token to attend to every token. SDPA picks the flash backend on CUDA (bf16/fp16) and runs
on CPU; ``enable_gqa`` lets it read grouped key/value heads without materialising copies.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class BidirectionalSDPA(MegatronModule):
    """Drop-in ``core_attention`` for megatron-core's ``SelfAttention``: [s, b, heads, d] in,
    [s, b, heads * d] out, no mask at all."""

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type,
                 attention_type: str, attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection=None):
        super().__init__(config=config)
        # Parameters megatron passes to every core attention; a bidirectional model uses none of
        # them (no mask type, no dropout in LLaDA, default 1/sqrt(d) scale, no context parallel).
        if config.context_parallel_size != 1:
            raise ValueError("BidirectionalSDPA does not support context parallelism")
        self.softmax_scale = softmax_scale
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor], attn_mask_type=None,
                attention_bias=None, packed_seq_params=None) -> torch.Tensor:
        if attention_mask is not None or attention_bias is not None or packed_seq_params is not None:
            raise ValueError("LLaDA attention is bidirectional: no mask, bias or packing")
        s, b, heads, d = query.shape
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # -> [b, h, s, d]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=None, is_causal=False, scale=self.softmax_scale,
            dropout_p=self.dropout_p if self.training else 0.0,
            enable_gqa=k.shape[1] != heads,
        )
        return out.permute(2, 0, 1, 3).reshape(s, b, heads * d)
