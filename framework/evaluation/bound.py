"""The LLaDA bound on held-out sequences, from the summed masked cross entropy of K draws per
sequence (the draws: data_pipeline/noise.py ``eval_noise``), as the statistics a run reports.

A draw's term X = weight x (summed CE at its masked positions) / L; the mean of a sequence's K
draws (one per stratum of the masked count) estimates its bound per token without bias, and the
bound is the mean over draws and sequences. The bound by mask ratio is the mean term of the draws
in each tenth: the mean masked-token CE at that ratio, not a bound of its own. The Monte Carlo
standard error is computed from the spread of each sequence's K draws as if they were
independent, which over-states it for stratified draws (their true spread is lower:
benchmarks/validation.py measures it); the sampling error over sequences is the spread of the
per-sequence means. Bits per byte: the summed bound in bits over the UTF-8 bytes the tokens
encode.
"""

from __future__ import annotations

import math
from typing import Dict

import numpy as np

# the bound by mask ratio: the tenths of [0, 1] of the training loss by mask ratio
from data_pipeline.noise import T_BUCKETS, t_bucket_names


def bound_stats(ce_sums: np.ndarray, weight: np.ndarray, ratio: np.ndarray, seq_len: int,
                text_bytes: int) -> Dict[str, float]:
    """``loss`` (nats per token), ``loss_mc_stderr``, ``loss_seq_stderr``, ``bpb`` and
    ``loss_by_ratio/<bucket>`` from the [n, K] summed masked CE of each draw, its weight and
    mask ratio; ``text_bytes``: the UTF-8 bytes of the n sequences' text."""
    # [n, K] each draw's term; their mean over a sequence's K draws estimates its bound per token
    x = np.asarray(ce_sums, dtype=np.float64) * np.asarray(weight, dtype=np.float64) / seq_len
    n, k = x.shape
    per_seq = x.mean(axis=1)
    out = {"loss": float(x.mean())}
    if k > 1:
        out["loss_mc_stderr"] = float(math.sqrt((x.var(axis=1, ddof=1) / k).sum()) / n)
    if n > 1:
        out["loss_seq_stderr"] = float(per_seq.std(ddof=1) / math.sqrt(n))
    if text_bytes > 0:
        out["bpb"] = float(per_seq.sum() * seq_len / (math.log(2) * text_bytes))
    bucket = np.clip((np.asarray(ratio) * T_BUCKETS).astype(np.int64), 0, T_BUCKETS - 1)
    for b, name in enumerate(t_bucket_names()):
        sel = bucket == b
        if sel.any():
            out[f"loss_by_ratio/{name}"] = float(x[sel].mean())
    return out
