"""Deterministic, resumable streaming of prepared shards to one data-parallel rank.

Order. Every (data-parallel rank, DataLoader worker) pair is a *slot*; there are dp x workers
slots. In epoch e each dataset's shards are permuted by (seed, dataset, e) and slot s takes every
(dp x workers)-th shard of that permutation starting at s, so one epoch over all slots reads every
sample exactly once. A slot holds ``data.open_shards`` of its shards at a time, each read whole
and checked against the sha256 its manifest recorded at prepare time before any sample of it is
used, and draws every sample uniformly (seeded by (seed, dataset, slot)) from the samples its open
shards have left, each shard's in an order seeded by (seed, dataset, epoch, shard); a drained
shard is replaced by the slot's next one. An epoch's samples all come before the next epoch's.
Since ``llada prepare`` writes a dataset's sequences in a seeded random order across all of its
shards (across a part's, for a dataset prepared in parts), a micro-batch is a uniform draw from
the corpus, not consecutive pieces of a few documents. Several datasets are mixed per sample by a
seeded draw with the configured weights. Tensor/pipeline-parallel peers share a data-parallel
rank, hence identical batches. Split by *data-parallel* rank: webdataset's split_by_node would
split by global rank.

Global sample index. Micro-batch n of data-parallel rank r is global micro-batch n x dp + r; its
rows are global samples (n x dp + r) x micro_batch_size + row. The index seeds the sample's noise
and n // accumulation is its optimizer step (seeding the 1% cut).

Exact resume. A slot's state is (per dataset: epoch, shard cursor, the open shards and how many
samples each gave, the draw's RNG; the mixture RNG; batches made; skip counters): a few integers.
Each batch carries its slot's state as of that batch; the loader keeps the state of the last
batch it *handed out* per slot, so batches prefetched but not consumed are simply made again. On
restore a slot reopens its open shards and continues each after the samples it gave. Changing
the data-parallel size or the worker count between save and restore is refused unless the number
of slots stays the same (``load_state_dicts``: slot s continues as slot s, e.g. 2 data-parallel
ranks x 1 worker -> 1 x 2 workers); otherwise the samples would repeat or be skipped.

Bad data never stops the stream: a missing shard, a shard whose bytes are not those its manifest
records (truncated, a flipped bit anywhere), a corrupt tar, a sample that does not decode or has
the wrong shape, dtype or ids (including the mask id; an SFT sample also for a prompt length that
does not fit) is skipped with a warning naming shard and sample key, and counted; the counters
travel with the state. An SFT dataset's samples are seq_len + 1 ids, the prompt length first
(``ShardSet.sample_len``); the id checks look at its tokens only.
"""

from __future__ import annotations

import atexit
import bisect
import functools
import multiprocessing
import os
import signal
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.config import DataConfig
from data_pipeline.collate import MaskCollator, TrainBatch
from data_pipeline.corpus import warn
from data_pipeline.errors import DataConfigError, DataError
from data_pipeline.sft import sft_sample_problem, split_sft
from data_pipeline.shards import (ShardError, ShardSet, TOKENS_EXT, decode_tokens, read_shard,
                                  split_key, tar_members)

STATE_VERSION = 2  # 1: shuffle buffer within one shard at a time
COUNTERS = ("missing_shards", "corrupt_shards", "bad_samples")


