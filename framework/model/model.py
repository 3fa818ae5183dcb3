"""LLaDA: a LLaMA-shaped bidirectional Transformer built from megatron-core blocks.

Embedding (vocab-parallel) -> TransformerBlock of ``llada_layer_spec`` with a final RMSNorm ->
output head (column-parallel over the vocabulary, untied). No timestep input: the model sees only
the partly masked sequence. The head can run at selected (masked) positions only, which is all the
loss needs and saves the largest matmul on the rest.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import (ColumnParallelLinear, VocabParallelEmbedding,
                                           vocab_parallel_cross_entropy)
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import (TransformerBlock,
                                                         TransformerBlockSubmodules,
                                                         get_num_layers_to_build)
from megatron.core.transformer.transformer_config import TransformerConfig

from framework.config import ModelConfig
from framework.model.spec import llada_layer_spec


def padded_vocab_size(vocab_size: int, multiple: int, tensor_parallel: int) -> int:
    """Round the vocabulary up so each tensor-parallel rank holds an equal, aligned slice."""
    step = multiple * tensor_parallel
    return ((vocab_size + step - 1) // step) * step


def transformer_config(cfg: ModelConfig, *, tensor_parallel: int, pipeline_parallel: int,
                       params_dtype: torch.dtype, on_cpu: bool) -> TransformerConfig:
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_kv_heads,
        ffn_hidden_size=cfg.ffn_hidden_size,
        kv_channels=cfg.hidden_size // cfg.num_attention_heads,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.norm_eps,
        gated_linear_unit=True,  # SwiGLU: silu(x W1) * (x W3)
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=cfg.init_std,
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        use_cpu_initialization=on_cpu,
        # The fused paths below are CUDA/apex kernels; the plain paths run everywhere.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
    )


class RotaryAngles(torch.nn.Module):
    """RoPE angles [s, 1, 1, d] in the layout megatron-core's attention applies (the two halves
    of the head dimension rotate together). megatron's own RotaryEmbedding moves its frequencies
    to CUDA on first use; this buffer follows the module to whatever device it lives on."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, seq_len: int) -> torch.Tensor:
        pos = torch.arange(seq_len, device=self.inv_freq.device, dtype=torch.float32)
        freqs = torch.outer(pos, self.inv_freq)
        return torch.cat((freqs, freqs), dim=-1)[:, None, None, :]


class LLaDAModel(MegatronModule):
    def __init__(self, cfg: ModelConfig, config: TransformerConfig):
        super().__init__(config=config)
        tp = config.tensor_model_parallel_size
        self.vocab_size = cfg.vocab_size
        self.padded_vocab_size = padded_vocab_size(cfg.vocab_size, cfg.pad_vocab_to_multiple_of, tp)
        self.embedding = VocabParallelEmbedding(
            self.padded_vocab_size, cfg.hidden_size, init_method=config.init_method, config=config)
        self.rotary = RotaryAngles(config.kv_channels, cfg.rope_theta)
        block = TransformerBlockSubmodules(
            layer_specs=[llada_layer_spec] * get_num_layers_to_build(config),
            layer_norm=WrappedTorchNorm)
        self.decoder = TransformerBlock(config, block, post_layer_norm=True)
        self.output_layer = ColumnParallelLinear(
            cfg.hidden_size, self.padded_vocab_size, config=config, init_method=config.init_method,
            bias=False, gather_output=False)

    def forward(self, input_ids: torch.Tensor, select: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
        """input_ids [b, s] -> logits over this rank's vocabulary slice:
        [N, V/tp] at the N positions where ``select`` [b, s] is True, else [b, s, V/tp]."""
        seq_len = input_ids.shape[1]
        hidden = self.embedding(input_ids).transpose(0, 1).contiguous()  # [s, b, h]
        hidden = self.decoder(hidden, attention_mask=None, rotary_pos_emb=self.rotary(seq_len))
        hidden = hidden.transpose(0, 1)  # [b, s, h]
        if select is not None:
            hidden = hidden[select].unsqueeze(1)  # [N, 1, h]
        logits, _ = self.output_layer(hidden)
        return logits.squeeze(1) if select is not None else logits

    def cross_entropy(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-position CE for logits [N, V/tp]; across the tensor-parallel vocabulary slices."""
        if self.config.tensor_model_parallel_size == 1:
            return F.cross_entropy(logits.float(), targets, reduction="none")
        return vocab_parallel_cross_entropy(logits.float().unsqueeze(1), targets.unsqueeze(1)
                                            ).squeeze(1)
