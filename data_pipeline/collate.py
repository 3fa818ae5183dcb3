"""The pretraining collator: token sequences -> what the loss needs (noisy ids, targets, the
mask, p_mask), with LLaDA's per-sequence mask ratio and 1% variable length.

The noise of a sample is a pure function of (objective.seed, its global index), so tensor- and
pipeline-parallel peers (which receive the same samples) and a resumed run corrupt it alike. The
cut is seeded by the global step, so every data-parallel rank cuts its micro-batches alike. The
forward process itself is data_pipeline/noise.py's (one implementation for collators and tests).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from data_pipeline.config import ObjectiveConfig
from data_pipeline.noise import batch_length, forward_process, sample_noise


class TrainBatch(NamedTuple):
    noisy: torch.Tensor  # [b, l] int64, masked positions hold the mask id
    targets: torch.Tensor  # [b, l] int64, the clean tokens
    mask: torch.Tensor  # [b, l] bool, the positions that enter the loss
    p_mask: torch.Tensor  # [b] float32
    index: torch.Tensor  # [b] int64, global sample indices (the noise seeds)
    step: int  # the index of the optimizer step it belongs to (the steps done before that one)


class MaskCollator:
    def __init__(self, cfg: ObjectiveConfig, mask_id: int, seq_len: int, length_multiple: int = 1):
        self.cfg, self.mask_id, self.seq_len = cfg, mask_id, seq_len
        self.length_multiple = length_multiple  # sequence parallelism splits the length

    def __call__(self, tokens: torch.Tensor, index: torch.Tensor, step: int) -> TrainBatch:
        cfg = self.cfg
        noise = sample_noise(index, self.seq_len, cfg.seed, cfg.t_sampling)
        noisy, mask, p_mask = forward_process(tokens, noise, self.mask_id, cfg.eps)
        length = batch_length(step, self.seq_len, cfg.variable_length_prob, cfg.seed,
                              self.length_multiple)
        if length < tokens.shape[1]:  # masks drawn at full length, then the whole batch is cut
            noisy, tokens, mask = noisy[:, :length], tokens[:, :length], mask[:, :length]
        return TrainBatch(noisy.contiguous(), tokens.contiguous(), mask.contiguous(), p_mask,
                          index, step)
