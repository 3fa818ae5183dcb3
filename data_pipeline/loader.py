"""Deterministic, resumable streaming of prepared shards to one data-parallel rank, in the order
of the canonical streams (data_pipeline/streams.py) whatever the layout.

Who reads what. With C canonical streams and a global batch of B samples, data-parallel rank r of
dp holds the streams [r x C/dp, (r + 1) x C/dp) (dp must divide C); its ``data.num_workers``
DataLoader workers share them round robin (worker w: the rank's j-th streams with j mod W = w;
at most C/dp workers, as more would idle). For each step every worker hands the rank that step's
B/C samples of each of its streams and the rank puts them back in stream order, which is global
sample order: its samples of step s are global samples s x B + r x B/dp + [0, B/dp), cut into
micro-batches of train.micro_batch_size in that order. So micro-batch i of step s holds global
samples s x B + r x B/dp + i x mb + [0, mb): each sample's noise (seeded by its global index), the
step's 1% cut (seeded by s) and each micro-batch's rows are the same under any layout with the
same micro-batch size. The collator runs here, in the training process: a micro-batch's rows come
from several workers. Tensor/pipeline-parallel peers share a data-parallel rank, hence identical
batches (webdataset's split_by_node would split by global rank).

Exact resume, any layout. The state is each of the rank's streams' state as of the last step whose
micro-batches were all handed out, that step count, and how many micro-batches of the next step
were handed out (batches prefetched but not consumed are simply made again). A resume under
another data-parallel size or worker count (any that divide the batch) takes its streams' states
from the saved ranks that held them (``saved_ranks``: the streams are cut into equal contiguous
blocks under every size) and continues each: the same samples in the same steps with the same
masks, only the summation order of a step's losses and gradients differs. A state saved inside a
step resumes only under the same data-parallel size and micro-batch size.

Memory of a reader (one worker): for each of its streams and datasets ``data.open_shards`` units
(a shard's samples, or a piece's) as one array each, plus one shard's bytes while it reads and
checks one: about (C / (dp x workers)) x datasets x open_shards x a shard's bytes. Its state is a
few dozen integers per stream.
"""

from __future__ import annotations

import atexit
import functools
import multiprocessing
import os
import signal
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.collate import MaskCollator, TrainBatch
from data_pipeline.config import DataConfig
from data_pipeline.errors import DataConfigError, DataError
from data_pipeline.shards import ShardSet
from data_pipeline.streams import COUNTERS, CanonicalStream, pieces_per_shard

__all__ = ["PretrainLoader", "DataError", "saved_ranks"]

# 1: a shuffle buffer within one shard at a time; 2: one stream per (rank, worker) slot, so the
# order depended on dp x workers; 3: canonical streams
STATE_VERSION = 3


