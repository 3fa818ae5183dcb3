"""The canonical streams: the training samples' order, a function of the data config and its seed
alone, never of the data-parallel size or the worker count.

A run reads its data as C canonical streams (``data.streams``; null: one per sample of the global
batch B), fixed when the run starts and recorded in its checkpoints. Step s takes the next B / C
samples of every stream, stream after stream: global sample ``s x B + c x B/C + j`` is sample
``s x B/C + j`` of stream c. Readers (data-parallel rank x DataLoader worker) only decide which
process computes a stream (data_pipeline/loader.py); what a stream yields depends on nothing but
(the datasets, data.seed, data.open_shards, C).

One dataset in one stream (``ShardStream``). In epoch e the dataset's n shards are permuted by
(seed, dataset, e) and stream c takes every C-th *unit* of that list starting at c: a unit is a
whole shard when n >= C; with fewer shards than streams each shard is cut into
p = ceil(C / n) pieces (the epoch's list: piece k of every shard before piece k + 1 of any,
pieces rotated by e so a stream sees every piece in turn), so that every stream has data and a
small dataset serves any number of readers. A piece is read as its shard is, whole and checked
against its sha256, and keeps only its own samples: reading a dataset of n < C shards costs
p reads of each shard per epoch instead of one. A stream holds ``data.open_shards`` units at a
time and draws every sample uniformly from what they have left, each unit's samples in an order
seeded by (seed, dataset, epoch, shard); a drained unit is replaced by the stream's next one, and
an epoch's samples all come before the next epoch's.

Mixture (``CanonicalStream``): sample q of stream c comes from the dataset that the seeded draw
number q of stream c picks with the configured weights. Every draw (mixture, window) is
counter-based (data_pipeline/splitmix.py), so a stream's state is integers only: per dataset the
epoch, the cursor in the epoch's units, the open units and how many samples each gave, the draws
made; the samples made; the skip counters.

Bad data never stops a stream: a missing shard, a shard whose bytes are not those its manifest
records (truncated, a flipped bit anywhere), a corrupt tar, a sample that does not decode or has
the wrong shape, dtype or ids (including the mask id; an SFT sample also for a prompt length that
does not fit) is skipped with a warning naming shard and sample key, and counted once per epoch
(a shard's problem by its first non-empty piece, a sample's by the piece that holds it). An SFT
dataset's samples are seq_len + 1 ids, the prompt length first (``ShardSet.sample_len``); the id
checks look at its tokens only.
"""

from __future__ import annotations

import bisect
from typing import Dict, List, Optional, Tuple

import numpy as np

from data_pipeline.corpus import warn
from data_pipeline.errors import DataError
from data_pipeline.sft import sft_sample_problem, split_sft
from data_pipeline.shards import (ShardError, ShardSet, TOKENS_EXT, decode_tokens, read_shard,
                                  split_key, tar_members)
from data_pipeline.splitmix import key, subkey, uniform

COUNTERS = ("missing_shards", "corrupt_shards", "bad_samples")
_WINDOW, _MIXTURE = 0x3C6EF372FE94F82B, 0xA54FF53A5F1D36F1  # the draws' streams of numbers

Unit = Tuple[int, int]  # (shard, piece)


