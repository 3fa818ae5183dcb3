"""Loader construction shared by the data tests."""

from pathlib import Path
from typing import List, Optional

import numpy as np
import torch
import webdataset as wds

from data_pipeline.collate import MaskCollator
from data_pipeline.loader import PretrainLoader
from data_pipeline.shards import load_manifest
from data_pipeline.config import DataConfig, DatasetConfig, ObjectiveConfig


OPEN_LOADERS: List[PretrainLoader] = []  # closed after each test (tests/conftest.py)


def close_loaders() -> None:
    """Stop the workers of the loaders a test made. Left to the garbage collector (a loader and
    its stream refer to each other), each DataLoader waits 5 s per worker, in whatever later
    test the collection happens to run."""
    while OPEN_LOADERS:
        OPEN_LOADERS.pop().close()


def make_loader(manifests: List[Path], *, dp_rank=0, dp_size=1, workers=0, mb=4, accum=1,
                seed=0, open_shards=3, weights: Optional[List[float]] = None, shards_url=None,
                variable_length_prob=0.0, state=None, ignore_signals=(),
                streams=None) -> PretrainLoader:
    """A loader of one data-parallel rank (``streams``: data.streams; None: the global batch's
    samples, mb x accum x dp_size)."""
    weights = weights or [1.0] * len(manifests)
    cfg = DataConfig(datasets=[DatasetConfig(manifest=str(m), weight=w)
                               for m, w in zip(manifests, weights)],
                     seq_len=load_manifest(manifests[0]).seq_len, seed=seed,
                     open_shards=open_shards, num_workers=workers, prefetch_batches=2,
                     streams=streams)
    sets = [load_manifest(m, shards_url) for m in manifests]
    collator = MaskCollator(ObjectiveConfig(variable_length_prob=variable_length_prob),
                            sets[0].special_ids["mask"], cfg.seq_len)
    loader = PretrainLoader(cfg, sets, weights, collator, micro_batch_size=mb, accumulation=accum,
                            dp_rank=dp_rank, dp_size=dp_size, ignore_signals=ignore_signals)
    if state is not None:
        loader.load_state_dict(state)
    OPEN_LOADERS.append(loader)
    return loader


def take(loader, n):
    """n micro-batches as plain tensors (comparable with torch.equal)."""
    out = []
    for _ in range(n):
        b = next(loader)
        out.append({"noisy": b.noisy, "targets": b.targets, "mask": b.mask, "p_mask": b.p_mask,
                    "index": b.index, "step": torch.tensor(b.step), "source": b.source})
    return out


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def packed_stream(manifest):
    """(keys, tokens) of every sample of a dataset in packing order (prepare writes them
    shuffled; sorting the keys undoes it), read by plain webdataset."""
    ds = load_manifest(manifest)
    samples = [s for i in range(len(ds.shards))
               for s in wds.WebDataset(ds.url(i), shardshuffle=False).decode()]
    samples.sort(key=lambda s: s["__key__"])
    return [s["__key__"] for s in samples], np.concatenate([s["tokens.npy"] for s in samples])


def documents_in(tokens: np.ndarray, eos: int) -> List[tuple]:
    """The EOS-ended token runs of a packed stream, in order (the tail after the last EOS, a
    document the dataset's end cut, left out)."""
    cuts = np.flatnonzero(tokens == eos)
    return [tuple(r[:-1].tolist()) for r in np.split(tokens, cuts + 1)[:-1]]
