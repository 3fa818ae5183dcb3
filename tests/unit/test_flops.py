"""FLOPs and MFU as the field reports them: one step's count against a hand count, the head
counted at the masked positions only, and the datasheet peaks by exact device name."""

import pytest

from framework.config import ModelConfig
from framework.training.flops import DENSE_BF16_PEAK, FlopCounter, peak_flops
from framework.training.metrics import MFU, StepResult, Window
from framework.training.objective import LossByT

# 2 layers, hidden 64, 4 heads of 16 with 2 kv heads, FFN 96, vocabulary 300 padded to 384
TINY = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_kv_heads=2,
                   ffn_hidden_size=96, vocab_size=300)


def test_one_step_against_a_hand_count():
    # per layer: qkv (4 + 2 x 2) x 16 x 64 = 8192, proj 64 x 64 = 4096, fc1 2 x 96 x 64 = 12288,
    # fc2 64 x 96 = 6144: 30720; two layers 61440. Head 384 x 64 = 24576 (the padded rows run).
    # A step of 2 sequences of 10 tokens with 7 masked positions:
    #   6 x 61440 x 20 + 12 x 2 layers x 10 x 64 x 20 + 6 x 24576 x 7
    hand = 6 * 61440 * 20 + 12 * 2 * 10 * 64 * 20 + 6 * 24576 * 7
    assert hand == 7_372_800 + 307_200 + 1_032_192 == 8_712_192
    assert FlopCounter(TINY).step(tokens=20, seq_len=10, masked=7) == hand
    # the embedding is a lookup and costs nothing; norms neither
    assert FlopCounter(TINY).step(tokens=0, seq_len=0, masked=0) == 0


def test_causal_attention_counts_half_and_the_autoregressive_head_every_predicted_position():
    hand = 6 * 61440 * 20 + 12 * 2 * 10 * 64 * 20 // 2 + 6 * 24576 * 18  # 2 x (10 - 1) predicted
    assert FlopCounter(TINY, "ar").step(tokens=20, seq_len=10, masked=18) == hand
    assert FlopCounter(TINY, "sft").step(20, 10, 7) == FlopCounter(TINY).step(20, 10, 7)
    # a plan expects the head at every position (autoregressive), at half of them (diffusion)
    per_token = 6 * 61440 + 12 * 2 * 10 * 64
    assert FlopCounter(TINY, "ar").expected_per_token(10) == pytest.approx(
        6 * 61440 + 12 * 2 * 10 * 64 / 2 + 6 * 24576 * 0.9)
    assert FlopCounter(TINY).expected_per_token(10) == per_token + 6 * 24576 * 0.5


def test_the_mixed_objective_counts_both_passes_and_both_heads():
    """objective.ar_loss_weight: each sequence noised (bidirectional) and clean (causal): the
    body twice, attention once in full and once causal, the head where either predicts."""
    hand = 2 * 6 * 61440 * 20 + 12 * 2 * 10 * 64 * 20 * 3 // 2 + 6 * 24576 * (7 + 18)
    assert FlopCounter(TINY, mixed=True).step(tokens=20, seq_len=10, masked=25) == hand
    assert FlopCounter(TINY, "ar", mixed=True).step(20, 10, 18) == \
        FlopCounter(TINY, "ar").step(20, 10, 18)  # the baseline has no mixed loss
    assert FlopCounter(TINY, mixed=True).expected_per_token(10) == pytest.approx(
        2 * 6 * 61440 + 1.5 * 12 * 2 * 10 * 64 + 6 * 24576 * (0.5 + 0.9))
    # head_dim: attention counts heads x head_dim, not the hidden size
    wide = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_kv_heads=2,
                       ffn_hidden_size=96, vocab_size=300, head_dim=32)
    assert FlopCounter(wide).hidden == 128


def test_the_window_counts_each_steps_own_length_and_masks(world):
    """Two steps, one cut by the 1% rule: FLOPs from each step's length and masked count."""
    flops = FlopCounter(TINY)
    window = Window(world, flops, peak=1e12)
    steps = [StepResult(step=1, loss=1.0, lr=1e-3, grad_norm=1.0, tokens=40, seq_len=20,
                        masked=13, seconds=0.5, skipped=False),
             StepResult(step=2, loss=1.0, lr=1e-3, grad_norm=1.0, tokens=10, seq_len=5,
                        masked=4, seconds=0.25, skipped=False)]
    for r in steps:
        window.add(r)
    values = window.take(steps[-1], consumed_tokens=50, skipped_steps=0, data_counters={},
                         loss_by_t=LossByT())
    expected = flops.step(40, 20, 13) + flops.step(10, 5, 4)
    assert values[MFU] == pytest.approx(expected / (0.75 * 1e12 * world.world_size))
    assert values["train/tokens_per_s"] == pytest.approx(50 / 0.75)
    assert values["time/step_seconds"] == pytest.approx(0.375)


def test_peaks_by_exact_name_not_substring():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12 == peak_flops("NVIDIA H200")
    assert peak_flops("NVIDIA H100 PCIe") == 756e12  # not the SXM's, though it says H100
    assert peak_flops("NVIDIA H100 NVL") == 835e12
    assert peak_flops("NVIDIA H100") is None and peak_flops("cpu") is None
    assert all(v > 1e14 for v in DENSE_BF16_PEAK.values())


def test_no_mfu_where_the_peak_is_unknown(world):
    window = Window(world, FlopCounter(TINY), peak=None)
    step = StepResult(1, 1.0, 1e-3, 1.0, tokens=40, seq_len=20, masked=13, seconds=0.5,
                      skipped=False)
    window.add(step)
    values = window.take(step, consumed_tokens=40, skipped_steps=0, data_counters={},
                         loss_by_t=LossByT())
    assert MFU not in values and window.run_mfu() is None
    assert values["train/tokens_per_s"] == pytest.approx(80)
