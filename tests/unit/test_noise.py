"""The forward process and its counter-based noise (data_pipeline/noise.py): seeded by the
sample's global index, a masked fraction that tracks t, masks that a cut batch keeps, and no two
samples whose masks are shifted copies of one another."""

import numpy as np
import torch

from data_pipeline.noise import forward_process, sample_noise
from data_pipeline.splitmix import mix64 as _mix64

MASK = 7


def test_noise_is_seeded_by_sample_index_not_batch_position():
    a = sample_noise(torch.tensor([5, 9, 11]), 32, seed=3)
    b = sample_noise(torch.tensor([11, 5]), 32, seed=3)
    assert torch.equal(a.t[0], b.t[1]) and torch.equal(a.u[2], b.u[0])
    c = sample_noise(torch.tensor([5]), 32, seed=4)
    assert not torch.equal(a.u[0], c.u[0])


def test_mean_masked_fraction_tracks_t():
    n, length, eps = 2000, 256, 1e-3
    tokens = torch.randint(10, 100, (n, length))
    noise = sample_noise(torch.arange(n), length, seed=0)
    _, mask, p_mask = forward_process(tokens, noise, MASK, eps)
    frac = mask.float().mean(1)
    assert torch.allclose(p_mask, (1 - eps) * noise.t + eps)
    assert (frac - p_mask).abs().mean() < 0.03  # per sequence: binomial noise only
    assert abs(frac.mean() - p_mask.mean()) < 0.005
    # t ~ U(0, 1): the batch mean of p_mask is near 1/2
    assert abs(p_mask.mean().item() - 0.5) < 0.03


def test_masked_positions_get_mask_id_and_targets_never_do():
    tokens = torch.randint(10, 100, (64, 50))
    noisy, mask, _ = forward_process(tokens, sample_noise(torch.arange(64), 50, 1), MASK, 1e-3)
    assert torch.all(noisy[mask] == MASK)
    assert torch.equal(noisy[~mask], tokens[~mask])
    assert not torch.any(tokens[mask] == MASK)  # targets are the clean tokens


def test_cut_batch_masks_kept_positions_as_the_full_batch_would():
    tokens = torch.randint(10, 100, (4, 40))
    noise = sample_noise(torch.arange(4), 40, seed=2)
    full = forward_process(tokens, noise, MASK, 1e-3)
    cut = forward_process(tokens[:, :13], noise, MASK, 1e-3)
    assert torch.equal(cut.mask, full.mask[:, :13])


def shifted_copies(u24: np.ndarray, window: int = 4) -> int:
    """How many windows of ``window`` consecutive uniforms (24-bit integers) occur in more than
    one sample: by chance about (rows x positions)^2 / 2^97, that is never; a sample whose masks
    are a shifted copy of another's shares all its windows with it."""
    rows, length = u24.shape
    windows = np.stack([u24[:, k:length - window + 1 + k] for k in range(window)], axis=-1)
    keys = np.ascontiguousarray(windows.astype(np.uint32)).view(np.dtype((np.void, 4 * window)))
    keys = keys.reshape(rows, -1)
    owner = np.repeat(np.arange(rows), keys.shape[1])
    order = np.argsort(keys.ravel(), kind="stable")
    flat, owner = keys.ravel()[order], owner[order]
    same = (flat[1:] == flat[:-1]) & (owner[1:] != owner[:-1])
    return int(same.sum())


def key_plus_position(index: np.ndarray, length: int) -> np.ndarray:
    """The scheme this replaced, exactly: a 32-bit key per sample (its index mixed to 64 bits,
    folded) plus the position times a constant, through a 32-bit finaliser. Two keys that differ
    by k constants give the same sequence k positions apart."""
    base = _mix64(_mix64(index) ^ _mix64(np.zeros_like(index)))
    key = (base >> np.uint64(32)).astype(np.uint32) ^ base.astype(np.uint32)
    with np.errstate(over="ignore"):
        x = key[:, None] + np.arange(length, dtype=np.uint32) * np.uint32(0x9E3779B9)
        x ^= x >> np.uint32(16)
        x *= np.uint32(0x7FEB352D)
        x ^= x >> np.uint32(15)
        x *= np.uint32(0x846CA68B)
        x ^= x >> np.uint32(16)
    return x >> np.uint32(8)


def test_no_two_samples_masks_are_shifted_copies():
    n, length = 50_000, 64
    u = sample_noise(torch.arange(n), length, seed=0).u.numpy()
    assert shifted_copies((u * 2**24).astype(np.uint32)) == 0
    # the check finds what it looks for: the old construction shares over a thousand windows
    # between samples here (dozens of shifted pairs)
    assert shifted_copies(key_plus_position(np.arange(n, dtype=np.uint64), length)) > 100


def test_two_samples_masks_are_independent():
    """Neighbouring samples (the same micro-batch, consecutive indices) and samples far apart:
    their uniforms at the same and at shifted positions are uncorrelated, and each pair of
    positions is masked together as often as p_mask_a x p_mask_b says."""
    n, length = 20_000, 128
    index = torch.arange(n)
    noise = sample_noise(index, length, seed=5)
    u = noise.u.double().numpy()
    for a, b in ((u[:-1], u[1:]), (u[: n // 2], u[n // 2:]), (u[:-1, :-1], u[1:, 1:]),
                 (u[:-1, 1:], u[1:, :-1])):
        r = np.corrcoef(a.ravel(), b.ravel())[0, 1]
        assert abs(r) < 4 / np.sqrt(a.size), r  # 4 sigma of an independent pair's estimate
    _, mask, p_mask = forward_process(torch.zeros(n, length, dtype=torch.long), noise, MASK, 1e-3)
    both = (mask[:-1] & mask[1:]).double().sum().item()
    expected = (p_mask[:-1] * p_mask[1:]).double().sum().item() * length
    assert abs(both - expected) < 4 * np.sqrt(expected), (both, expected)