def saved_ranks(dp_rank: int, dp: int, saved_dp: int) -> range:
    """The data-parallel ranks of a run saved under ``saved_dp`` whose streams rank ``dp_rank``
    of ``dp`` holds now (both sizes cut the streams into equal contiguous blocks)."""
    return range(dp_rank * saved_dp // dp, -(-(dp_rank + 1) * saved_dp // dp))


class _Readers(IterableDataset):
    """What each DataLoader worker (or the training process, without workers) runs: its share of
    the rank's streams from their states, one step's samples at a time. Plain data only, so it
    pickles for spawn-started workers too."""

    def __init__(self, stream_args: dict, states: Dict[int, Optional[dict]], streams: List[int],
                 workers: int, step: int, per_stream: int):
        self.stream_args, self.states, self.streams = stream_args, states, streams
        self.workers, self.step, self.per_stream = workers, step, per_stream

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        streams = [CanonicalStream(**self.stream_args, stream=c, state=self.states[c])
                   for c in self.streams[worker::self.workers]]
        step = self.step
        while True:
            rows: List[np.ndarray] = []
            sources: list = []
            for s in streams:
                s.take(self.per_stream, rows, sources)
            yield (worker, step, np.stack(rows), np.array(sources, dtype=np.int64),
                   {s.stream: s.state() for s in streams})
            step += 1


def _stop_signals_in_worker(signals: Sequence[int], closing, worker_id: int) -> None:
    """In each worker, after torch's own handlers (its TERM handler ends the worker): the stop
    signals are ignored, except when the trainer itself is shutting its workers down
    (``closing`` set; multiprocessing and torch then fall back on TERM for a worker that lags)."""
    def on_signal(signum, frame):
        if closing.value:
            os._exit(0)

    for sig in signals:
        signal.signal(sig, on_signal)


def _as_is(item):
    """The workers' items as they made them (the DataLoader would make numpy arrays tensors)."""
    return item


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
        self.global_batch = micro_batch_size * accumulation * dp_size
        self._set_streams(cfg.streams or self.global_batch, "data.streams")
        self.step = 0  # steps whose micro-batches were all handed out
        self.handed = 0  # micro-batches of the next step handed out
        self._it: Optional[Iterator] = None
        self._loader_iter = None  # the DataLoader's iterator, for its worker processes

    def _set_streams(self, streams: int, key: str) -> None:
        """The canonical streams and this rank's share of them (checked against the layout)."""
        if self.global_batch % streams:
            raise DataConfigError(
                f"{key}: {streams} streams do not divide the global batch of "
                f"{self.global_batch} samples (train.global_batch_size): every step takes the "
                "same number of samples from each stream")
        if streams % self.dp_size:
            raise DataConfigError(
                f"{key}: {streams} streams cannot be shared evenly by {self.dp_size} "
                "data-parallel ranks; use a data-parallel size that divides it")
        self.num_streams, self.per_stream = streams, self.global_batch // streams
        share = streams // self.dp_size
        self.local = list(range(self.dp_rank * share, (self.dp_rank + 1) * share))
        # workers beyond the rank's streams would have nothing to read
        self.workers = min(max(self.cfg.num_workers, 1), share)
        self.stream_states: Dict[int, Optional[dict]] = {c: None for c in self.local}

    def _batches(self) -> Iterator[TrainBatch]:
        stream_args = dict(sets=self.sets, weights=self.weights, num_streams=self.num_streams,
                           seed=self.cfg.seed, open_shards=self.cfg.open_shards)
        source = _Readers(stream_args, dict(self.stream_states), self.local, self.workers,
                          self.step, self.per_stream)
        if self.cfg.num_workers == 0:
            items = iter(source)
        else:
            loader = DataLoader(source, batch_size=None, num_workers=self.workers,
                                collate_fn=_as_is, prefetch_factor=self.cfg.prefetch_batches,
                                worker_init_fn=functools.partial(
                                    _stop_signals_in_worker, self.ignore_signals, self._closing))
            self._closing.value = 0
            items = self._loader_iter = iter(loader)
        skip = self.handed  # handed out before a restart: made again, not handed out twice
        per_rank = self.global_batch // self.dp_size
        while True:
            tokens, sources, states = self._step_samples(items)
            first = self.step * self.global_batch + self.dp_rank * per_rank
            for i in range(skip, self.accum):
                rows = slice(i * self.mb, (i + 1) * self.mb)
                index = torch.arange(first + rows.start, first + rows.stop)
                batch = self.collator(torch.from_numpy(tokens[rows].astype(np.int64)), index,
                                      self.step)
                batch = batch._replace(source=torch.from_numpy(sources[rows]))
                if self.pin_memory:  # the input is copied to the device as it is
                    batch = batch._replace(noisy=batch.noisy.pin_memory())
                self.handed = i + 1
                if self.handed == self.accum:  # the step's last: its streams' states count now
                    self.stream_states.update(states)
                    self.step, self.handed = self.step + 1, 0
                yield batch
            skip = 0

    def _step_samples(self, items):
        """One step's samples of this rank, [B/dp, sample_len] in global order, their sources
        and its streams' states after the step, from one item of each worker."""
        share = len(self.local)
        tokens = sources = None
        states: Dict[int, dict] = {}
        for expected in range(self.workers):
            worker, step, rows, src, st = next(items)
            if (worker, step) != (expected, self.step):  # never a step's samples out of place
                raise DataError(f"data readers out of step: worker {worker}'s samples of step "
                                f"{step} came where worker {expected}'s of step {self.step} "
                                "belong")
            if tokens is None:
                tokens = np.empty((share, self.per_stream, rows.shape[1]), dtype=rows.dtype)
                sources = np.empty((share, self.per_stream, 3), dtype=np.int64)
            # worker w holds the rank's streams w, w + W, ...: back to stream order
            tokens[worker::self.workers] = rows.reshape(-1, self.per_stream, rows.shape[1])
            sources[worker::self.workers] = src.reshape(-1, self.per_stream, 3)
            states.update(st)
        return tokens.reshape(share * self.per_stream, -1), sources.reshape(-1, 3), states

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

    def reader_bytes(self) -> int:
        """About what one reader (a worker, or the rank without workers) holds: for each of its
        streams and datasets ``open_shards`` units (a shard, or a piece of one), plus one shard's
        bytes while it reads one."""
        streams = -(-len(self.local) // self.workers)
        units = sum(self.cfg.open_shards * sum(s["bytes"] for s in ds.shards) / len(ds.shards)
                    / pieces_per_shard(len(ds.shards), self.num_streams) for ds in self.sets)
        largest = max(s["bytes"] for ds in self.sets for s in ds.shards)
        return int(streams * units + largest)

    def describe(self) -> str:
        return (f"{self.num_streams} canonical streams, {len(self.local)} on this data-parallel "
                f"rank, read by {self.workers} reader{'s' if self.workers > 1 else ''} "
                f"({'DataLoader workers' if self.cfg.num_workers else 'in the training process'})"
                f": about {self.reader_bytes() / 2**30:.2f} GiB of shards held per reader")

    @property
    def counters(self) -> Dict[str, int]:
        """Skipped inputs so far by this rank's streams (missing/corrupt shards, bad samples)."""
        return {k: sum((s or {}).get("counters", {}).get(k, 0)
                       for s in self.stream_states.values()) for k in COUNTERS}

    def _layout(self) -> dict:
        """What the order of the samples depends on: a resume must keep all of it."""
        return {"streams": self.num_streams, "global_batch": self.global_batch,
                "seed": self.cfg.seed, "open_shards": self.cfg.open_shards,
                "datasets": [[ds.name, ds.samples, ds.tokenizer_sha256, ds.shards_digest]
                             for ds in self.sets]}

    def state_dict(self) -> dict:
        # a copy: the loader replaces its streams' states as it hands out batches
        return {"version": STATE_VERSION, "layout": self._layout(), "dp_rank": self.dp_rank,
                "dp_size": self.dp_size, "micro_batch_size": self.mb, "step": self.step,
                "handed": self.handed,
                "streams": {str(c): s for c, s in self.stream_states.items()}}

    def load_state_dict(self, state: dict) -> None:
        """This rank's own saved state."""
        self.load_state_dicts([state])

    def load_state_dicts(self, states: List[dict]) -> None:
        """Restore from the states of the saved run's data-parallel ranks that held this rank's
        streams (``saved_ranks``; more do no harm), under any data-parallel size and worker
        count that divide the batch."""
        if self._it is not None:
            raise RuntimeError("load_state_dicts must come before the first batch")
        for state in states:
            _check_version(state)
        saved = states[0]["layout"]
        if self.cfg.streams is not None and self.cfg.streams != saved["streams"]:
            raise DataConfigError(
                f"data.streams: {self.cfg.streams}, but the run was started with "
                f"{saved['streams']} streams, which fix its order of samples; unset it (or set "
                f"{saved['streams']})")
        self._set_streams(saved["streams"], f"data state (saved with data.streams="
                                            f"{saved['streams']})")
        same = self._layout()
        for state in states:
            diff = ", ".join(f"{k} {state['layout'].get(k)} -> {v}" for k, v in same.items()
                             if state["layout"].get(k) != v)
            if diff:
                raise DataConfigError(
                    f"data state: saved with a different data layout ({diff}); resuming would "
                    "repeat or skip samples, so it is refused: keep data.seed, "
                    "data.open_shards, the datasets (and their shards) and "
                    "train.global_batch_size")
        steps = {(s["step"], s["handed"]) for s in states}
        if len(steps) > 1:
            raise DataConfigError(f"data state: the saved ranks stopped at different points "
                                  f"(step, micro-batches: {sorted(steps)}), not at one step")
        (step, handed), = steps
        saved_mb = (states[0]["dp_size"], states[0].get("micro_batch_size"))
        if handed and saved_mb != (self.dp_size, self.mb):
            raise DataConfigError(
                f"data state: saved {handed} micro-batches into step {step + 1}, which resumes "
                f"only under the data-parallel size and micro-batch size that saved it "
                f"({saved_mb[0]} x {saved_mb[1]}), not {self.dp_size} x {self.mb}")
        saved_streams = {int(c): s for state in states for c, s in state["streams"].items()}
        missing = [c for c in self.local if c not in saved_streams]
        if missing:
            raise DataConfigError(f"data state: the saved states given lack streams "
                                  f"{missing[0]}..{missing[-1]} of this rank")
        self.stream_states = {c: saved_streams[c] for c in self.local}
        self.step, self.handed = step, handed


def _check_version(state: dict) -> None:
    version = state.get("version")
    if version in (1, 2):
        how = ("one shard at a time, through a shuffle buffer" if version == 1 else
               "one stream per data-parallel rank and worker")
        raise DataConfigError(
            f"data state: saved by the loader of an earlier version ({how}), whose stream this "
            "version cannot continue: finish the run with the version that started it (README, "
            "Upgrading)")
    if version != STATE_VERSION:
        raise DataConfigError(f"data state: version {version} is not {STATE_VERSION}")
