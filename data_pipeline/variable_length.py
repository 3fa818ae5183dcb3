"""LLaDA's 1% variable length: with a small probability a whole batch is cut to a length drawn
uniformly from [1, L]. Seeded by the global step so every data-parallel rank cuts alike."""

from __future__ import annotations

import torch


def batch_length(step: int, seq_len: int, prob: float, seed: int, multiple: int = 1) -> int:
    """The length of this step's batches; a cut length is rounded up to ``multiple``."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + step) & 0x7FFF_FFFF_FFFF_FFFF)
    cut = torch.rand(1, generator=gen).item() < prob
    draw = int(torch.randint(1, seq_len + 1, (1,), generator=gen).item())
    if not cut:
        return seq_len
    return min(seq_len, -(-draw // multiple) * multiple)
