"""LLaDA: a LLaMA-shaped bidirectional Transformer built from megatron-core layers.

The model is a list of *pieces*: Embedding (vocab-parallel), one Layer per Transformer layer (our
``llada_layer_spec``), Head (final RMSNorm + column-parallel output projection, untied). Each piece
maps a tuple ``(activations, select)`` to the next, so the same list is either run in one process
(``LLaDAModel``) or cut into stages by DeepSpeed's pipeline engine (``framework/model/pipeline.py``);
the parameter names (``0.word_embeddings.weight``, ``3.layer.mlp.linear_fc1.weight``, ...) are
global indices in both, so a checkpoint means the same thing under every layout. Their shapes and
splits: the parameter table (``framework/model/params.py``).

No timestep input: the model sees only the partly masked sequence. The head runs at the selected
(masked) positions only, which is all the loss needs and saves the largest matmul on the rest.
"""

from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from deepspeed.pipe import LayerSpec
from megatron.core.tensor_parallel import (ColumnParallelLinear, VocabParallelEmbedding,
                                           gather_from_sequence_parallel_region,
                                           vocab_parallel_cross_entropy)
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from torch.utils.checkpoint import checkpoint

from framework.config import ModelConfig, RopeScalingConfig
from llada_kernels.linear_cross_entropy import linear_cross_entropy
from framework.model.attention import Attend
from framework.model.params import padded_vocab_size
from framework.model.spec import RMSNorm, layer_spec
from framework.parallel.layout import recompute_flags, stage_bounds


def transformer_config(cfg: ModelConfig, *, tensor_parallel: int, params_dtype: torch.dtype,
                       on_cpu: bool, sequence_parallel: bool = False) -> TransformerConfig:
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_kv_heads,
        ffn_hidden_size=cfg.ffn_hidden_size,
        kv_channels=cfg.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.norm_eps,
        gated_linear_unit=True,  # SwiGLU: silu(x W1) * (x W3)
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=cfg.qkv_bias,
        qk_layernorm=cfg.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=cfg.init_std,
        tensor_model_parallel_size=tensor_parallel,
        sequence_parallel=sequence_parallel,
        # Pipeline stages are DeepSpeed's (model/pipeline.py); megatron's layers are told 1
        # so that they keep the global layer numbers we give them.
        pipeline_model_parallel_size=1,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        use_cpu_initialization=on_cpu,
        # Weights are initialised by framework/model/weights.py, the same under every layout.
        perform_initialization=False,
        # The fused paths below are CUDA/apex kernels; the plain paths run everywhere.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        cuda_graph_scope=[],  # no CUDA graphs; megatron's default ("full") is deprecated
    )


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScalingConfig) -> torch.Tensor:
    """[d/2] inverse frequencies, scaled as the checkpoint's config.json says (Hugging Face's
    ``_compute_linear_scaling_rope_parameters`` / ``_compute_llama3_parameters``)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    if scaling.type == "linear":
        return inv_freq / scaling.factor
    if scaling.type == "llama3":  # low frequencies scaled, high kept, the band between blended
        old = scaling.original_max_position_embeddings
        low_wavelen, high_wavelen = old / scaling.low_freq_factor, old / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
        smooth = (old / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor
                                                              - scaling.low_freq_factor)
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


class RotaryAngles(torch.nn.Module):
    """RoPE angles [s, 1, 1, d] in the layout megatron-core's attention applies (the two halves
    of the head dimension rotate together). megatron's own RotaryEmbedding moves its frequencies
    to CUDA on first use; this buffer follows the module to whatever device it lives on."""

    def __init__(self, head_dim: int, theta: float,
                 scaling: RopeScalingConfig = RopeScalingConfig()):
        super().__init__()
        self.register_buffer("inv_freq", rope_frequencies(head_dim, theta, scaling),
                             persistent=False)

    def forward(self, seq_len: int, start: int = 0) -> torch.Tensor:
        pos = torch.arange(start, start + seq_len, device=self.inv_freq.device,
                           dtype=torch.float32)
        freqs = torch.outer(pos, self.inv_freq)
        return torch.cat((freqs, freqs), dim=-1)[:, None, None, :]


# What flows between pieces: activations [s, b, h] (or the input ids [b, s] into the embedding)
# and the positions the head computes, as uint8 [b, s]: DeepSpeed's pipeline engine sends integer
# tensors between stages as they are, but would expect a gradient for a floating one.
Flow = Tuple[torch.Tensor, torch.Tensor]


class Embedding(MegatronModule):
    def __init__(self, cfg: ModelConfig, config: TransformerConfig):
        super().__init__(config=config)
        self.word_embeddings = VocabParallelEmbedding(
            padded_vocab_size(cfg.vocab_size, cfg.pad_vocab_to_multiple_of), cfg.hidden_size,
            init_method=config.init_method, config=config,
            # sequence parallel: reduce-scatter along the sequence instead of all-reduce
            reduce_scatter_embeddings=config.sequence_parallel)

    def forward(self, inputs: Flow) -> Flow:
        input_ids, select = inputs
        if self.config.sequence_parallel:  # [b, s] -> [s/tp, b, h], transposed inside
            hidden = self.word_embeddings(input_ids)
        else:
            hidden = self.word_embeddings(input_ids).transpose(0, 1).contiguous()
        # flat positions (the trainer's, made on the host) pass as they are
        return hidden, select if select.dtype == torch.int64 else select.to(torch.uint8)


class Layer(MegatronModule):
    """One Transformer layer; with ``recompute`` its activations are recomputed in backward;
    ``causal``: the autoregressive baseline's attention."""

    def __init__(self, cfg: ModelConfig, config: TransformerConfig, layer_number: int,
                 recompute: bool = False, causal: bool = False):
        super().__init__(config=config)
        self.layer = build_module(layer_spec(causal, cfg.qk_norm), config=config,
                                  layer_number=layer_number)
        self.rotary = RotaryAngles(config.kv_channels, cfg.rope_theta, cfg.rope_scaling)
        self.recompute = recompute

    def _run(self, hidden: torch.Tensor, attend: Optional[Attend] = None) -> torch.Tensor:
        seq_len = hidden.shape[0] * (self.config.tensor_model_parallel_size
                                     if self.config.sequence_parallel else 1)
        angles = self.rotary(seq_len, attend.start if attend is not None else 0)
        out, _ = self.layer(hidden, attention_mask=attend, rotary_pos_emb=angles)
        return out

    def compile_run(self) -> None:
        """``train.compile``: the layer's computation under torch.compile, not its forward: the
        flow's selected positions (a different count every batch) pass by outside the graph."""
        self._run = torch.compile(self._run)

    def forward(self, inputs: Flow, attend: Optional[Attend] = None) -> Flow:
        """``attend``: inference only (padding mask, key/value cache: model/attention.py)."""
        hidden, select = inputs
        if self.recompute and torch.is_grad_enabled():
            # no dropout in LLaDA: the recomputed forward is the same computation exactly
            hidden = checkpoint(self._run, hidden, use_reentrant=False)
        else:
            hidden = self._run(hidden, attend)
        return hidden, select


