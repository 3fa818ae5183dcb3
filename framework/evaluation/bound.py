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
encode. The autoregressive baseline's exact NLL goes through the same statistics as one draw of
weight 1 per sequence.
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import numpy as np

# the bound by mask ratio: the tenths of [0, 1] of the training loss by mask ratio
from data_pipeline.noise import T_BUCKETS, t_bucket_names


def bound_stats(ce_sums: np.ndarray, weight: np.ndarray, ratio: Optional[np.ndarray],
                seq_len, text_bytes: int, ce_first: Optional[np.ndarray] = None,
                bytes_without_first: int = 0) -> Dict[str, float]:
    """``loss`` (nats per token), ``loss_mc_stderr``, ``loss_seq_stderr``, ``bpb`` and
    ``loss_by_ratio/<bucket>`` from the [n, K] summed masked CE of each draw, its weight and
    mask ratio (None: no buckets, the autoregressive objective); ``seq_len``: the tokens each
    sequence's bound is per (an int, or [n]: SFT's response lengths); ``text_bytes``: the UTF-8
    bytes of the text of those tokens. With ``ce_first`` ([n, K], the CE at each sequence's
    first position, 0 where it was not masked) also ``bpb_without_first``: the bits of every
    position but the first over ``bytes_without_first``, the axis on which the autoregressive
    baseline (which never predicts a first token) is compared."""
    lengths = np.broadcast_to(np.asarray(seq_len, dtype=np.float64), (len(ce_sums),))
    # [n, K] each draw's term; their mean over a sequence's K draws estimates its bound per token
    x = np.asarray(ce_sums, dtype=np.float64) * np.asarray(weight, dtype=np.float64) / \
        lengths[:, None]
    n, k = x.shape
    per_seq = x.mean(axis=1)
    out = {"loss": float(x.mean())}
    if k > 1:
        out["loss_mc_stderr"] = float(math.sqrt((x.var(axis=1, ddof=1) / k).sum()) / n)
    if n > 1:
        out["loss_seq_stderr"] = float(per_seq.std(ddof=1) / math.sqrt(n))
    if text_bytes > 0:
        bits = per_seq.sum() * seq_len if np.isscalar(seq_len) else (per_seq * lengths).sum()
        out["bpb"] = float(bits / (math.log(2) * text_bytes))
    if ce_first is not None and bytes_without_first > 0:
        rest = (np.asarray(ce_sums, dtype=np.float64) - ce_first) * np.asarray(weight)
        out["bpb_without_first"] = float(rest.mean(axis=1).sum()
                                         / (math.log(2) * bytes_without_first))
    if ratio is None:
        return out
    bucket = np.clip((np.asarray(ratio) * T_BUCKETS).astype(np.int64), 0, T_BUCKETS - 1)
    for b, name in enumerate(t_bucket_names()):
        sel = bucket == b
        if sel.any():
            out[f"loss_by_ratio/{name}"] = float(x[sel].mean())
    return out
