"""The LLaDA layer spec: a LLaMA layer (RMSNorm, SwiGLU, RoPE, no biases; QKV biases and QK
norms as Qwen2 and Qwen3 have them, when the model config asks) with non-causal attention; and the autoregressive baseline's, the same layer with causal attention (the one
difference between the two architectures). Only which module goes where; all sizes come from
the TransformerConfig."""

import torch

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from framework.model.attention import SDPAttention


class RMSNorm(torch.nn.RMSNorm):
    """torch's RMSNorm under megatron's norm signature. megatron's own torch wrapper refuses
    sequence parallelism; here each tensor-parallel rank then normalises its part of the sequence,
    so the gain's gradient is partial: it is marked ``sequence_parallel`` and summed over the
    tensor-parallel group (framework/parallel/world.py, reduce_sequence_parallel_grads)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_megatron_options):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        self.weight.sequence_parallel = config.sequence_parallel


class HeadNorm(RMSNorm):
    """Model.qk_norm (Qwen3): RMSNorm over each query or key head, one gain shared by all heads.
    Each tensor-parallel rank holds some of the heads, so the gain's gradient is partial under
    any tensor parallelism (with or without sequence parallelism): marked to be summed over the
    tensor-parallel group like a sequence-parallel gain."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_megatron_options):
        super().__init__(config, hidden_size, eps=eps)
        self.weight.sequence_parallel = config.tensor_model_parallel_size > 1


class RowParallel(RowParallelLinear):
    """megatron's row-parallel linear, handing its own tensor-parallel group down: megatron's
    forward passes none, and the default it then looks up warns on rank 0 at every call, which
    under torch.compile breaks each layer's graph at both of its row-parallel projections."""

    def _forward_impl(self, input, weight, *args, **kwargs):
        if kwargs.get("tp_group") is None:
            kwargs["tp_group"] = self.tp_group
        return super()._forward_impl(input, weight, *args, **kwargs)


def layer_spec(causal: bool = False, qk_norm: bool = False) -> ModuleSpec:
    """The layer with bidirectional attention (LLaDA) or causal attention (``causal``: the
    autoregressive baseline); the same parameters either way. ``qk_norm``: each query and key
    head normalised before RoPE (Qwen3). QKV biases (Qwen2) are the TransformerConfig's
    ``add_qkv_bias``."""
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=RMSNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal if causal else AttnMaskType.no_mask},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=SDPAttention,
                    linear_proj=RowParallel,
                    q_layernorm=HeadNorm if qk_norm else IdentityOp,
                    k_layernorm=HeadNorm if qk_norm else IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=RMSNorm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                         linear_fc2=RowParallel),
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )


llada_layer_spec = layer_spec(causal=False)
ar_layer_spec = layer_spec(causal=True)