class ShardStream:
    """One dataset as one slot reads it: the slot's shards of each epoch's permutation,
    ``open_shards`` of them at a time held whole in memory (each checked against its manifest's
    sha256 first), every sample drawn uniformly from what the open shards have left."""

    def __init__(self, ds: ShardSet, ds_index: int, slot: int, num_slots: int, seed: int,
                 open_shards: int, counters: Dict[str, int], state: Optional[dict] = None):
        self.ds, self.ds_index, self.slot, self.num_slots = ds, ds_index, slot, num_slots
        self.seed, self.open_shards, self.counters = seed, open_shards, counters
        state = state or {}
        self.epoch = state.get("epoch", 0)  # the epoch whose shards are open
        self.cursor = state.get("cursor", 0)  # the next shard to open, in that epoch's list
        self.window: List[List[int]] = [list(w) for w in state.get("open", [])]  # [shard, taken]
        self.rng = np.random.Generator(np.random.PCG64([seed, 7919, ds_index, slot]))
        if "rng" in state:
            self.rng.bit_generator.state = state["rng"]
        self._dtype = np.dtype(ds.dtype)
        self._samples: Dict[int, np.ndarray] = {}  # open shard -> [n, sample_len], seeded order

    def state(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor,
                "open": [list(w) for w in self.window], "rng": self.rng.bit_generator.state}

    def assigned(self, epoch: int) -> np.ndarray:
        perm = np.random.default_rng([self.seed, self.ds_index, epoch]).permutation(
            len(self.ds.shards))
        return perm[self.slot::self.num_slots]

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

    def _load(self, shard: int, replay: bool = False) -> np.ndarray:
        """The valid samples of one shard in its seeded order, as one [n, sample_len] array (the
        shard's bytes are let go): none when it cannot be read or is not what prepare wrote.
        ``replay``: reopened after a restore, its bad samples were counted when first opened."""
        ds, url = self.ds, self.ds.url(shard)
        empty = np.empty((0, ds.sample_len), dtype=ds.dtype)
        try:
            data = read_shard(ds, shard)
        except OSError as e:
            self._skip("missing_shards", f"{ds.name}: shard {url} unreadable "
                       f"({type(e).__name__}: {e}); skipped")
            return empty
        except ShardError as e:
            self._skip("corrupt_shards", f"{ds.name}: {e}; shard skipped")
            return empty
        samples: List[np.ndarray] = []
        keys: List[str] = []
        key = None
        try:
            for name, member in tar_members(data, url):
                key, ext = split_key(name)
                try:
                    if ext != TOKENS_EXT:
                        raise ValueError(f"unexpected member {name!r}")
                    arr = decode_tokens(member)
                    problem = self._form(arr)
                except Exception as e:  # noqa: BLE001 - no sample may crash the stream
                    problem = str(e).splitlines()[0] if str(e) else type(e).__name__
                if problem:
                    self._skip("bad_samples", f"{ds.name}: shard {url} sample {key}: {problem}; "
                               "skipped", count=not replay)
                    continue
                samples.append(arr)
                keys.append(key)
        except ShardError as e:  # its hash matched: a shard not written by llada prepare
            after = f" after sample {key}" if key else ""
            self._skip("corrupt_shards", f"{ds.name}: {e}{after}; rest of shard skipped",
                       count=not replay)
        if not samples:
            return empty
        # the ids of all samples at once: below the vocabulary size, never the mask id (an SFT
        # sample's prompt length, checked in _form, may be either: its tokens only)
        block = np.stack(samples)
        tokens = split_sft(block)[1] if ds.kind == "sft" else block
        top = tokens.max(axis=1)
        bad = (top >= ds.vocab_size) | (tokens == ds.special_ids["mask"]).any(axis=1)
        for i in np.flatnonzero(bad).tolist():
            problem = (f"token id {int(top[i])} >= vocabulary size {ds.vocab_size}"
                       if top[i] >= ds.vocab_size else "holds the mask token")
            self._skip("bad_samples", f"{ds.name}: shard {url} sample {keys[i]}: {problem}; "
                       "skipped", count=not replay)
        good = np.flatnonzero(~bad)
        order = np.random.default_rng([self.seed, self.ds_index, self.epoch, shard]).permutation(
            len(good))
        return block[good[order]]

    def _fill(self, barren: set) -> None:
        """Open shards of this epoch until ``open_shards`` are open or the epoch's list is done;
        an empty window starts the next epoch (an epoch's samples all come before the next's)."""
        while len(self.window) < self.open_shards:
            shards = self.assigned(self.epoch)
            if self.cursor == len(shards):
                if self.window:
                    return  # the epoch's last shards drain first
                self.epoch, self.cursor = self.epoch + 1, 0
                continue
            shard = int(shards[self.cursor])
            self.cursor += 1
            samples = self._load(shard)
            # shards in a row that gave nothing; only when that streak has covered every shard
            # of the dataset is the data unusable (one bad shard, however often drawn, never is)
            if not len(samples):
                barren.add(shard)
                if len(barren) == len(self.ds.shards):
                    raise DataError(f"{self.ds.name}: none of the {len(self.ds.shards)} shards "
                                    f"of {self.ds.manifest} has a readable sample")
                continue
            barren.clear()
            self._samples[shard] = samples
            self.window.append([shard, 0])

    def __iter__(self) -> Iterator[np.ndarray]:
        for shard, taken in list(self.window):  # restored: reopen, continue after `taken`
            self._samples[shard] = self._load(shard, replay=True)
            if len(self._samples[shard]) <= taken:  # damaged since: what it had left is gone
                self.window.remove([shard, taken])
        barren: set = set()
        while True:
            self._fill(barren)
            left = [len(self._samples[shard]) - taken for shard, taken in self.window]
            r = int(self.rng.integers(sum(left)))  # uniform over the open shards' samples
            i = 0
            while r >= left[i]:
                r -= left[i]
                i += 1
            shard, taken = self.window[i]
            arr = self._samples[shard][taken]
            if taken + 1 == len(self._samples[shard]):
                del self.window[i], self._samples[shard]
            else:
                self.window[i][1] = taken + 1
            yield arr


