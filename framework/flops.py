"""Training FLOPs per token, as ../shared/LLADA.md counts them for MFU."""

from __future__ import annotations

from framework.config import ModelConfig

# Dense bf16 matrix peak of the accelerators we report MFU against (measured, not datasheet).
PEAK_FLOPS = {"H100": 798e12, "H200": 798e12}


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters that take part in a matmul: attention and MLP weights of every layer plus the
    output head. The input embedding is a lookup and norms are elementwise: neither counts."""
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    attn = cfg.hidden_size * head_dim * (2 * cfg.num_attention_heads + 2 * cfg.num_kv_heads)
    mlp = 3 * cfg.hidden_size * cfg.ffn_hidden_size  # SwiGLU: gate, up, down
    return cfg.num_layers * (attn + mlp) + cfg.hidden_size * cfg.vocab_size


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """6 x matmul parameters + 12 x layers x L x hidden (non-causal attention: all L keys)."""
    return 6.0 * matmul_params(cfg) + 12.0 * cfg.num_layers * seq_len * cfg.hidden_size


def peak_flops(device_name: str) -> float | None:
    """Peak of a known accelerator by its CUDA name, else None (no MFU is reported on CPU)."""
    for key, value in PEAK_FLOPS.items():
        if key in device_name:
            return value
    return None