def pieces_per_shard(shards: int, streams: int) -> int:
    """How many pieces each shard of a dataset is cut into so that every stream has a unit."""
    return 1 if shards >= streams else -(-streams // shards)


def piece_range(samples: int, piece: int, pieces: int) -> Tuple[int, int]:
    """The positions [lo, hi) of a shard's seeded order that piece ``piece`` of ``pieces`` holds."""
    return piece * samples // pieces, (piece + 1) * samples // pieces


def _nonempty(samples: int, piece: int, pieces: int) -> bool:
    lo, hi = piece_range(samples, piece, pieces)
    return hi > lo


class ShardStream:
    """One dataset as one canonical stream reads it: the stream's units of each epoch's
    permutation, ``open_shards`` of them held in memory at a time, every sample drawn uniformly
    from what the open units have left. Yields (sample, shard, member ordinal in its tar)."""

    def __init__(self, ds: ShardSet, ds_index: int, stream: int, num_streams: int, seed: int,
                 open_shards: int, counters: Dict[str, int], state: Optional[dict] = None):
        self.ds, self.ds_index, self.stream, self.num_streams = ds, ds_index, stream, num_streams
        self.seed, self.open_shards, self.counters = seed, open_shards, counters
        state = state or {}
        self.epoch = state.get("epoch", 0)  # the epoch whose units are open
        self.cursor = state.get("cursor", 0)  # the next unit to open, in that epoch's list
        # [shard, piece, samples taken] of each open unit
        self.window: List[List[int]] = [list(w) for w in state.get("open", [])]
        self.draws = state.get("draws", 0)  # the window draws made: the next draw's counter
        self.pieces = pieces_per_shard(len(ds.shards), num_streams)
        self._key = subkey(key(seed, _WINDOW), ds_index, stream)
        self._dtype = np.dtype(ds.dtype)
        self._plan: Tuple[int, List[Unit]] = (-1, [])
        # open unit -> (its samples [m, sample_len], their member ordinals [m]), seeded order
        self._samples: Dict[Unit, Tuple[np.ndarray, np.ndarray]] = {}
        # the shards that hold samples by their manifest: the streak that proves the data unusable
        self._usable = sum(1 for s in ds.shards if s["samples"] > 0)

    def state(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor,
                "open": [list(w) for w in self.window], "draws": self.draws}

    def assigned(self, epoch: int) -> List[Unit]:
        """This stream's units of an epoch, in the order it opens them."""
        if self._plan[0] != epoch:
            n, p, c = len(self.ds.shards), self.pieces, self.num_streams
            perm = np.random.default_rng([self.seed, self.ds_index, epoch]).permutation(n)
            units = [(int(perm[u % n]), (u // n + epoch) % p)
                     for u in range(self.stream, n * p, c)]
            self._plan = (epoch, units)
        return self._plan[1]

    def _skip(self, counter: str, msg: str, count: bool = True) -> None:
        if count:
            self.counters[counter] += 1
            warn(counter, msg)

    def _form(self, arr: np.ndarray) -> Optional[str]:
        ds = self.ds
        if arr.shape != (ds.sample_len,):
            return f"shape {arr.shape}, expected ({ds.sample_len},)"
        if arr.dtype != self._dtype:
            return f"dtype {arr.dtype.name}, expected {ds.dtype}"
        if ds.kind == "sft":
            return sft_sample_problem(arr, ds.seq_len)
        return None

    def _load(self, shard: int, piece: Optional[int] = 0, mode: str = "open"
              ) -> Tuple[np.ndarray, np.ndarray]:
        """The valid samples of one unit (``piece`` None: of the whole shard) in their seeded
        order and their member ordinals (the shard's bytes are let go): none when the shard cannot
        be read or is not what prepare wrote. ``mode``: what is counted and warned of. ``open``:
        the shard's problems (by its first non-empty piece) and the unit's bad samples;
        ``reopen`` (a unit of the window, after a restore): a shard that cannot be read, or no
        longer matches its sha256, only: that is new (the unit was readable when first opened;
        its other problems were counted then); ``probe``: nothing."""
        ds, url, p = self.ds, self.ds.url(shard), self.pieces
        n = ds.shards[shard]["samples"]
        order = np.random.default_rng([self.seed, self.ds_index, self.epoch, shard]).permutation(n)
        wanted = order if piece is None else order[slice(*piece_range(n, piece, p))]
        first_piece = -(-p // n) - 1 if n else 0  # the one that counts the shard's problems
        counts = mode == "open" and piece == first_piece
        count_samples = mode == "open"
        empty = (np.empty((0, ds.sample_len), dtype=ds.dtype), np.empty(0, dtype=np.int64))
        try:
            data = read_shard(ds, shard)
        except OSError as e:
            self._skip("missing_shards", f"{ds.name}: shard {url} unreadable "
                       f"({type(e).__name__}: {e}); skipped", counts or mode == "reopen")
            return empty
        except ShardError as e:
            self._skip("corrupt_shards", f"{ds.name}: {e}; shard skipped",
                       counts or mode == "reopen")
            return empty
        mine = set(wanted.tolist()) if len(wanted) < n else None
        found: Dict[int, np.ndarray] = {}
        keys: Dict[int, str] = {}
        key_ = None
        try:
            for ordinal, (name, member) in enumerate(tar_members(data, url)):
                key_, ext = split_key(name)
                if mine is not None and ordinal not in mine:
                    continue
                try:
                    if ext != TOKENS_EXT:
                        raise ValueError(f"unexpected member {name!r}")
                    arr = decode_tokens(member)
                    problem = self._form(arr)
                except Exception as e:  # noqa: BLE001 - no sample may crash the stream
                    problem = str(e).splitlines()[0] if str(e) else type(e).__name__
                if problem:
                    self._skip("bad_samples", f"{ds.name}: shard {url} sample {key_}: {problem}; "
                               "skipped", count_samples)
                    continue
                found[ordinal], keys[ordinal] = arr, key_
        except ShardError as e:  # its hash matched: a shard not written by llada prepare
            after = f" after sample {key_}" if key_ else ""
            self._skip("corrupt_shards", f"{ds.name}: {e}{after}; rest of shard skipped", counts)
        members = np.array([m for m in wanted.tolist() if m in found], dtype=np.int64)
        if not len(members):
            return empty
        # the ids of all samples at once: below the vocabulary size, never the mask id (an SFT
        # sample's prompt length, checked in _form, may be either: its tokens only)
        block = np.stack([found[m] for m in members.tolist()])
        tokens = split_sft(block)[1] if ds.kind == "sft" else block
        top = tokens.max(axis=1)
        bad = (top >= ds.vocab_size) | (tokens == ds.special_ids["mask"]).any(axis=1)
        for i in np.flatnonzero(bad).tolist():
            problem = (f"token id {int(top[i])} >= vocabulary size {ds.vocab_size}"
                       if top[i] >= ds.vocab_size else "holds the mask token")
            self._skip("bad_samples", f"{ds.name}: shard {url} sample {keys[int(members[i])]}: "
                       f"{problem}; skipped", count_samples)
        return block[~bad], members[~bad]

    def _fill(self, barren: set) -> None:
        """Open units of this epoch until ``open_shards`` are open or the epoch's list is done;
        an empty window starts the next epoch (an epoch's samples all come before the next's)."""
        while len(self.window) < self.open_shards:
            units = self.assigned(self.epoch)
            if self.cursor == len(units):
                if self.window:
                    return  # the epoch's last units drain first
                self.epoch, self.cursor = self.epoch + 1, 0
                continue
            unit = units[self.cursor]
            self.cursor += 1
            if not _nonempty(self.ds.shards[unit[0]]["samples"], unit[1], self.pieces):
                # a piece of a shard smaller than its piece count: nothing to read
                continue
            loaded = self._load(*unit)
            # shards in a row that gave nothing; only when that streak has covered every shard of
            # the dataset is the data unusable (one bad shard, however often drawn, never is). A
            # piece whose samples were all bad proves nothing of its shard's other pieces
            if not len(loaded[0]):
                if self.pieces == 1 or not len(self._load(unit[0], None, "probe")[0]):
                    barren.add(unit[0])
                    if len(barren) >= self._usable:
                        raise DataError(f"{self.ds.name}: none of the {len(self.ds.shards)} "
                                        f"shards of {self.ds.manifest} has a readable sample")
                continue
            barren.clear()
            self._samples[unit] = loaded
            self.window.append([*unit, 0])

    def __iter__(self):
        if not self._usable:
            raise DataError(f"{self.ds.name}: none of the {len(self.ds.shards)} shards of "
                            f"{self.ds.manifest} holds a sample")
        for shard, piece, taken in list(self.window):  # restored: reopen, continue after `taken`
            self._samples[(shard, piece)] = self._load(shard, piece, "reopen")
            if len(self._samples[(shard, piece)][0]) <= taken:  # damaged since (counted, warned):
                self.window.remove([shard, piece, taken])  # what it had left is gone
        barren: set = set()
        while True:
            self._fill(barren)
            left = [len(self._samples[(s, k)][0]) - taken for s, k, taken in self.window]
            total = sum(left)
            r = min(int(uniform(self._key, self.draws) * total), total - 1)
            self.draws += 1
            i = 0
            while r >= left[i]:
                r -= left[i]
                i += 1
            shard, piece, taken = self.window[i]
            rows, members = self._samples[(shard, piece)]
            arr, member = rows[taken], int(members[taken])
            if taken + 1 == len(rows):
                del self.window[i], self._samples[(shard, piece)]
            else:
                self.window[i][2] = taken + 1
            yield arr, shard, member


class CanonicalStream:
    """One canonical stream: the datasets mixed per sample by its seeded draws."""

    def __init__(self, sets: List[ShardSet], weights: List[float], stream: int,
                 num_streams: int, seed: int, open_shards: int, state: Optional[dict] = None):
        state = state or {}
        self.stream = stream
        self.counters = {k: state.get("counters", {}).get(k, 0) for k in COUNTERS}
        self.samples = state.get("samples", 0)  # made so far: the next mixture draw's counter
        saved = state.get("datasets", [None] * len(sets))
        self.datasets = [ShardStream(ds, i, stream, num_streams, seed, open_shards, self.counters,
                                     st) for i, (ds, st) in enumerate(zip(sets, saved))]
        total = float(sum(weights))
        self.cumulative = np.cumsum([w / total for w in weights]).tolist()
        self._key = subkey(key(seed, _MIXTURE), stream)
        self._iters: Optional[list] = None

    def state(self) -> dict:
        return {"samples": self.samples, "datasets": [d.state() for d in self.datasets],
                "counters": dict(self.counters)}

    def take(self, n: int, rows: List[np.ndarray], sources: List[Tuple[int, int, int]]) -> None:
        """Append its next ``n`` samples to ``rows`` and their (dataset, shard, member) to
        ``sources``."""
        if self._iters is None:
            self._iters = [iter(d) for d in self.datasets]
        last = len(self._iters) - 1
        for _ in range(n):
            k = 0 if not last else min(
                bisect.bisect_right(self.cumulative, uniform(self._key, self.samples)), last)
            arr, shard, member = next(self._iters[k])
            self.samples += 1
            rows.append(arr)
            sources.append((k, shard, member))
