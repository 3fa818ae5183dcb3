"""``llada prepare``: text/JSONL files -> tokenised, EOS-joined, fixed-length sequences in tar
shards, plus a manifest (shards, samples and tokens per shard, sequence length, tokenizer hash,
special ids).

Deterministic: files are visited in a seeded order, documents in file order, and tokenised by a
pool of worker processes whose results are consumed in submission order, so the same inputs give
byte-identical shards whatever the worker count. Each shard is written under a temporary name and
renamed when complete, and the manifest (written last, atomically) is the only thing that marks a
dataset as complete: a crashed run leaves no shard under a final name that a manifest points at,
and a re-run redoes the dataset cleanly (or finds it up to date and returns).

Held-out split (``holdout_fraction``): each document goes to the training split or to the
held-out one by a seeded hash of its text (``held_out``), never both, and the same on every run;
the held-out split is a dataset of its own under ``holdout/`` (shards, manifest, tokenizer),
written before the training manifest that marks the whole as complete.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import random
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Iterator, List, Optional

import numpy as np

from data_pipeline.config import PrepareConfig
from data_pipeline.errors import DataConfigError
from data_pipeline.corpus import expand_inputs, read_documents, warn
from data_pipeline.files import atomic_write
from data_pipeline.shards import (FORMAT, MANIFEST, VERSION, ShardWriter, token_dtype,
                                  write_manifest)
from data_pipeline.tokenizer import tokenizer_for

TOKENIZER_FILE = "tokenizer.model"
HOLDOUT_DIR = "holdout"  # beside the manifest: the held-out split, a dataset of its own
SKIPPED_FILE = "skipped-inputs.txt"  # beside the manifest: every input prepare skipped, and why
CHUNK_CHARS = 1 << 20  # text per task sent to a worker: large enough to amortise the IPC

_worker_sp = None  # the SentencePiece model of a worker process


def _init_worker(model_path: str) -> None:
    global _worker_sp
    # a forked worker inherits the caller's Python signal handlers (``llada train`` installs
    # its stop-and-checkpoint handler for TERM before preparing data on first run): with one,
    # the pool's terminate() could not end a worker, and prepare would hang at its end
    for sig in signal.valid_signals():
        handler = signal.getsignal(sig)
        if callable(handler) and handler is not signal.default_int_handler:
            signal.signal(sig, signal.SIG_DFL)
    import sentencepiece as spm
    _worker_sp = spm.SentencePieceProcessor(model_file=model_path)


def encode_documents(sp, docs: List[str], eos: int, dtype: np.dtype) -> np.ndarray:
    """Token ids of the documents, each followed by EOS, as one flat array."""
    ids = sp.encode(docs)
    lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
    out = np.full(int(lengths.sum()), eos, dtype=dtype)
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    for start, x in zip(starts.tolist(), ids):
        out[start:start + len(x)] = x
    return out


def held_out(doc: str, fraction: float, seed: int) -> bool:
    """Whether a document belongs to the held-out split: its seeded 64-bit hash, as a fraction
    of 2^64, falls below ``fraction``. A function of the text alone, so the same document (also
    a duplicate of it in another file) is in the same split on every run and worker count."""
    if fraction <= 0.0:
        return False
    h = hashlib.blake2b(doc.encode("utf-8", "surrogatepass"), digest_size=8,
                        key=seed.to_bytes(8, "little"))
    return int.from_bytes(h.digest(), "little") < fraction * 2.0 ** 64


def _encode_task(task):
    """(training ids, held-out ids, held-out document count) of one chunk of documents."""
    docs, eos, dtype, fraction, seed = task
    split = [held_out(d, fraction, seed) for d in docs]
    held = [d for d, h in zip(docs, split) if h]
    kept = [d for d, h in zip(docs, split) if not h]
    dtype = np.dtype(dtype)
    return (encode_documents(_worker_sp, kept, eos, dtype),
            encode_documents(_worker_sp, held, eos, dtype), len(held))


class _Packer:
    """EOS-joined token ids cut into seq_len sequences and written to shards of one split."""

    def __init__(self, out: Path, name: str, seq_len: int, samples_per_shard: int, dtype):
        self.out, self.name, self.seq_len = out, name, seq_len
        self.samples_per_shard = samples_per_shard
        self.buf = np.empty(0, dtype=dtype)
        self.shards: List[dict] = []
        self.writer: Optional[ShardWriter] = None
        self.samples = 0

    def add(self, ids: np.ndarray) -> None:
        buf = np.concatenate((self.buf, ids)) if self.buf.size else ids
        n_seq = buf.size // self.seq_len
        for i in range(n_seq):
            if self.writer is None:
                self.writer = ShardWriter(self.out / f"{self.name}-{len(self.shards):06d}.tar")
            self.writer.add(f"{self.samples:010d}", buf[i * self.seq_len:(i + 1) * self.seq_len])
            self.samples += 1
            if self.writer.samples == self.samples_per_shard:
                self.shards.append(self.writer.close())
                self.writer = None
        self.buf = buf[n_seq * self.seq_len:].copy()

    def close(self) -> None:
        if self.writer is not None:
            self.shards.append(self.writer.close())
            self.writer = None

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()


def _chunks(files: List[Path], text_field: str, counts: Counter, skipped: List[str]
            ) -> Iterator[List[str]]:
    chunk: List[str] = []
    size = 0
    for path in files:
        counts["files"] += 1
        for doc in read_documents(path, text_field, counts,
                                  report=lambda kind, msg: skipped.append(msg)):
            counts["documents"] += 1
            chunk.append(doc)
            size += len(doc)
            if size >= CHUNK_CHARS:
                yield chunk
                chunk, size = [], 0
    if chunk:
        yield chunk


def _fingerprint(cfg: PrepareConfig, files: List[Path]) -> str:
    """What the shards depend on: the inputs (path, size, mtime), the settings, the tokenizer
    (the given model's bytes, or the settings it is trained with)."""
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    tc = cfg.tokenizer
    tok = (hashlib.sha256(Path(tc.model).read_bytes()).hexdigest()
           if tc.model and Path(tc.model).is_file() else [tc.vocab_size, tc.train_bytes, tc.seed])
    settings = [cfg.seq_len, cfg.samples_per_shard, cfg.jsonl_text_field, cfg.seed, cfg.name, tok]
    if cfg.holdout_fraction > 0:  # (without one: as before, so older datasets stay up to date)
        settings += [cfg.holdout_fraction, cfg.holdout_seed]
    h.update(json.dumps(settings).encode())
    return h.hexdigest()


def _up_to_date(out: Path, fingerprint: str, holdout: bool) -> Optional[dict]:
    """The manifest in ``out`` when it (and the held-out split's, if one is asked for) was
    written from these inputs and settings and every shard it lists is there."""
    found = []
    for directory in (out, out / HOLDOUT_DIR) if holdout else (out,):
        try:
            m = json.loads((directory / MANIFEST).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(m, dict) or m.get("fingerprint") != fingerprint:
            return None
        if not all((directory / s["file"]).is_file()
                   and (directory / s["file"]).stat().st_size == s["bytes"]
                   for s in m.get("shards", [])):
            return None
        found.append(m)
    return found[0]


def _manifest(cfg: PrepareConfig, name: str, packer: _Packer, tok, dtype, fingerprint: str,
              sources: dict) -> dict:
    return {
        "format": FORMAT, "version": VERSION, "name": name,
        "seq_len": cfg.seq_len, "dtype": dtype.name,
        "samples": packer.samples, "tokens": packer.samples * cfg.seq_len,
        "shards": packer.shards,
        "tokenizer": {"file": TOKENIZER_FILE, "sha256": tok.sha256, "vocab_size": tok.vocab_size,
                      "special_ids": tok.special_ids()},
        "sources": {**sources, "dropped_tail_tokens": int(packer.buf.size)},
        "fingerprint": fingerprint,
    }


def prepare(cfg: PrepareConfig, log=print) -> dict:
    """Prepare (or find up to date) the dataset cfg describes; returns its manifest."""
    files = expand_inputs(cfg.inputs)
    random.Random(cfg.seed).shuffle(files)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    fingerprint = _fingerprint(cfg, files)
    holdout = cfg.holdout_fraction > 0
    done = _up_to_date(out, fingerprint, holdout)
    if done is not None:
        log(f"llada prepare: {out / MANIFEST} is up to date ({done['samples']} samples)")
        return done
    # from here on the dataset is being rewritten: no manifest may point at a half of it
    held_dir = out / HOLDOUT_DIR
    (out / MANIFEST).unlink(missing_ok=True)
    (held_dir / MANIFEST).unlink(missing_ok=True)
    for stale in [*out.glob(f"{cfg.name}-*.tar*"), *held_dir.glob(f"{cfg.name}-*.tar*")]:
        stale.unlink()
    tok = tokenizer_for(files, cfg.tokenizer, out / TOKENIZER_FILE, cfg.jsonl_text_field)
    if holdout:
        held_dir.mkdir(exist_ok=True)
        atomic_write(held_dir / TOKENIZER_FILE, tok.path.read_bytes())

    workers = cfg.workers or os.cpu_count() or 1
    dtype = token_dtype(tok.vocab_size)
    counts: Counter = Counter()
    skipped: List[str] = []  # one line per skipped input, written to SKIPPED_FILE
    train = _Packer(out, cfg.name, cfg.seq_len, cfg.samples_per_shard, dtype)
    held = _Packer(held_dir, f"{cfg.name}-holdout", cfg.seq_len, cfg.samples_per_shard, dtype)
    # fork: workers run only SentencePiece and numpy (never torch), so threads the caller may
    # hold are not needed in them; spawn would re-import the caller's main module
    ctx = mp.get_context("fork")
    try:
        with ctx.Pool(workers, initializer=_init_worker, initargs=(str(tok.path),)) as pool:
            tasks = ((docs, tok.eos_id, dtype.str, cfg.holdout_fraction, cfg.holdout_seed)
                     for docs in _chunks(files, cfg.jsonl_text_field, counts, skipped))
            for kept, out_ids, held_docs in pool.imap(_encode_task, tasks):
                counts["tokens"] += int(kept.size)
                counts["held_tokens"] += int(out_ids.size)
                counts["held_documents"] += held_docs
                train.add(kept)
                held.add(out_ids)
        train.close()
        held.close()
    finally:
        train.abort()
        held.abort()
    if not train.shards:
        raise DataConfigError(f"prepare.inputs: {counts['tokens']} tokens in {len(files)} files, "
                              f"fewer than one sequence of prepare.seq_len={cfg.seq_len}")
    if holdout and not held.shards:
        raise DataConfigError(
            f"prepare.holdout_fraction: {cfg.holdout_fraction} held out "
            f"{counts['held_documents']} documents ({counts['held_tokens']} tokens), fewer than "
            f"one sequence of prepare.seq_len={cfg.seq_len}; hold out more")
    sources = {"files": counts["files"],
               "documents": counts["documents"] - counts["held_documents"],
               "empty_files": counts["empty_files"], "bad_lines": counts["bad_lines"],
               "unreadable_files": counts["unreadable_files"]}
    manifest = _manifest(cfg, cfg.name, train, tok, dtype, fingerprint, sources)
    if holdout:  # written first: the training manifest marks the whole dataset complete
        split = {"fraction": cfg.holdout_fraction, "seed": cfg.holdout_seed}
        held_manifest = _manifest(cfg, f"{cfg.name}-holdout", held, tok, dtype, fingerprint,
                                  {"documents": counts["held_documents"]})
        write_manifest(held_dir, {**held_manifest, "split": {"holdout_of": cfg.name, **split}})
        manifest["holdout"] = {"manifest": f"{HOLDOUT_DIR}/{MANIFEST}", **split,
                               "documents": counts["held_documents"], "samples": held.samples}
    # the list of skips before the manifest: a complete dataset always has the one that fits it
    atomic_write(out / SKIPPED_FILE, "".join(f"{line}\n" for line in skipped).encode())
    path = write_manifest(out, manifest)
    elapsed = time.perf_counter() - t0
    if skipped:  # one line on the first screen; each input is named in the list
        kinds = ", ".join(f"{counts[k]} {k.replace('_', ' ')}" for k in
                          ("empty_files", "bad_lines", "unreadable_files") if counts[k])
        warn("skipped_inputs", f"prepare skipped {len(skipped)} inputs ({kinds}), each named "
             f"in {out / SKIPPED_FILE}")
    log(f"llada prepare: {train.samples} sequences of {cfg.seq_len} tokens in "
        f"{len(train.shards)} shards from "
        f"{sources['documents']} documents in {counts['files']} files ({len(skipped)} skipped "
        f"inputs), {elapsed:.1f}s; {path}")
    if holdout:
        log(f"llada prepare: held out {counts['held_documents']} documents "
            f"({cfg.holdout_fraction:g} by hash): {held.samples} sequences in "
            f"{len(held.shards)} shards; {held_dir / MANIFEST}")
    return manifest
