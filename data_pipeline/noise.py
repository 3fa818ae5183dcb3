"""LLaDA's forward process (../shared/LLADA.md) and the noise it draws: one t per sequence, one
uniform per token, and the 1% variable-length cut.

Counter-based: every number is a pure function of (objective.seed, a counter), computed by
SplitMix64's output function on ``counter x golden + key`` (data_pipeline/splitmix.py), vectorised
over a whole batch with no generator state to seed, save or replay. So tensor/pipeline-parallel
peers, which receive the same samples, and a resumed run corrupt a sample alike whatever rank or
step it lands on; and every data-parallel rank cuts a step's batches alike.

Counters: token j of sample i is counter ``i << 24 | j`` (sequences up to 16M tokens, sample
indices below 2^40), t of sample i is counter i of another stream, the cut of step s counters 2s
and 2s + 1 of a third. Distinct counters are distinct inputs of a bijection before the output mix,
so no two samples' masks are shifted copies of one another (as they are when a 32-bit per-sample
key is added to the position: two keys that differ by k increments give the same sequence k
positions apart).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np
import torch

from data_pipeline.splitmix import draw, key, subkey, unit24, unit53

# one stream per use: the same counter in two streams gives unrelated numbers
_TOKENS, _T, _STRATA, _CUT = (np.uint64(s) for s in (0x243F6A8885A308D3, 0x13198A2E03707344,
                                                     0xA4093822299F31D0, 0x082EFA98EC4E6C89))
POSITION_BITS = 24
MAX_SAMPLES = 1 << (64 - POSITION_BITS)


T_BUCKETS = 10  # the loss (and the held-out bound) by mask ratio: tenths of [0, 1]


def t_bucket_names() -> list:
    return [f"{k / T_BUCKETS:.1f}-{(k + 1) / T_BUCKETS:.1f}" for k in range(T_BUCKETS)]


class Noise(NamedTuple):
    t: torch.Tensor  # [b] float32, t ~ U(0, 1) per sequence
    u: torch.Tensor  # [b, L] float32, one uniform per token; a token is masked when u < p_mask


class Corrupted(NamedTuple):
    noisy: torch.Tensor  # [b, L] token ids with masked positions set to the mask id
    mask: torch.Tensor  # [b, L] bool, True where masked (these positions enter the loss)
    p_mask: torch.Tensor  # [b] float32, the masking probability of each sequence


def sample_noise(sample_index: torch.Tensor, seq_len: int, seed: int,
                 t_sampling: str = "uniform") -> Noise:
    """t and per-token uniforms of each sample, a pure function of (seed, its global index).

    Drawn at full ``seq_len`` so a batch cut to a shorter length (1% variable length) masks each
    kept position exactly as the uncut batch would. ``t_sampling`` (lower-variance estimators of
    the same expectation, across the micro-batch): ``stratified`` puts one t in each of the b
    strata [k/b, (k+1)/b), assigned to rows by a permutation seeded by the batch's first index;
    ``antithetic`` pairs rows (2k, 2k+1) as (t, 1 - t).
    """
    idx = sample_index.cpu().numpy().astype(np.uint64)
    if seq_len > 1 << POSITION_BITS:
        raise ValueError(f"seq_len: {seq_len} is more than the noise's {1 << POSITION_BITS} "
                         "positions per sample")
    if idx.size and int(idx.max()) >= MAX_SAMPLES:
        raise ValueError(f"sample index {int(idx.max())} is past the noise's {MAX_SAMPLES} samples")
    positions = np.arange(seq_len, dtype=np.uint64)
    u = unit24(draw(key(seed, _TOKENS), (idx[:, None] << np.uint64(POSITION_BITS)) | positions))
    t = unit24(draw(key(seed, _T), idx))
    b = len(idx)
    if t_sampling == "stratified" and b > 1:
        batch_key = draw(key(seed, _STRATA), idx[:1])
        order = np.argsort(draw(batch_key, np.arange(b, dtype=np.uint64)), kind="stable")
        t = (order.astype(np.float32) + t) / np.float32(b)
    elif t_sampling == "antithetic" and b > 1:
        t = t.copy()
        t[1:b - b % 2:2] = 1.0 - t[0:b - b % 2:2]
    elif t_sampling not in ("uniform", "stratified", "antithetic"):
        raise ValueError(f"t_sampling: unknown {t_sampling!r}")
    return Noise(torch.from_numpy(np.ascontiguousarray(t)), torch.from_numpy(u))


def forward_process(tokens: torch.Tensor, noise: Noise, mask_id: int, eps: float) -> Corrupted:
    """Mask each token independently with its sequence's p_mask = (1 - eps) t + eps."""
    b, length = tokens.shape
    p_mask = (1.0 - eps) * noise.t.to(tokens.device) + eps
    u = noise.u[:, :length].to(tokens.device)
    mask = u < p_mask[:, None]
    noisy = torch.where(mask, mask_id, tokens)
    return Corrupted(noisy, mask, p_mask)