class FusedHeadInput(NamedTuple):
    """What a fused Head hands the loss in place of logits: the final norm's output at the N
    selected positions and this rank's slice of the output projection (``head_loss`` multiplies
    them chunk by chunk, llada_kernels/linear_cross_entropy.py)."""
    hidden: torch.Tensor  # [N, h]
    weight: torch.Tensor  # [V/tp, h]


class Head(MegatronModule):
    """Final RMSNorm, then the output projection at the selected positions only:
    logits over this rank's vocabulary slice, [N, V/tp] for the N selected positions; with
    ``fused``, a ``FusedHeadInput`` instead, so that the loss never holds all N x V/tp logits."""

    def __init__(self, cfg: ModelConfig, config: TransformerConfig, fused: bool = False):
        super().__init__(config=config)
        self.final_layernorm = RMSNorm(config, cfg.hidden_size, eps=cfg.norm_eps)
        self.output_layer = ColumnParallelLinear(
            cfg.hidden_size, padded_vocab_size(cfg.vocab_size, cfg.pad_vocab_to_multiple_of),
            config=config, init_method=config.init_method, bias=False, gather_output=False)
        # With sequence parallelism the sequence is gathered *before* the projection (the
        # selection needs whole sequences), so the projection itself is an ordinary one.
        self.output_layer.sequence_parallel = False
        self.output_layer.allreduce_dgrad = config.tensor_model_parallel_size > 1
        self.fused = fused

    def forward(self, inputs: Flow):
        hidden, select = inputs
        hidden = self.final_layernorm(hidden)
        if self.config.sequence_parallel:
            # backward: the projection's all-reduced input gradient, split back by sequence
            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
        hidden = select_positions(hidden, select)  # [N, h]
        if self.fused:  # the loss all-reduces the input gradient, as the projection would
            return FusedHeadInput(hidden, self.output_layer.weight)
        logits, _ = self.output_layer(hidden.unsqueeze(1))
        return logits.squeeze(1)


