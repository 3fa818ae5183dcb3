"""Training FLOPs of a step and the accelerators' peaks, as ../shared/LLADA.md counts them for
MFU (the way Megatron-LM and torchtitan report it, so our MFU compares with theirs).

Per token: 6 x the matmul parameters of the body (attention and MLP weights; the input embedding
is a lookup and norms are elementwise) + 12 x layers x L x hidden for attention (non-causal: all
L keys; causal, the autoregressive objective: half of that, the keys at or before each query).
The output head's 6 x hidden x vocabulary is counted only where it runs: at the masked positions
(at every position but each sequence's last, autoregressive), from the step's actual count; so
two objectives trained for the same FLOPs take different numbers of steps. The parameters come
from the parameter table (framework/model/params.py), so the padded vocabulary the head
multiplies by is the one counted.
"""

from __future__ import annotations

from typing import Optional

from framework.config import ModelConfig
from framework.model.params import param_table

# Datasheet dense (no sparsity) bf16 peak per device, by the exact name torch.cuda reports.
DENSE_BF16_PEAK = {
    "NVIDIA H100 80GB HBM3": 989e12,  # H100 SXM5
    "NVIDIA H200": 989e12,  # H200 SXM
    "NVIDIA GH200 480GB": 989e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA H200 NVL": 835e12,
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA B200": 2250e12,
}
H100_SXM = DENSE_BF16_PEAK["NVIDIA H100 80GB HBM3"]
MEAN_MASKED = 0.5  # E[p_mask] for t ~ U(0, 1): where a plan expects the head to run


def peak_flops(device_name: str) -> Optional[float]:
    """The dense bf16 peak of a known accelerator, else None: no MFU is made up (CPU, or a
    card not in the table)."""
    return DENSE_BF16_PEAK.get(device_name)


class FlopCounter:
    """Training FLOPs (forward and backward) of the model for ``cfg`` trained with the
    objective ``kind`` (data_pipeline/config.py OBJECTIVES). ``mixed``: the mixed objective
    (``objective.ar_loss_weight`` > 0), whose micro-batches carry every sequence twice, noised
    (bidirectional) and clean (causal, next-token targets): the body runs twice per data token,
    attention once in full and once causal, and the head also at the clean rows' predicted
    positions (in ``masked``, as the trainer counts them)."""

    def __init__(self, cfg: ModelConfig, kind: str = "pretrain", mixed: bool = False):
        table = param_table(cfg)
        self.body = sum(p.numel for p in table if p.kind.matmul and not p.is_head)
        self.head = sum(p.numel for p in table if p.is_head)
        # the attention's width: heads x head dimension (the hidden size unless model.head_dim
        # says otherwise, as Qwen3's does)
        self.layers, self.hidden = cfg.num_layers, cfg.num_attention_heads * cfg.kv_channels
        self.causal = kind == "ar"
        self.mixed = mixed and not self.causal

    def step(self, tokens: int, seq_len: int, masked: int) -> float:
        """FLOPs of a step of ``tokens`` data tokens in sequences of ``seq_len`` (after the 1%
        cut) whose head ran at ``masked`` positions."""
        attention = 12.0 * self.layers * seq_len * self.hidden * tokens
        passes, share = (2.0, 1.5) if self.mixed else (1.0, 0.5 if self.causal else 1.0)
        return passes * 6.0 * self.body * tokens + share * attention + 6.0 * self.head * masked

    def expected_per_token(self, seq_len: int) -> float:
        """Per token with the head where it runs on average (``llada plan``): half the tokens
        masked (pretraining; SFT's responses vary, the same half is assumed), every one but each
        sequence's last (autoregressive; the mixed objective's clean rows too)."""
        next_token = (seq_len - 1) / seq_len
        head = next_token if self.causal else MEAN_MASKED + (next_token if self.mixed else 0.0)
        return self.step(1, seq_len, head)
