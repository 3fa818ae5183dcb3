"""The collators of the objectives: token sequences -> what the loss needs (inputs, targets, the
positions that enter the loss, p_mask, each sequence's divisor), one ``TrainBatch`` for all.

``MaskCollator`` (pretraining, LLaDA): a per-sequence mask ratio and the 1% variable length.
``NextTokenCollator`` (the autoregressive baseline): the same sequences and the same 1% cut, the
input unmasked, the target at position i the token at i + 1. The SFT collator (prompt never
masked) is data_pipeline/sft.py's. ``MixedCollator`` (objective.ar_loss_weight) appends to a
diffusion collator's rows the same sequences clean, as next-token rows.

The noise of a sample is a pure function of (objective.seed, its global index), so tensor- and
pipeline-parallel peers (which receive the same samples) and a resumed run corrupt it alike. The
cut is seeded by the global step, so every data-parallel rank cuts its micro-batches alike. The
forward process itself is data_pipeline/noise.py's (one implementation for collators and tests).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch

from data_pipeline.config import ObjectiveConfig
from data_pipeline.noise import batch_length, forward_process, sample_noise


class TrainBatch(NamedTuple):
    noisy: torch.Tensor  # [b, l] int64, the model's input (masked positions hold the mask id)
    targets: torch.Tensor  # [b, l] int64, what each position is trained to predict
    mask: torch.Tensor  # [b, l] bool, the positions that enter the loss (where the head runs)
    p_mask: torch.Tensor  # [b] float32, the mask ratio of each sequence (1 when nothing is masked)
    # [b] float32, what each sequence's summed loss is divided by: its length (pretraining), its
    # predicted tokens (autoregressive), its response length with padding (SFT)
    norm: torch.Tensor
    index: torch.Tensor  # [b] int64, global sample indices (the noise seeds)
    step: int  # the index of the optimizer step it belongs to (the steps done before that one)
    # [b, 3] int64, where each sample came from: (dataset, shard, member ordinal in the shard's
    # tar), in the order of data.datasets and each manifest's shards; set by the loader
    source: Optional[torch.Tensor] = None


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
        norm = torch.full(p_mask.shape, float(length))  # the paper divides by b x L
        return TrainBatch(noisy.contiguous(), tokens.contiguous(), mask.contiguous(), p_mask,
                          norm, index, step)


class NextTokenCollator:
    """Autoregressive: position i predicts token i + 1, so every position but the last enters
    the loss (a sequence's first token is never predicted), and the loss is the mean over them."""

    def __init__(self, cfg: ObjectiveConfig, seq_len: int, length_multiple: int = 1):
        self.cfg, self.seq_len, self.length_multiple = cfg, seq_len, length_multiple

    def __call__(self, tokens: torch.Tensor, index: torch.Tensor, step: int) -> TrainBatch:
        cfg = self.cfg
        length = batch_length(step, self.seq_len, cfg.variable_length_prob, cfg.seed,
                              self.length_multiple)
        tokens = tokens[:, :length].contiguous()
        targets, predicted = next_token_targets(tokens)
        b = tokens.shape[0]
        return TrainBatch(tokens, targets, predicted, torch.ones(b),
                          torch.full((b,), float(max(length - 1, 1))), index, step)


def next_token_targets(tokens: torch.Tensor):
    """(targets, predicted) of sequences [b, l]: the target at i is the token at i + 1; every
    position but the last is predicted (the last one's target is never read)."""
    targets = torch.roll(tokens, -1, dims=1)
    predicted = torch.ones_like(tokens, dtype=torch.bool)
    predicted[:, -1] = False
    return targets, predicted


class MixedCollator:
    """The mixed objective (objective.ar_loss_weight = w): a diffusion collator's micro-batch of
    b rows, then the same b sequences clean as rows [b, 2b): their next-token targets, every
    position but the last predicted (SFT: the response's tokens only), p_mask 1, and each row's
    divisor its predicted count / w, so that the one loss formula (framework/training/
    objective.py, which divides by the b diffusion rows) sums the diffusion loss and w x the mean
    next-token CE. The trainer has rows [b, 2b) attend causally."""

    def __init__(self, inner, weight: float, response_only: bool = False):
        self.inner, self.weight, self.response_only = inner, weight, response_only

    def __call__(self, tokens: torch.Tensor, index: torch.Tensor, step: int) -> TrainBatch:
        batch = self.inner(tokens, index, step)
        clean = batch.targets  # the sequences as the diffusion rows have them (cut alike)
        targets, predicted = next_token_targets(clean)
        if self.response_only:  # SFT: norm is the response length; predict its tokens only
            first = clean.shape[1] - batch.norm.long()  # the prompt length
            predicted &= torch.arange(clean.shape[1])[None, :] >= first[:, None] - 1
        count = predicted.sum(1).clamp(min=1).float()
        return batch._replace(
            noisy=torch.cat([batch.noisy, clean]), targets=torch.cat([batch.targets, targets]),
            mask=torch.cat([batch.mask, predicted]),
            p_mask=torch.cat([batch.p_mask, torch.ones_like(batch.p_mask)]),
            norm=torch.cat([batch.norm, count / self.weight]))


def shifted_reads(positions: torch.Tensor, length: int, rows: Optional[int] = None,
                  first: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dream's logit shift: the prediction for position j is the output at j - 1, and a row's
    first position predicts itself (Dream's ``cat([logits[:, :1], logits[:, :-1]], 1)``).

    ``positions``: flat indices into [b, length], ascending (row-major), of the positions to
    predict. Returns (``reads``: the flat positions the head must run at, ascending, each once;
    ``order``: for each of ``positions``, the index of its read in ``reads``): positions 0 and 1
    of a row both read position 0. Only rows below ``rows`` shift (None: all; the mixed
    objective's next-token rows read where they are). ``first`` [b]: each row's first position
    (left padding: its first real one; a span of a sequence: where that lies, relative to the
    span, negative when before it), None: 0."""
    row, col = positions // length, positions % length
    start = 0 if first is None else first.to(positions.device)[row]
    back = col > start
    if rows is not None:
        back &= row < rows
    if first is not None and bool((back & (col == 0)).any()):
        raise ValueError("logit shift: a position's prediction is read at the position before "
                         "it, which this forward lacks")
    reads, order = torch.unique_consecutive(positions - back.long(), return_inverse=True)
    return reads, order


def read_mask(reads: torch.Tensor, shape) -> torch.Tensor:
    """The [b, length] bool mask of flat positions ``reads``: a head's selection in the form the
    pipeline engine passes between stages (it selects in the same, row-major, order)."""
    mask = torch.zeros(shape[0] * shape[1], dtype=torch.bool, device=reads.device)
    mask[reads] = True
    return mask.view(shape[0], shape[1])
