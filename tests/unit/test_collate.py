"""The pretraining collator: per-sequence mask ratios seeded by the global sample index, the
1% variable-length cut seeded by the step, and the optional lower-variance t sampling."""

import pytest
import torch

from data_pipeline.collate import MaskCollator
from data_pipeline.noise import batch_length
from data_pipeline.config import ObjectiveConfig
from data_pipeline.noise import sample_noise

MASK = 3


def collate(tokens, index, step=0, **cfg):
    return MaskCollator(ObjectiveConfig(**cfg), MASK, tokens.shape[1])(tokens, index, step)


def test_same_sample_gets_the_same_mask_wherever_it_lands():
    tokens = torch.randint(10, 500, (6, 96))
    a = collate(tokens, torch.arange(100, 106), variable_length_prob=0.0)
    # the same samples in another order, in another batch, on another rank
    perm = torch.tensor([4, 0, 5, 2])
    b = collate(tokens[perm], perm + 100, step=7, variable_length_prob=0.0)
    assert torch.equal(b.mask, a.mask[perm]) and torch.equal(b.noisy, a.noisy[perm])
    assert torch.equal(b.p_mask, a.p_mask[perm])
    c = collate(tokens, torch.arange(100, 106), seed=1, variable_length_prob=0.0)
    assert not torch.equal(c.mask, a.mask)  # objective.seed changes the noise


def test_mean_masked_fraction_tracks_mean_t_over_ten_thousand_sequences():
    n, length = 10_000, 256
    tokens = torch.randint(10, 500, (n, length))
    batch = collate(tokens, torch.arange(n), variable_length_prob=0.0)
    masked = batch.mask.float().mean().item()
    noise = sample_noise(torch.arange(n), length, seed=0)
    mean_t = noise.t.mean().item()
    assert abs(masked - mean_t) / mean_t < 0.02
    assert abs(mean_t - 0.5) < 0.02  # t ~ U(0, 1)
    per_seq = batch.mask.float().mean(1)
    assert (per_seq - batch.p_mask).abs().mean() < 0.03  # one ratio per sequence
    assert torch.all(batch.noisy[batch.mask] == MASK)
    assert torch.equal(batch.noisy[~batch.mask], batch.targets[~batch.mask])


def test_cut_batches_are_one_percent_over_twenty_thousand_steps():
    length = 64
    col = MaskCollator(ObjectiveConfig(), MASK, length)
    tokens = torch.randint(10, 500, (2, length))
    lengths = [col(tokens, torch.tensor([2 * s, 2 * s + 1]), s).noisy.shape[1]
               for s in range(20_000)]
    cut = [n for n in lengths if n < length]
    # (a cut that draws exactly L leaves the batch whole: 1 in L of the cuts)
    assert 0.007 <= len(cut) / 20_000 <= 0.013
    assert all(1 <= n <= length for n in cut)


def test_a_cut_batch_masks_kept_positions_as_the_full_batch_would():
    tokens = torch.randint(10, 500, (4, 128))
    index = torch.arange(4)
    full = collate(tokens, index, step=0, variable_length_prob=0.0)
    step = next(s for s in range(10_000) if batch_length(s, 128, 0.01, 0) < 128)
    cut = collate(tokens, index, step=step)
    n = cut.noisy.shape[1]
    assert n < 128 and cut.noisy.shape == cut.mask.shape == cut.targets.shape == (4, n)
    assert torch.equal(cut.mask, full.mask[:, :n]) and torch.equal(cut.targets, tokens[:, :n])


@pytest.mark.parametrize("mode", ["stratified", "antithetic"])
def test_lower_variance_t_sampling_keeps_the_distribution(mode):
    b = 8
    ts = torch.cat([sample_noise(torch.arange(k * b, (k + 1) * b), 4, 0, mode).t
                    for k in range(2000)])
    assert abs(ts.mean().item() - 0.5) < 0.01
    assert ts.min() >= 0 and ts.max() <= 1
    # the batch mean of t varies much less than with independent draws
    uniform = torch.stack([sample_noise(torch.arange(k * b, (k + 1) * b), 4, 0).t.mean()
                           for k in range(2000)])
    lower = ts.view(2000, b).mean(1)
    assert lower.var() < 0.3 * uniform.var()
    if mode == "stratified":
        strata = (ts.view(2000, b) * b).floor().sort(1).values
        assert torch.equal(strata, torch.arange(b).float().expand(2000, b))
    else:
        pairs = ts.view(-1, 2)
        assert torch.allclose(pairs.sum(1), torch.ones(len(pairs)))
