"""Core attention on ``torch.nn.functional.scaled_dot_product_attention``: non-causal (LLaDA) or
causal (the autoregressive baseline), as the layer spec's ``attn_mask_type`` says.

megatron-core's own ``DotProductAttention`` assumes CUDA and a causal/padding mask; LLaDA needs
every token to attend to every token. On CUDA the backend is chosen here, never SDPA's silent
math fallback (an s x s matrix per head): training in bf16/fp16 runs the flash kernel (cuDNN's
too where there is no GQA), reading grouped key/value heads through ``enable_gqa`` without
materialising copies, which only flash supports; a padding mask or fp32 (inference, an fp32 run)
runs the memory-efficient kernel, with the grouped heads repeated for it. A shape none of them
takes is an error naming it. On CPU SDPA picks its own.

Training passes no mask, except while adapting an autoregressive model to diffusion: the trainer
sets a training mask on every attention module before a step (``set_training_mask``), read at the
batch's length: DiffuLLaMA's annealed mask (the causal mask and a growing share of the keys after
each query: framework/training/objective.py ``anneal_mask``) for the diffusion rows, and causal
attention for the mixed objective's next-token rows, the batch's last ``causal_rows`` (a call of
their own, so that they run the flash kernel's causal path while the others run theirs). None,
the default: the fast path. Layers built causal (the autoregressive baseline) ignore it.

Inference (framework/inference/) passes an ``Attend`` in megatron's
``attention_mask`` argument, which megatron hands through unchanged: which keys are real (padding
of a batch of prompts is attended by nobody) and a key/value cache, so that a forward of a span
of the sequence (the current block of the sampler) reads the other positions' keys and values
from a forward of the whole sequence. The same layer code runs in both; only the keys and
values attended differ.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


@dataclass
class Attend:
    """What inference hands every layer's attention in place of a mask.

    ``key_mask`` [b, S] bool: True where a position holds a real token (S: the whole sequence);
    False positions are attended by nobody. ``start``: where this forward's tokens begin in the
    whole sequence (its RoPE positions follow). ``cache``: with ``store``, this forward covers the
    whole sequence and each layer keeps its keys and values [b, kv heads, S, d]; without, this
    forward covers positions [start, start + s) and attends to the cached keys and values with
    that span's replaced by its fresh ones."""

    key_mask: Optional[torch.Tensor] = None
    start: int = 0
    cache: Optional[Dict[int, tuple]] = field(default=None)
    store: bool = False


def cuda_backends(dtype: torch.dtype, *, masked: bool, gqa: bool) -> list:
    """The SDPA backends allowed on CUDA (torch picks among them by its own priority, flash
    first); never the math one. Flash takes no mask and no fp32; cuDNN's and the
    memory-efficient kernels take no grouped key/value heads."""
    if not masked and dtype in (torch.bfloat16, torch.float16):
        return [SDPBackend.FLASH_ATTENTION] + ([] if gqa else [SDPBackend.CUDNN_ATTENTION])
    return [SDPBackend.EFFICIENT_ATTENTION]


