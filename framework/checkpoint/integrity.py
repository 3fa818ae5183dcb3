"""Content checksums of a checkpoint's files: computed by the rank that writes a file while it
writes it, recorded in meta.json, verified at resume (each rank a share of the files) and by
``llada checkpoint verify``.

A disk that flips bits, or a copy cut and padded back to size, leaves every size as it was: only
the content tells. xxHash's XXH3-128 (the maintained ``xxhash`` package) hashes at memory speed,
so hashing while ``torch.save`` streams a shard out costs little next to the write itself.
meta.json carries its own checksum too (over its text without that one key), so a damaged step
count or file list is caught as well.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List, Optional

import torch
import xxhash
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

ALGORITHM = "xxh3_128"
META_CHECKSUM = "meta_checksum"  # meta.json's key for the checksum of the rest of it
_CHUNK = 16 << 20


def hash_bytes(data: bytes) -> str:
    return xxhash.xxh3_128_hexdigest(data)


def hash_file(path: Path) -> str:
    """The file's checksum, read in large chunks into one reused buffer."""
    h = xxhash.xxh3_128()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                return h.hexdigest()
            h.update(view[:n])


class _HashingWriter:
    """A write-only file object that hashes what passes through it (torch.save streams to it)."""

    def __init__(self, f):
        self.f, self.h = f, xxhash.xxh3_128()

    def write(self, data) -> int:
        self.h.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


class HashingCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch.save engine, hashing each file as it is written; ``take`` hands over
    the checksums of the files this rank wrote since the last call (absolute path -> hex)."""

    def __init__(self, config_params=None):
        super().__init__(config_params)
        self.name = "LLaDAHashingCheckpointEngine"
        self._written: Dict[str, str] = {}

    def save(self, state_dict, path: str):
        with open(path, "wb") as f:
            out = _HashingWriter(f)
            torch.save(state_dict, out, _use_new_zipfile_serialization=self.zipfile_serialization)
        self._written[os.path.abspath(path)] = out.h.hexdigest()

    def take(self) -> Dict[str, str]:
        written, self._written = self._written, {}
        return written

    def load(self, path: str, map_location=None):
        """Memory-mapped: one pass over the file, into the tensors DeepSpeed copies from (the
        resume's check has just read it, so from the page cache); none kept file-backed
        (``detach_from_files``)."""
        return torch.load(path, map_location=map_location, mmap=True, weights_only=False)


def detach_from_files(engine) -> None:
    """The optimizer state a load may have left memory-mapped from the checkpoint's files
    (torch's Optimizer.load_state_dict keeps a tensor of the right device and dtype as it is,
    so on CPU and with the optimizer offloaded) copied into the process's own memory: the files
    may go (retention) and the pages are the training's. Every CPU tensor of the state: a
    private mapping does not say it is one."""
    for opt in {id(o): o for o in (engine.optimizer,
                                   getattr(engine.optimizer, "optimizer", None)) if o}.values():
        for state in getattr(opt, "state", {}).values():
            for key, value in state.items():
                if torch.is_tensor(value) and value.device.type == "cpu":
                    state[key] = value.clone()


def hashing_engine(engine) -> HashingCheckpointEngine:
    """The engine's checkpoint engine, replaced by ours on first use."""
    if type(engine.checkpoint_engine) is not HashingCheckpointEngine:  # nor the async one
        engine.checkpoint_engine = HashingCheckpointEngine(engine._config)
    return engine.checkpoint_engine


# ----------------------------------------------------------------------------- meta.json
def meta_bytes(meta: dict) -> bytes:
    """meta.json's text, its own checksum added as the last key."""
    body = {k: v for k, v in meta.items() if k != META_CHECKSUM}
    return _dumps({**body, META_CHECKSUM: hash_bytes(_dumps(body))})


def meta_problem(meta: dict) -> Optional[str]:
    """Why meta.json's content is not what was written, or None (also for a meta.json written
    before checksums, which has none)."""
    if META_CHECKSUM not in meta:  # written before checksums, unless its file list has them
        return "meta.json: its own checksum is missing (damaged)" if has_checksums(meta) \
            else None
    body = {k: v for k, v in meta.items() if k != META_CHECKSUM}
    if hash_bytes(_dumps(body)) != meta[META_CHECKSUM]:
        return "meta.json: its content differs from its checksum (damaged)"
    return None


def _dumps(obj: dict) -> bytes:
    return json.dumps(obj, indent=1).encode()


# ----------------------------------------------------------------------------- verification
def has_checksums(meta: dict) -> bool:
    return isinstance(meta.get("checksums"), dict)


def damaged(tag_dir: Path, meta: dict, rels: List[str]) -> List[str]:
    """``rels`` of the checkpoint whose content is not what was written, each as
    ``"<file>: why"``; [] for a checkpoint written before checksums (nothing to compare)."""
    if not has_checksums(meta):
        return []
    sums = meta["checksums"].get("files", {})
    bad = []
    for rel in rels:
        want = sums.get(rel)
        if want is None:
            bad.append(f"{rel}: no checksum recorded")
            continue
        try:
            got = hash_file(tag_dir / rel)
        except OSError as e:
            bad.append(f"{rel}: unreadable ({e.strerror or type(e).__name__})")
            continue
        if got != want:
            bad.append(f"{rel}: content differs from the checksum recorded at save (damaged)")
    return bad


def share(meta: dict, rank: int, world_size: int) -> List[str]:
    """The files of a checkpoint that ``rank`` verifies: every file once over the world, the
    bytes spread evenly (largest first, each to the least loaded rank; alike on every rank)."""
    load = [0] * world_size
    mine = []
    for rel, size in sorted(meta["files"].items(), key=lambda kv: (-kv[1], kv[0])):
        r = min(range(world_size), key=lambda i: (load[i], i))
        load[r] += size
        if r == rank:
            mine.append(rel)
    return mine
