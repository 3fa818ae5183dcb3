"""A dataset prepared as N independent parts (``llada prepare --parts N --part P``, e.g. the tasks
of a Slurm array), then merged into one manifest (``llada prepare --merge --parts N``).

The inputs, in prepare's seeded file order, are one stream of bytes; part P takes the bytes
[P x T / N, (P + 1) x T / N) of it (T: the total size). A file goes whole to the part its first
byte falls in, except an uncompressed one larger than ``SPLIT_MIN_BYTES``, which is cut at those
bounds at line boundaries (a line belongs to the part its first byte is in); a compressed file
cannot seek and always goes whole. So the parts' documents, in part order, are the documents of a
one-process prepare in its order; only a text file cut in two becomes two documents, and each
part packs its own sequences, dropping at most one partial sequence at its end.

The parts share a tokenizer trained or given beforehand (``--tokenizer``, or OUTPUT's
``tokenizer.model`` / ``tokenizer.hf.json`` from ``llada prepare --tokenizer-only``): each part
reads it and never writes it, so parts may run at once. A part writes its shards under names of
its own and, last, ``parts/part-P-of-N.json`` (its manifest, which marks it complete); the merge
reads those and refuses while one is missing, stale or lacks a shard, naming the part.
"""

from __future__ import annotations

import bisect
from dataclasses import replace
from pathlib import Path
from typing import List

from data_pipeline.config import PrepareConfig
from data_pipeline.corpus import Piece
from data_pipeline.errors import DataConfigError
from data_pipeline.tokenizer import SP_FILE, find_tokenizer

PARTS_DIR = "parts"  # beside the manifest: one manifest per part
PART_FORMAT = "llada-shards-part"
SPLIT_MIN_BYTES = 64 << 20  # an uncompressed input larger than this may be cut between parts
TOKENIZER_FILE = SP_FILE  # (the SentencePiece name; OUTPUT's own is found by find_tokenizer)


def part_manifest(out: Path, part: int, parts: int) -> Path:
    return out / PARTS_DIR / f"part-{part:05d}-of-{parts:05d}.json"


def skipped_list(out: Path, part: int, parts: int) -> Path:
    return out / PARTS_DIR / f"part-{part:05d}-of-{parts:05d}.skipped.txt"


def shard_prefix(name: str, part: int, parts: int) -> str:
    """The shards of part P are NAME-PPPPP-000000.tar ...; a one-process prepare's NAME-000000."""
    return name if parts == 1 else f"{name}-{part:05d}"


def sample_key(index: int, part: int, parts: int) -> str:
    """A sequence's key: its position in its part's packing order (before the shuffle), so the
    documents read back in order by sorting the keys."""
    return f"{index:010d}" if parts == 1 else f"{part:05d}-{index:010d}"


def splittable(path: Path) -> bool:
    return path.suffix != ".gz"


def split_inputs(files: List[Path], parts: int) -> List[List[Piece]]:
    """Each part's pieces of the inputs (see the module docstring), in input order."""
    sizes = [f.stat().st_size for f in files]
    total = sum(sizes)
    bounds = [p * total // parts for p in range(parts + 1)]
    out: List[List[Piece]] = [[] for _ in range(parts)]
    start = 0
    for path, size in zip(files, sizes):
        end = start + size
        first = min(bisect.bisect_right(bounds, start) - 1, parts - 1)
        if size > SPLIT_MIN_BYTES and splittable(path):
            for p in range(first, parts):
                lo, hi = max(start, bounds[p]), min(end, bounds[p + 1])
                if lo >= hi:
                    continue  # an empty part (fewer bytes than parts)
                out[p].append(Piece(path, lo - start, None if hi >= end else hi - start))
                if hi >= end:
                    break
        else:
            out[first].append(Piece(path))
        start = end
    return out


def with_part_tokenizer(cfg: PrepareConfig) -> PrepareConfig:
    """A part's settings with the tokenizer it must use named: the given model, or the one
    already in OUTPUT. A part never trains one (N parts would train N)."""
    if cfg.tokenizer.model:
        return cfg
    trained = find_tokenizer(Path(cfg.output), "prepare.tokenizer.model")
    if trained is None:
        raise DataConfigError(
            f"prepare.tokenizer.model: a dataset prepared in {cfg.parts} parts needs its "
            f"tokenizer beforehand: give --tokenizer MODEL, or train "
            f"{Path(cfg.output) / TOKENIZER_FILE} first with "
            "`llada prepare INPUTS -o OUTPUT --tokenizer-only` (llada slurm prepare does)")
    return replace(cfg, tokenizer=replace(cfg.tokenizer, model=str(trained)))