class SDPAttention(MegatronModule):
    """Drop-in ``core_attention`` for megatron-core's ``SelfAttention``: [s, b, heads, d] in,
    [s, b, heads * d] out; no mask at all (``AttnMaskType.no_mask``: LLaDA) or each query
    attending to the keys at or before its position (``AttnMaskType.causal``)."""

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type,
                 attention_type: str, attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection=None):
        super().__init__(config=config)
        # Parameters megatron passes to every core attention; of them only the mask type is used
        # (no dropout in LLaDA, default 1/sqrt(d) scale, no context parallel).
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention does not support context parallelism")
        if attn_mask_type not in (AttnMaskType.no_mask, AttnMaskType.causal):
            raise ValueError(f"SDPAttention: mask type {attn_mask_type} is neither no_mask nor "
                             "causal")
        self.causal = attn_mask_type == AttnMaskType.causal
        self.layer_number = layer_number  # the key of this layer's entry in an Attend's cache
        self.softmax_scale = softmax_scale
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        # training's mask (set_training_mask): two plain attributes, not an object, so that a
        # compiled layer guards on the tensor's shape and not on its identity (no recompilation
        # when each step brings a new mask)
        self.training_mask: Optional[torch.Tensor] = None
        self.causal_rows = 0

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor], attn_mask_type=None,
                attention_bias=None, packed_seq_params=None) -> torch.Tensor:
        attend = attention_mask
        if (attend is not None and not isinstance(attend, Attend)) or attention_bias is not None \
                or packed_seq_params is not None:
            raise ValueError("LLaDA attention takes no mask, bias or packing (only an Attend)")
        s, b, heads, d = query.shape
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # -> [b, h, s, d]
        if attend is None and not self.causal and (self.training_mask is not None
                                                   or self.causal_rows):
            out = self._training(q, k, v)
        else:
            out = self._attend(q, k, v, attend)
        return out.permute(2, 0, 1, 3).reshape(s, b, heads * d)

    def _training(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Training under a mask: the first rows under ``training_mask`` (cut to this batch's
        length), the last ``causal_rows`` causally."""
        s, n = q.shape[2], q.shape[0] - self.causal_rows
        mask = self.training_mask
        if mask is not None:
            mask = mask[..., :s, :s] if mask.shape[0] == 1 else mask[:n, ..., :s, :s]
        parts = []
        if n > 0:
            parts.append(self._sdpa(q[:n], k[:n], v[:n], mask, causal=False))
        if self.causal_rows:
            parts.append(self._sdpa(q[n:], k[n:], v[n:], None, causal=True))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                attend: Optional[Attend]) -> torch.Tensor:
        """Training's fast path (``attend`` None) or inference's padding mask and cache."""
        s = q.shape[2]
        mask = None
        if attend is not None:
            k, v = self._cached(attend, k, v)
            if attend.key_mask is not None:
                mask = attend.key_mask[:, None, None, :].to(q.device)
            if self.causal:  # queries at start.., keys at 0..: each sees its past and itself
                pos = torch.arange(k.shape[2], device=q.device)
                here = (attend.start + torch.arange(s, device=q.device))[:, None]
                past = (pos[None, :] <= here)[None, None]
                mask = past if mask is None else mask & past
                # and always itself: a left pad's query would otherwise see no key at all, a row
                # that some CUDA kernels fill with NaN, which the next layer spreads to real rows
                mask = mask | (pos[None, :] == here)[None, None]
        return self._sdpa(q, k, v, mask, causal=self.causal and attend is None)

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              mask: Optional[torch.Tensor], causal: bool) -> torch.Tensor:
        """SDPA [b, h, s, d] -> [b, h, s, d] on the backends ``cuda_backends`` allows."""
        heads = q.shape[1]
        gqa = k.shape[1] != heads
        backends = cuda_backends(q.dtype, masked=mask is not None, gqa=gqa) if q.is_cuda else None
        if gqa and backends is not None and SDPBackend.FLASH_ATTENTION not in backends:
            k, v = (x.repeat_interleave(heads // x.shape[1], dim=1) for x in (k, v))
            gqa = False
        args = dict(attn_mask=mask, is_causal=causal,
                    scale=self.softmax_scale, dropout_p=self.dropout_p if self.training else 0.0,
                    enable_gqa=gqa)
        if backends is None:
            out = F.scaled_dot_product_attention(q, k, v, **args)
        else:
            try:
                with sdpa_kernel(backends):
                    out = F.scaled_dot_product_attention(q, k, v, **args)
            except RuntimeError as e:
                raise RuntimeError(
                    f"attention: no {'/'.join(b.name for b in backends)} kernel for q "
                    f"{tuple(q.shape)} k {tuple(k.shape)} {q.dtype}"
                    f"{' with a mask' if mask is not None else ''} (the math fallback is not "
                    f"used on CUDA): {str(e).splitlines()[0]}") from e
        return out

    def _cached(self, attend: Attend, k: torch.Tensor, v: torch.Tensor):
        """This forward's keys and values, completed from (or stored into) the cache."""
        if attend.cache is None:
            return k, v
        if attend.store:
            attend.cache[self.layer_number] = (k, v)
            return k, v
        ck, cv = attend.cache[self.layer_number]
        lo, hi = attend.start, attend.start + k.shape[2]
        return (torch.cat([ck[:, :, :lo], k, ck[:, :, hi:]], dim=2),
                torch.cat([cv[:, :, :lo], v, cv[:, :, hi:]], dim=2))


def set_training_mask(model: torch.nn.Module, mask: Optional[torch.Tensor] = None,
                      causal_rows: int = 0) -> None:
    """What every (non-causal) attention module of ``model`` (this rank's part) attends in
    training from now on: ``mask`` a bool [1 or b, 1, S, S] (True: the query attends the key;
    S at least the batch's length, read at it), None: every key; the batch's last
    ``causal_rows`` rows attend causally instead. ``set_training_mask(model)``: the fast path."""
    for module in model.modules():
        if isinstance(module, SDPAttention):
            module.training_mask, module.causal_rows = mask, causal_rows