class SlotStream:
    """The micro-batches of one slot: mixed samples, batched, collated."""

    def __init__(self, sets: List[ShardSet], weights: List[float], collator: MaskCollator, *,
                 seed: int, open_shards: int, micro_batch_size: int, accumulation: int,
                 dp_rank: int, dp_size: int, workers: int, worker: int,
                 state: Optional[dict] = None):
        state = state or {}
        self.mb, self.accum, self.collator = micro_batch_size, accumulation, collator
        self.dp_rank, self.dp_size, self.workers, self.worker = dp_rank, dp_size, workers, worker
        slot, num_slots = dp_rank * workers + worker, dp_size * workers
        self.counters = {k: state.get("counters", {}).get(k, 0) for k in COUNTERS}
        self.batches = state.get("batches", 0)
        saved = state.get("streams", [None] * len(sets))
        self.streams = [ShardStream(ds, i, slot, num_slots, seed, open_shards, self.counters,
                                    st)
                        for i, (ds, st) in enumerate(zip(sets, saved))]
        total = float(sum(weights))
        self.cumulative = np.cumsum([w / total for w in weights]).tolist()
        self.rng = np.random.Generator(np.random.PCG64([seed, 104729, slot]))
        if "mix_rng" in state:
            self.rng.bit_generator.state = state["mix_rng"]

    def state(self) -> dict:
        return {"batches": self.batches, "streams": [s.state() for s in self.streams],
                "mix_rng": self.rng.bit_generator.state, "counters": dict(self.counters)}

    def __iter__(self) -> Iterator[Tuple[TrainBatch, dict]]:
        iters = [iter(s) for s in self.streams]
        while True:
            rows = []
            for _ in range(self.mb):
                k = 0 if len(iters) == 1 else min(
                    bisect.bisect_right(self.cumulative, self.rng.random()), len(iters) - 1)
                rows.append(next(iters[k]))
            n = self.batches * self.workers + self.worker  # this rank's micro-batch number
            first = (n * self.dp_size + self.dp_rank) * self.mb
            tokens = torch.from_numpy(np.stack(rows).astype(np.int64))
            batch = self.collator(tokens, torch.arange(first, first + self.mb), n // self.accum)
            self.batches += 1
            yield batch, self.state()


class _Workers(IterableDataset):
    """What each DataLoader worker runs: the slot it stands for this time, from its state.
    Plain data only, so it pickles for spawn-started workers too."""

    def __init__(self, slot_args: dict, states: List[Optional[dict]], rotation: int):
        self.slot_args, self.states, self.rotation = slot_args, states, rotation

    def __iter__(self):
        info = get_worker_info()
        physical = info.id if info is not None else 0
        workers = self.slot_args["workers"]
        logical = (physical + self.rotation) % workers
        slot = SlotStream(**self.slot_args, worker=logical, state=self.states[logical])
        for batch, state in slot:
            yield batch, logical, state


def _stop_signals_in_worker(signals: Sequence[int], closing, worker_id: int) -> None:
    """In each worker, after torch's own handlers (its TERM handler ends the worker): the stop
    signals are ignored, except when the trainer itself is shutting its workers down
    (``closing`` set; multiprocessing and torch then fall back on TERM for a worker that lags)."""
    def on_signal(signum, frame):
        if closing.value:
            os._exit(0)

    for sig in signals:
        signal.signal(sig, on_signal)


def _set(flag) -> None:
    flag.value = 1


class PretrainLoader:
    """Iterator of collated micro-batches for one data-parallel rank, with state_dict()."""

    def __init__(self, cfg: DataConfig, sets: List[ShardSet], weights: List[float],
                 collator: MaskCollator, *, micro_batch_size: int, accumulation: int,
                 dp_rank: int, dp_size: int, pin_memory: bool = False,
                 ignore_signals: Sequence[int] = ()):
        """``ignore_signals``: the signals on which the trainer stops cleanly. Slurm sends them
        to every process of a job step, workers included; a worker they killed would take the
        trainer down before it could save, so workers ignore them (the trainer stops them)."""
        self.cfg, self.sets, self.weights, self.collator = cfg, sets, weights, collator
        self.ignore_signals = tuple(ignore_signals)
        # set while this process stops its workers; at interpreter exit too, which runs before
        # multiprocessing's own exit hook (registered earlier) TERMinates and joins them
        self._closing = multiprocessing.Value("b", 0, lock=False)
        atexit.register(_set, self._closing)
        self.mb, self.accum, self.pin_memory = micro_batch_size, accumulation, pin_memory
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.workers = max(cfg.num_workers, 1)
        slots = dp_size * self.workers
        for ds in sets:
            if len(ds.shards) < slots:
                raise DataConfigError(
                    f"data.datasets: {ds.manifest} has {len(ds.shards)} shards, fewer than the "
                    f"{slots} readers (data-parallel size {dp_size} x data.num_workers "
                    f"{self.workers}); prepare it with a smaller samples_per_shard or use fewer "
                    "workers")
        self.slot_states: List[Optional[dict]] = [None] * self.workers
        self.consumed = 0
        self._it: Optional[Iterator] = None
        self._loader_iter = None  # the DataLoader's iterator, for its worker processes

    def _batches(self) -> Iterator[TrainBatch]:
        slot_args = dict(sets=self.sets, weights=self.weights, collator=self.collator,
                         seed=self.cfg.seed, open_shards=self.cfg.open_shards,
                         micro_batch_size=self.mb, accumulation=self.accum, dp_rank=self.dp_rank,
                         dp_size=self.dp_size, workers=self.workers)
        source = _Workers(slot_args, list(self.slot_states), rotation=self.consumed % self.workers)
        if self.cfg.num_workers == 0:
            items = iter(source)
        else:
            loader = DataLoader(source, batch_size=None, num_workers=self.workers,
                                prefetch_factor=self.cfg.prefetch_batches,
                                pin_memory=self.pin_memory,
                                worker_init_fn=functools.partial(
                                    _stop_signals_in_worker, self.ignore_signals, self._closing))
            self._closing.value = 0
            items = self._loader_iter = iter(loader)
        for batch, logical, state in items:
            self.slot_states[logical] = state
            self.consumed += 1
            yield batch

    def __iter__(self) -> "PretrainLoader":
        return self

    def __next__(self) -> TrainBatch:
        if self._it is None:
            self._it = self._batches()
        return next(self._it)

    def close(self) -> None:
        """Stop the worker processes now. Left to the garbage collector (the stream and this
        loader refer to each other), the DataLoader waits 5 s per worker for them to exit.
        A later ``next`` starts them again from the state of the last batch handed out."""
        if self._it is not None:
            workers = list(getattr(self._loader_iter, "_workers", []))
            self._closing.value = 1
            self._loader_iter = None
            self._it.close()  # the DataLoader iterator goes with it: torch stops its workers
            self._it = None
            for w in workers:  # one stuck (in I/O, say) past torch's TERM
                if w.is_alive():
                    w.kill()
                    w.join()

    @property
    def counters(self) -> Dict[str, int]:
        """Skipped inputs so far on this rank (missing/corrupt shards, bad samples)."""
        return {k: sum((s or {}).get("counters", {}).get(k, 0) for s in self.slot_states)
                for k in COUNTERS}

    def _layout(self) -> dict:
        return {"dp_rank": self.dp_rank, "dp_size": self.dp_size, "workers": self.workers,
                "micro_batch_size": self.mb, "seed": self.cfg.seed,
                "open_shards": self.cfg.open_shards,
                "datasets": [[ds.name, ds.samples, ds.tokenizer_sha256] for ds in self.sets]}

    def state_dict(self) -> dict:
        # a copy: the loader replaces its slots' states as it hands out batches
        return {"version": STATE_VERSION, "layout": self._layout(), "consumed": self.consumed,
                "slots": list(self.slot_states)}

    def load_state_dict(self, state: dict) -> None:
        """This rank's own saved state, under the same data layout."""
        self._check_saved(state, same=self._layout())
        self.consumed = state["consumed"]
        self.slot_states = list(state["slots"])

    def load_state_dicts(self, states: List[dict]) -> None:
        """Restore from the states of every data-parallel rank of the saved run, in rank order.
        Under another data-parallel size the stream continues exactly when the number of readers
        (data-parallel size x workers) is unchanged and each side has one worker or one
        data-parallel rank: reader s of the saved run is reader s here, and global sample indices
        and step numbers come out the same (see the module docstring)."""
        if len(states) == self.dp_size:
            self.load_state_dict(states[self.dp_rank])
            return
        layout = {k: v for k, v in self._layout().items()
                  if k not in ("dp_rank", "dp_size", "workers")}
        for state in states:
            self._check_saved(state, same=layout)
        slots = [slot for state in states for slot in state["slots"]]
        saved = states[0]["layout"]
        if len(slots) != self.dp_size * self.workers:
            raise DataConfigError(
                f"data state: saved by {len(slots)} readers (data-parallel size "
                f"{saved['dp_size']} x data.num_workers {saved['workers']}), this run has "
                f"{self.dp_size} x {self.workers}; set data.num_workers so that the product is "
                f"{len(slots)}, or the stream would repeat or skip samples")
        # micro-batch b of slot s is global micro-batch b x readers + s only while one side of
        # dp x workers is 1 (module docstring): otherwise samples would get other noise seeds
        if not (1 in (saved["dp_size"], saved["workers"]) and 1 in (self.dp_size, self.workers)):
            raise DataConfigError(
                f"data state: data-parallel size x data.num_workers {saved['dp_size']} x "
                f"{saved['workers']} -> {self.dp_size} x {self.workers} would reorder the "
                "stream; it continues exactly only with 1 worker or 1 data-parallel rank on each "
                "side")
        made = {(s or {}).get("batches", 0) for s in slots}
        if len(made) > 1:
            raise DataConfigError(f"data state: the saved readers stopped at different batches "
                                  f"({sorted(made)}), not at one optimizer step")
        self.slot_states = slots[self.dp_rank * self.workers:(self.dp_rank + 1) * self.workers]
        self.consumed = sum((s or {}).get("batches", 0) for s in self.slot_states)

    def _check_saved(self, state: dict, same: dict) -> None:
        if self._it is not None:
            raise RuntimeError("load_state_dict must come before the first batch")
        if state.get("version") == 1:
            raise DataConfigError(
                "data state: saved by the loader of an earlier version (one shard at a time, "
                "through a shuffle buffer), whose stream this version cannot continue: finish "
                "the run with the version that started it (README, Upgrading)")
        if state.get("version") != STATE_VERSION:
            raise DataConfigError(f"data state: version {state.get('version')} is not "
                                  f"{STATE_VERSION}")
        saved = state["layout"]
        diff = ", ".join(f"{k} {saved.get(k)} -> {v}" for k, v in same.items()
                         if saved.get(k) != v)
        if diff:
            raise DataConfigError(
                f"data state: saved with a different data layout ({diff}); resuming would "
                "repeat or skip samples, so it is refused: keep the data-parallel size, "
                "data.num_workers, micro-batch size, seed, open shards and datasets")
