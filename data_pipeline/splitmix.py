"""Counter-based random numbers: every number a pure function of (a key, a counter), with no
generator state to seed, save or replay. SplitMix64's output function (Steele, Lea & Flood 2014)
applied to ``counter x golden + key``, vectorised over numpy arrays.

One implementation for the forward process's noise (data_pipeline/noise.py) and the canonical
streams' draws (data_pipeline/streams.py): a resumed run, or one under another layout, recomputes any
number from its counter instead of restoring a generator.
"""

from __future__ import annotations

import functools

import numpy as np

GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function (a bijection of uint64 with full avalanche)."""
    return mix64_(np.array(x, dtype=np.uint64))


def mix64_(x: np.ndarray) -> np.ndarray:
    """mix64 in place on a uint64 array of the caller's own (the hot path: no temporaries)."""
    t = x >> _S30
    x ^= t
    x *= _M1
    np.right_shift(x, _S27, out=t)
    x ^= t
    x *= _M2
    np.right_shift(x, _S31, out=t)
    x ^= t
    return x


@functools.lru_cache(maxsize=4096)
def _key_of(seed: int, stream: int) -> np.ndarray:
    key = mix64(mix64(np.array([seed & (2**64 - 1)], dtype=np.uint64) ^ np.uint64(stream)))
    key.flags.writeable = False  # shared by every caller
    return key


def key(seed: int, stream) -> np.ndarray:
    """The key of one stream of numbers under a seed, as a one-element array (no scalar overflow
    warnings: uint64 arithmetic wraps, as it should here); computed once per (seed, stream)."""
    return _key_of(int(seed), int(stream))


def subkey(parent: np.ndarray, *ids: int) -> np.ndarray:
    """A key of its own for each tuple of ids under a parent key (e.g. one per dataset and
    stream): distinct ids give unrelated streams of numbers."""
    out = parent
    for i in ids:
        out = mix64(out ^ (np.array([int(i) + 1], dtype=np.uint64) * GOLDEN))
    return out


def draw(key: np.ndarray, counters: np.ndarray) -> np.ndarray:
    """uint64 numbers, one per counter: SplitMix64's output for that position of the stream."""
    x = np.multiply(counters, GOLDEN, dtype=np.uint64)  # a new array, wrapping
    x += key
    return mix64_(x)


def unit24(x: np.ndarray) -> np.ndarray:
    """The top 24 bits as a float32 in [0, 1): every value exactly representable."""
    return (x >> np.uint64(40)).astype(np.float32) * np.float32(2.0 ** -24)


def unit53(x: np.ndarray) -> np.ndarray:
    """The top 53 bits as a float64 in [0, 1)."""
    return (x >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def uniform(key: np.ndarray, counter: int) -> float:
    """One float64 in [0, 1): number ``counter`` of the stream ``key``."""
    return float(unit53(draw(key, np.array([counter], dtype=np.uint64)))[0])