def select_positions(hidden: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
    """[N, h] of hidden [s, b, h] at the selected positions, batch-major: ``select`` a [b, s]
    mask, or the flat indices into [b, s] (int64), which CUDA gathers without a host sync (a
    mask's count must first come back from the device)."""
    if select.dtype != torch.int64:
        return hidden.transpose(0, 1)[select.bool()]
    s, b = hidden.shape[:2]
    seq_major = (select % s) * b + select // s  # the same positions in the [s, b] layout
    return hidden.reshape(s * b, -1).index_select(0, seq_major)


def take_rows(out, order: Optional[torch.Tensor]):
    """The head's output (logits [M, V/tp] or a ``FusedHeadInput``) at rows ``order`` (None:
    as it is), for the logit shift: a position read by two predictions (a sequence's first
    two) is used twice, its gradient summed (the training loss and validation both)."""
    if order is None:
        return out
    if isinstance(out, FusedHeadInput):
        return FusedHeadInput(out.hidden.index_select(0, order), out.weight)
    return out.index_select(0, order)


def piece_specs(cfg: ModelConfig, config: TransformerConfig, recompute: Sequence[bool],
                causal: bool = False, fused_head: bool = False) -> List[LayerSpec]:
    """The pieces as DeepSpeed LayerSpecs (built lazily: a pipeline stage builds only its own).
    ``recompute[i]``: recompute the activations of Transformer layer i in backward; ``causal``:
    the autoregressive baseline (the same pieces and parameters, causal attention);
    ``fused_head``: the head hands the loss its input and weight (``FusedHeadInput``)."""
    layers = [LayerSpec(Layer, cfg, config, i + 1, recompute[i], causal)
              for i in range(cfg.num_layers)]
    return [LayerSpec(Embedding, cfg, config), *layers, LayerSpec(Head, cfg, config, fused_head)]


class LLaDAModel(torch.nn.Module):
    """All pieces in one process: ``model(input_ids [b, s], select)`` -> logits [N, V/tp] at the
    selected positions (``select``: a [b, s] bool mask or flat int64 indices into [b, s]);
    without ``select``, [b, s, V/tp] at all of them.
    ``attend`` (inference): a padding mask and a key/value cache for every layer."""

    def __init__(self, pieces: Sequence[torch.nn.Module]):
        super().__init__()
        for i, piece in enumerate(pieces):
            self.add_module(str(i), piece)

    def forward(self, input_ids: torch.Tensor, select: Optional[torch.Tensor] = None,
                attend: Optional[Attend] = None):
        flow = (input_ids, torch.ones_like(input_ids, dtype=torch.bool) if select is None
                else select)
        for piece in self.children():
            flow = piece(flow, attend) if attend is not None and isinstance(piece, Layer) \
                else piece(flow)
        return flow if select is not None else flow.view(*input_ids.shape, -1)


def build_model(cfg: ModelConfig, config: TransformerConfig, recompute: bool = False,
                checkpoint_layers: Optional[int] = None, causal: bool = False) -> LLaDAModel:
    bounds = stage_bounds(cfg.num_layers, 1)
    return LLaDAModel([s.build() for s in piece_specs(
        cfg, config, recompute_flags(cfg.num_layers, bounds, recompute, checkpoint_layers),
        causal)])


def head_logits(out) -> torch.Tensor:
    """The logits [N, V/tp] of the head's output, whether it is logits already or a fused head's
    ``FusedHeadInput`` (all N x V/tp of them at once: for inspection, not for the loss)."""
    return out.hidden @ out.weight.t() if isinstance(out, FusedHeadInput) else out


def head_loss(out, targets: torch.Tensor, scale: torch.Tensor
              ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(sum_i scale_i x CE_i, the terms [N] fp32 detached) from the head's output, logits
    [N, V/tp] or a ``FusedHeadInput``, across the tensor-parallel vocabulary slices without ever
    gathering the full logits."""
    if isinstance(out, FusedHeadInput):
        from megatron.core import parallel_state
        tp = parallel_state.get_tensor_model_parallel_world_size()
        group = parallel_state.get_tensor_model_parallel_group() if tp > 1 else None
        start = parallel_state.get_tensor_model_parallel_rank() * out.weight.shape[0]
        return linear_cross_entropy(out.hidden, out.weight, targets, scale, group=group,
                                    vocab_start=start)
    terms = vocab_cross_entropy(out, targets) * scale.float()
    return terms.sum(), terms.detach()


def vocab_cross_entropy(out, targets: torch.Tensor) -> torch.Tensor:
    """Per-position CE [N] from the head's output (logits [N, V/tp] or a ``FusedHeadInput``)
    across the tensor-parallel vocabulary slices, without ever gathering the full logits."""
    from megatron.core import parallel_state
    if isinstance(out, FusedHeadInput):
        if torch.is_grad_enabled() and (out.hidden.requires_grad or out.weight.requires_grad):
            raise RuntimeError("vocab_cross_entropy: a fused head's per-position CE carries no "
                               "gradient; a loss goes through head_loss")
        return head_loss(out, targets, torch.ones_like(targets, dtype=torch.float32))[1]
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return F.cross_entropy(out.float(), targets, reduction="none")
    return vocab_parallel_cross_entropy(out.float().unsqueeze(1), targets.unsqueeze(1)
                                        ).squeeze(1)
