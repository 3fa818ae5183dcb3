"""The best plain-PyTorch LLaDA training loop we know, the reference benchmarks/train_step.py
measures the framework against: one nn.Module, no megatron-core, no DeepSpeed.

The model has the parameters of framework/model/params.py's table, shape for shape (fused
q|k|v and gate|up projections as there: one GEMM each instead of three and two); LLaMA layers
(RMSNorm, RoPE, SwiGLU, no biases) with non-causal attention through
F.scaled_dot_product_attention (GQA without repeating keys and values); an untied head over the
padded vocabulary, run at the masked positions only; the LLaDA loss, the sum of CE / p_mask over
the masked positions divided by b x L. What makes it fast: each layer under torch.compile (the
layers share one compiled graph), the final norm + head + cross entropy under torch.compile
with a dynamic masked count, the masked positions found on the host (no device sync),
fused AdamW.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from framework.config import ModelConfig
from framework.model.params import padded_vocab_size


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # statistics in fp32 whatever the compute dtype; the result in the input's dtype
        y = F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps)
        return y.to(x.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [b, s, heads, d]; the two halves of d rotate together (the framework's layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, f = cfg.hidden_size, cfg.ffn_hidden_size
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_kv_heads
        self.d = h // self.heads
        self.attn_norm = RMSNorm(h, cfg.norm_eps)
        self.qkv = nn.Linear(h, (self.heads + 2 * self.kv_heads) * self.d, bias=False)
        self.proj = nn.Linear(self.heads * self.d, h, bias=False)
        self.mlp_norm = RMSNorm(h, cfg.norm_eps)
        self.fc1 = nn.Linear(h, 2 * f, bias=False)  # [gate (w1); up (w3)]
        self.fc2 = nn.Linear(f, h, bias=False)  # w2

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        d, kv = self.d, self.kv_heads * self.d
        q, k, v = self.qkv(self.attn_norm(x)).split([self.heads * d, kv, kv], dim=-1)
        q = rope(q.view(b, s, self.heads, d), cos, sin).transpose(1, 2)
        k = rope(k.view(b, s, self.kv_heads, d), cos, sin).transpose(1, 2)
        v = v.view(b, s, self.kv_heads, d).transpose(1, 2)
        # enable_gqa only where heads share keys: with it some SDPA backends step aside
        a = F.scaled_dot_product_attention(q, k, v, is_causal=False,
                                           enable_gqa=self.kv_heads != self.heads)
        x = x + self.proj(a.transpose(1, 2).reshape(b, s, self.heads * d))
        gate, up = self.fc1(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.fc2(F.silu(gate) * up)


class PlainLLaDA(nn.Module):
    """``compute_dtype``: the activations' dtype. bf16 with fp32 parameters is mixed precision
    under torch.autocast (the caller's); the embedding, which autocast leaves alone, is cast
    here so that the residual stream is bf16 as in the framework."""

    def __init__(self, cfg: ModelConfig, compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        h = cfg.hidden_size
        vocab = padded_vocab_size(cfg.vocab_size, cfg.pad_vocab_to_multiple_of)
        self.compute_dtype = compute_dtype
        self.embed = nn.Embedding(vocab, h)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(h, cfg.norm_eps)
        self.head = nn.Linear(h, vocab, bias=False)
        self.head_dim, self.rope_theta = h // cfg.num_attention_heads, cfg.rope_theta
        self._head_loss = self._head_loss_eager
        for p in self.parameters():
            if p.dim() == 2:  # norm gains stay 1
                nn.init.normal_(p, std=cfg.init_std)

    def compile_parts(self) -> None:
        """Each layer compiled (one graph shared by all), and the head + loss with the masked
        count dynamic (it differs every batch)."""
        for layer in self.layers:
            layer.compile()
        self._head_loss = torch.compile(self._head_loss_eager, dynamic=True)

    def _head_loss_eager(self, hidden: torch.Tensor, targets: torch.Tensor,
                         weights: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.norm(hidden))
        ce = F.cross_entropy(logits.float(), targets, reduction="none")
        return (ce * weights).sum()

    def loss(self, noisy: torch.Tensor, positions: torch.Tensor, targets: torch.Tensor,
             weights: torch.Tensor) -> torch.Tensor:
        """The LLaDA loss of a batch from ``masked_inputs``: sum over the masked positions of
        CE x weight (1 / (p_mask x b x L))."""
        b, s = noisy.shape
        # RoPE angles in fp32 whatever the parameters' dtype (no buffer: .to(bf16) would cast it)
        d, dev = self.head_dim, noisy.device
        inv_freq = 1.0 / self.rope_theta ** (torch.arange(0, d, 2, device=dev,
                                                          dtype=torch.float32) / d)
        freqs = torch.outer(torch.arange(s, device=dev, dtype=torch.float32), inv_freq)
        angles = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [s, 1, d]
        cos, sin = angles.cos().to(self.compute_dtype), angles.sin().to(self.compute_dtype)
        x = self.embed(noisy).to(self.compute_dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        # gathered by index, not by the boolean mask (which would wait for the device to count
        # it); the norm is per position, so norming the gathered positions alone is the same
        return self._head_loss(x.flatten(0, 1).index_select(0, positions), targets, weights)


def masked_inputs(noisy: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                  p_mask: torch.Tensor) -> tuple:
    """(noisy, flat positions of the masked tokens, their targets, their loss weights
    1 / (p_mask x b x L)), computed on the host where the batch is (the framework's trainer
    does the same): nothing in the step waits for the device."""
    b, s = noisy.shape
    positions = mask.reshape(-1).nonzero().squeeze(1)
    weights = (1.0 / (p_mask.float() * b * s))[:, None].expand(b, s).reshape(-1)
    return noisy, positions, targets.reshape(-1)[positions], weights[positions]
