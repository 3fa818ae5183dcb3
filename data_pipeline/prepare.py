"""``llada prepare``: text/JSONL files -> tokenised, EOS-joined, fixed-length sequences in tar
shards, plus a manifest (shards, samples and tokens per shard, sequence length, tokenizer hash,
special ids).

Deterministic: files are visited in a seeded order, documents in file order, and tokenised by a
pool of worker processes whose results are consumed in submission order, so the same inputs give
byte-identical shards whatever the worker count. Each shard is written under a temporary name and
renamed when complete, and the manifest (written last, atomically) is the only thing that marks a
dataset as complete: a crashed run leaves no shard under a final name that a manifest points at,
and a re-run redoes the dataset cleanly (or finds it up to date and returns).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import random
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
SKIPPED_FILE = "skipped-inputs.txt"  # beside the manifest: every input prepare skipped, and why
CHUNK_CHARS = 1 << 20  # text per task sent to a worker: large enough to amortise the IPC

_worker_sp = None  # the SentencePiece model of a worker process


def _init_worker(model_path: str) -> None:
    global _worker_sp
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


def _encode_task(task) -> np.ndarray:
    docs, eos, dtype = task
    return encode_documents(_worker_sp, docs, eos, np.dtype(dtype))


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
    h.update(json.dumps([cfg.seq_len, cfg.samples_per_shard, cfg.jsonl_text_field, cfg.seed,
                         cfg.name, tok]).encode())
    return h.hexdigest()


def _up_to_date(out: Path, fingerprint: str) -> Optional[dict]:
    path = out / MANIFEST
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(m, dict) or m.get("fingerprint") != fingerprint:
        return None
    if not all((out / s["file"]).is_file() and (out / s["file"]).stat().st_size == s["bytes"]
               for s in m.get("shards", [])):
        return None
    return m


def prepare(cfg: PrepareConfig, log=print) -> dict:
    """Prepare (or find up to date) the dataset cfg describes; returns its manifest."""
    files = expand_inputs(cfg.inputs)
    random.Random(cfg.seed).shuffle(files)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    fingerprint = _fingerprint(cfg, files)
    done = _up_to_date(out, fingerprint)
    if done is not None:
        log(f"llada prepare: {out / MANIFEST} is up to date ({done['samples']} samples)")
        return done
    # from here on the dataset is being rewritten: no manifest may point at a half of it
    (out / MANIFEST).unlink(missing_ok=True)
    for stale in out.glob(f"{cfg.name}-*.tar*"):
        stale.unlink()
    tok = tokenizer_for(files, cfg.tokenizer, out / TOKENIZER_FILE, cfg.jsonl_text_field)

    workers = cfg.workers or os.cpu_count() or 1
    dtype = token_dtype(tok.vocab_size)
    counts: Counter = Counter()
    skipped: List[str] = []  # one line per skipped input, written to SKIPPED_FILE
    shards: List[dict] = []
    writer: Optional[ShardWriter] = None
    buf = np.empty(0, dtype=dtype)
    sample = 0
    # fork: workers run only SentencePiece and numpy (never torch), so threads the caller may
    # hold are not needed in them; spawn would re-import the caller's main module
    ctx = mp.get_context("fork")
    try:
        with ctx.Pool(workers, initializer=_init_worker, initargs=(str(tok.path),)) as pool:
            tasks = ((docs, tok.eos_id, dtype.str) for docs in
                     _chunks(files, cfg.jsonl_text_field, counts, skipped))
            for ids in pool.imap(_encode_task, tasks):
                counts["tokens"] += int(ids.size)
                buf = np.concatenate((buf, ids)) if buf.size else ids
                n_seq = buf.size // cfg.seq_len
                for i in range(n_seq):
                    if writer is None:
                        writer = ShardWriter(out / f"{cfg.name}-{len(shards):06d}.tar")
                    writer.add(f"{sample:010d}", buf[i * cfg.seq_len:(i + 1) * cfg.seq_len])
                    sample += 1
                    if writer.samples == cfg.samples_per_shard:
                        shards.append(writer.close())
                        writer = None
                buf = buf[n_seq * cfg.seq_len:].copy()
        if writer is not None:
            shards.append(writer.close())
            writer = None
    finally:
        if writer is not None:
            writer.abort()
    if not shards:
        raise DataConfigError(f"prepare.inputs: {counts['tokens']} tokens in {len(files)} files, "
                              f"fewer than one sequence of prepare.seq_len={cfg.seq_len}")
    manifest = {
        "format": FORMAT, "version": VERSION, "name": cfg.name,
        "seq_len": cfg.seq_len, "dtype": dtype.name,
        "samples": sample, "tokens": sample * cfg.seq_len,
        "shards": shards,
        "tokenizer": {"file": TOKENIZER_FILE, "sha256": tok.sha256, "vocab_size": tok.vocab_size,
                      "special_ids": tok.special_ids()},
        "sources": {"files": counts["files"], "documents": counts["documents"],
                    "empty_files": counts["empty_files"], "bad_lines": counts["bad_lines"],
                    "unreadable_files": counts["unreadable_files"],
                    "dropped_tail_tokens": int(buf.size)},
        "fingerprint": fingerprint,
    }
    # the list of skips before the manifest: a complete dataset always has the one that fits it
    atomic_write(out / SKIPPED_FILE, "".join(f"{line}\n" for line in skipped).encode())
    path = write_manifest(out, manifest)
    elapsed = time.perf_counter() - t0
    if skipped:  # one line on the first screen; each input is named in the list
        kinds = ", ".join(f"{counts[k]} {k.replace('_', ' ')}" for k in
                          ("empty_files", "bad_lines", "unreadable_files") if counts[k])
        warn("skipped_inputs", f"prepare skipped {len(skipped)} inputs ({kinds}), each named "
             f"in {out / SKIPPED_FILE}")
    log(f"llada prepare: {sample} sequences of {cfg.seq_len} tokens in {len(shards)} shards from "
        f"{counts['documents']} documents in {counts['files']} files ({len(skipped)} skipped "
        f"inputs), "
        f"{elapsed:.1f}s; {path}")
    return manifest