def batch_length(step: int, seq_len: int, prob: float, seed: int, multiple: int = 1) -> int:
    """LLaDA's 1% variable length: with probability ``prob`` a step's whole batch is cut to a
    length drawn uniformly from [1, seq_len], rounded up to ``multiple``. ``step``: the step's
    index (optimizer steps done before it), the same on every rank."""
    coin, pick = unit53(draw(key(seed, _CUT), np.array([2 * step, 2 * step + 1],
                                                       dtype=np.uint64)))
    if not coin < prob:
        return seq_len
    length = 1 + min(int(pick * seq_len), seq_len - 1)
    return min(seq_len, -(-length // multiple) * multiple)


# --------------------------------------------------------------------------- held-out evaluation
_EVAL_L, _EVAL_POS, _EVAL_T = (np.uint64(s) for s in (0x452821E638D01377, 0xBE5466CF34E90C6C,
                                                      0xC0AC29B7C97C50DD))
ESTIMATORS = ("stratified", "plain")


class EvalNoise(NamedTuple):
    mask: torch.Tensor  # [n, K, L] bool: the positions masked in draw k of sequence i
    weight: torch.Tensor  # [n, K] float64: the draw's weight on its summed masked CE
    ratio: torch.Tensor  # [n, K] float64: the fraction of the sequence masked (for buckets)


def _draw_key(seed: int, stream: np.uint64, k: int) -> np.ndarray:
    """A key per (evaluation seed, stream, draw k): draws are streams of their own."""
    return subkey(key(seed, stream), k)


def eval_noise(sample_index: torch.Tensor, seq_len: int, draws: int, seed: int,
               estimator: str = "stratified", start: Optional[torch.Tensor] = None) -> EvalNoise:
    """The masks of K draws per held-out sequence, a pure function of (seed, its index).

    ``stratified`` (../shared/LLADA.md's likelihood evaluation): draw k takes the number of
    masked tokens l from the k-th of K equal strata of 1..L, masks exactly l positions chosen
    uniformly (the l smallest of one uniform per position) and weighs the masked CE by L / l.
    ``plain`` (the training objective's estimator, for comparison): t ~ U(0, 1) per draw, each
    token masked with probability t, CE weighted by 1 / t. Either way the mean of the K draws'
    terms (weight x summed masked CE / L) is an unbiased estimate of the sequence's bound per
    token (for ``plain`` each draw's term is too; for ``stratified`` only their mean).

    ``start`` [n] (SFT: the prompt lengths): only positions from ``start`` on are masked, L
    above reads as the length of that region (a response's bound given its prompt); None: 0.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator: unknown {estimator!r}")
    idx = sample_index.cpu().numpy().astype(np.uint64)
    n = len(idx)
    positions = np.arange(seq_len, dtype=np.uint64)
    first = np.zeros(n, dtype=np.int64) if start is None else start.cpu().numpy().astype(np.int64)
    region = seq_len - first  # [n] the maskable positions of each sequence
    outside = positions.astype(np.int64)[None, :] < first[:, None]
    counters = (idx[:, None] << np.uint64(POSITION_BITS)) | positions
    mask = np.empty((n, draws, seq_len), dtype=bool)
    weight = np.empty((n, draws), dtype=np.float64)
    ratio = np.empty((n, draws), dtype=np.float64)
    for k in range(draws):
        u = unit24(draw(_draw_key(seed, _EVAL_POS, k), counters))  # [n, L]
        if start is not None:
            u = np.where(outside, np.float32(2.0), u)  # ranks last, never below a t
        if estimator == "stratified":
            v = unit24(draw(_draw_key(seed, _EVAL_L, k), idx)).astype(np.float64)
            count = np.minimum(1 + np.floor((k + v) * region / draws), region).astype(np.int64)
            # rank of each position's uniform: the `count` lowest are masked (ties: by position)
            ranks = np.argsort(np.argsort(u, axis=1, kind="stable"), axis=1, kind="stable")
            mask[:, k] = ranks < count[:, None]
            weight[:, k] = region / count
            ratio[:, k] = count / region
        else:
            t = unit24(draw(_draw_key(seed, _EVAL_T, k), idx))
            t = np.maximum(t, np.float32(2.0 ** -24))  # t = 0 would mask nothing, weigh 1/0
            mask[:, k] = u < t[:, None]
            weight[:, k] = 1.0 / t.astype(np.float64)
            ratio[:, k] = t
    return EvalNoise(torch.from_numpy(mask), torch.from_numpy(weight), torch.from_numpy(ratio))
