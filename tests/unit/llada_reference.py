"""An independent forward pass of the public ``LLaDAModelLM`` (GSAI-ML/LLaDA-8B-Base,
``modeling_llada.py`` with ``block_type: llama``), in plain PyTorch over the release's state-dict
keys. It shares no code with framework/ (no megatron, no SDPA): the export test runs it on
``to_hf(weights)`` and our model on ``weights``, and equal logits mean the export is the same
model.

The math, as in the release:
  x = wte[ids]                                    (no input scaling, no positional embedding)
  per block i:
    h = attn_norm(x)                              RMSNorm: x * rsqrt(mean(x^2) + eps) * weight
    q, k, v = q_proj(h), k_proj(h), v_proj(h)     heads [B, n, T, d], d = d_model / n_heads
    q, k = rope(q), rope(k)                       rotate-half: t*cos + cat(-t2, t1)*sin,
                                                  angles cat(freqs, freqs), freqs = pos / theta^(2j/d)
    k, v repeated per query group (repeat_interleave: kv head g serves q heads g*r .. g*r+r-1)
    att = softmax(q k^T / sqrt(d)) v              no causal mask, no attention mask
    x = x + attn_out(att heads side by side)
    h = ff_norm(x)
    x = x + ff_out(silu(ff_proj(h)) * up_proj(h))
  logits = ff_out(ln_f(x))                        (wte^T when weight_tying)
"""

from __future__ import annotations

import math
from typing import Mapping

import torch

P = "model.transformer."


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rope(t: torch.Tensor, theta: float) -> torch.Tensor:
    """t: [B, heads, T, d]."""
    d, T = t.shape[-1], t.shape[-2]
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    freqs = torch.arange(T, dtype=torch.float32)[:, None] * inv_freq[None, :]
    angles = torch.cat([freqs, freqs], dim=-1)  # [T, d]
    t1, t2 = t[..., : d // 2], t[..., d // 2:]
    rotated = torch.cat([-t2, t1], dim=-1)
    return t * angles.cos() + rotated * angles.sin()


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.einsum("...i,oi->...o", x, w)


@torch.no_grad()
def llada_forward(sd: Mapping[str, torch.Tensor], config: Mapping, input_ids: torch.Tensor
                  ) -> torch.Tensor:
    """Logits [B, T, embedding_size] of ``LLaDAModelLM`` with state dict ``sd`` and the
    config.json fields ``config`` (d_model, n_heads, n_kv_heads, n_layers, rms_norm_eps,
    rope_theta, weight_tying)."""
    n_heads, n_kv = config["n_heads"], config["n_kv_heads"] or config["n_heads"]
    d = config["d_model"] // n_heads
    eps, theta = config["rms_norm_eps"], config["rope_theta"]
    B, T = input_ids.shape
    x = sd[P + "wte.weight"][input_ids]
    for i in range(config["n_layers"]):
        b = f"{P}blocks.{i}."
        h = rms_norm(x, sd[b + "attn_norm.weight"], eps)
        q = linear(h, sd[b + "q_proj.weight"]).view(B, T, n_heads, d).transpose(1, 2)
        k = linear(h, sd[b + "k_proj.weight"]).view(B, T, n_kv, d).transpose(1, 2)
        v = linear(h, sd[b + "v_proj.weight"]).view(B, T, n_kv, d).transpose(1, 2)
        q, k = rope(q, theta), rope(k, theta)
        k = k.repeat_interleave(n_heads // n_kv, dim=1)
        v = v.repeat_interleave(n_heads // n_kv, dim=1)
        scores = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(d)
        att = torch.einsum("bhqk,bhkd->bhqd", scores.softmax(dim=-1), v)
        att = att.transpose(1, 2).reshape(B, T, n_heads * d)
        x = x + linear(att, sd[b + "attn_out.weight"])
        h = rms_norm(x, sd[b + "ff_norm.weight"], eps)
        gated = torch.nn.functional.silu(linear(h, sd[b + "ff_proj.weight"])) \
            * linear(h, sd[b + "up_proj.weight"])
        x = x + linear(gated, sd[b + "ff_out.weight"])
    x = rms_norm(x, sd[P + "ln_f.weight"], eps)
    head = sd[P + "wte.weight"] if config.get("weight_tying") else sd[P + "ff_out.weight"]
    return linear(x, head)
