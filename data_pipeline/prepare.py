"""``llada prepare``: text/JSONL files -> tokenised, EOS-joined, fixed-length sequences in tar
shards, plus a manifest (shards, samples and tokens per shard, sequence length, tokenizer hash,
special ids).

Deterministic: files are visited in a seeded order, documents in file order, and tokenised by a
pool of worker processes whose results are consumed in submission order, so the same inputs give
byte-identical shards whatever the worker count.

Sequence order: the packed sequences are kept in a flat temporary file (as many bytes as the
shards, beside them) and written to the shards in a seeded random permutation of all of them, so
every shard is a uniform sample of the dataset (of the part, for a dataset prepared in parts:
``data_pipeline/parts.py``) and a reader holding a few shards draws batches as diverse as uniform
sampling over the corpus. A sequence's key is its place in the packing order, so sorting by key
gives the documents back in order. Each shard is written under a temporary name and
renamed when complete, and the manifest (written last, atomically) is the only thing that marks a
dataset as complete: a crashed run leaves no shard under a final name that a manifest points at,
and a re-run redoes the dataset cleanly (or finds it up to date and returns).

Held-out split (``holdout_fraction``): each document goes to the training split or to the
held-out one by a seeded hash of its text (``held_out``), never both, and the same on every run;
the held-out split is a dataset of its own under ``holdout/`` (shards, manifest, tokenizer),
written before the training manifest that marks the whole as complete.

SFT shards (``sft``: data_pipeline/prepare_sft.py) are made by the same machinery (the output's
clean-up, the seeded shuffle into shards, the fingerprint, the manifests), one pair per sample.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import multiprocessing as mp
import os
import random
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import numpy as np

from data_pipeline.config import PrepareConfig
from data_pipeline.errors import DataConfigError
from data_pipeline.corpus import Piece, expand_inputs, read_documents, warn
from data_pipeline.files import atomic_write
from data_pipeline.parts import (PART_FORMAT, part_manifest, sample_key, shard_prefix,
                                 skipped_list, split_inputs, with_part_tokenizer)
from data_pipeline.shards import (FORMAT, MANIFEST, VERSION, ShardWriter, token_dtype,
                                  write_manifest)
from data_pipeline.tokenizer import Tokenizer, batch_encoder, carry, load_tokenizer, tokenizer_for

SEQUENCE_ORDER = "shuffled-1"  # in the fingerprint: shards of the unshuffled order are redone
SFT_PAIRS = "sft-1"  # in an SFT fingerprint: the sample layout and how pairs are made
HOLDOUT_DIR = "holdout"  # beside the manifest: the held-out split, a dataset of its own
SKIPPED_FILE = "skipped-inputs.txt"  # beside the manifest: every input prepare skipped, and why
SOURCE_COUNTS = ("files", "documents", "empty_files", "bad_lines", "unreadable_files")  # manifest
CHUNK_CHARS = 1 << 20  # text per task sent to a worker: large enough to amortise the IPC

_worker_encode = None  # a worker process's encoder: documents -> ids (tokenizer.batch_encoder)


def _init_worker(tokenizer_args) -> None:
    global _worker_encode
    # a forked worker inherits the caller's Python signal handlers (``llada train`` installs
    # its stop-and-checkpoint handler for TERM before preparing data on first run): with one,
    # the pool's terminate() could not end a worker, and prepare would hang at its end
    for sig in signal.valid_signals():
        handler = signal.getsignal(sig)
        if callable(handler) and handler is not signal.default_int_handler:
            signal.signal(sig, signal.SIG_DFL)
    _worker_encode = batch_encoder(tokenizer_args)


@contextlib.contextmanager
def _forking():
    """While the pool forks its workers: told that they run without its thread pool, the
    Hugging Face tokenizers library has no pool to deadlock on in a child, and no cause to warn
    (as its versions that check at fork do) when the parent has used its own."""
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved


def _pool(workers: int, tok: Tokenizer):
    # SentencePiece: fork (workers run only it and numpy, never torch, so threads the caller may
    # hold are not needed in them; spawn would re-import the caller's main module). A Hugging
    # Face tokenizer: forkserver, workers forked from a clean server process: a fork of a
    # process whose threads (tokenizers' Rust pool, a torch run's) held a lock at that moment
    # was seen to hang in the full test suite, its one worker waiting on the task queue's lock
    method = "fork" if tok.kind == "sentencepiece" else "forkserver"
    with _forking():
        return mp.get_context(method).Pool(workers, initializer=_init_worker,
                                           initargs=(tok.worker_args(),))


def encode_documents(encode, docs: List[str], eos: int, dtype: np.dtype) -> np.ndarray:
    """Token ids of the documents (``encode``: a batch encoder), each followed by EOS, as one
    flat array."""
    ids = encode(docs)
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
    return (encode_documents(_worker_encode, kept, eos, dtype),
            encode_documents(_worker_encode, held, eos, dtype), len(held))


class Packer:
    """A stream of ids cut into samples of ``seq_len`` ids (EOS-joined documents; SFT samples,
    which come whole), kept in a flat temporary file, and at ``close`` written to the shards of one
    split in a seeded permutation of all of them. ``sample_tokens``: ShardWriter's."""

    def __init__(self, out: Path, prefix: str, seq_len: int, samples_per_shard: int, dtype,
                 order_seed: List[int], key=lambda i: f"{i:010d}",
                 sample_tokens: Optional[int] = None):
        self.out, self.prefix, self.seq_len = out, prefix, seq_len
        self.samples_per_shard, self.order_seed, self.key = samples_per_shard, order_seed, key
        self.sample_tokens = sample_tokens
        self.dtype = np.dtype(dtype)
        self.buf = np.empty(0, dtype=dtype)
        self.shards: List[dict] = []
        self.samples = 0
        self.tmp = out / f".{prefix}.sequences.tmp"
        self._file = open(self.tmp, "wb")
        self._writer: Optional[ShardWriter] = None

    def add(self, ids: np.ndarray) -> None:
        buf = np.concatenate((self.buf, ids)) if self.buf.size else ids
        n_seq = buf.size // self.seq_len
        if n_seq:
            self._file.write(buf[:n_seq * self.seq_len].tobytes())
            self.samples += n_seq
        self.buf = buf[n_seq * self.seq_len:].copy()

    def close(self) -> None:
        self._file.close()
        if self.samples:
            seqs = np.memmap(self.tmp, dtype=self.dtype, mode="r",
                             shape=(self.samples, self.seq_len))
            order = np.random.default_rng(self.order_seed).permutation(self.samples)
            for j, lo in enumerate(range(0, self.samples, self.samples_per_shard)):
                idx = order[lo:lo + self.samples_per_shard]
                rows = np.empty((len(idx), self.seq_len), dtype=self.dtype)
                by_place = np.argsort(idx)
                rows[by_place] = seqs[idx[by_place]]  # read in file order, write shuffled
                self._writer = ShardWriter(self.out / f"{self.prefix}-{j:06d}.tar",
                                           self.sample_tokens)
                for i, row in zip(idx.tolist(), rows):
                    self._writer.add(self.key(i), row)
                self.shards.append(self._writer.close())
                self._writer = None
            del seqs
        self.tmp.unlink()

    def abort(self) -> None:
        self._file.close()
        if self._writer is not None:
            self._writer.abort()
        self.tmp.unlink(missing_ok=True)


def _chunks(pieces: List[Piece], text_field: str, counts: Counter, skipped: List[str]
            ) -> Iterator[List[str]]:
    chunk: List[str] = []
    size = 0
    for piece in pieces:
        counts["files"] += piece.start == 0  # a file cut between parts counts in its first
        for doc in read_documents(piece, text_field, counts,
                                  report=lambda kind, msg: skipped.append(msg)):
            counts["documents"] += 1
            chunk.append(doc)
            size += len(doc)
            if size >= CHUNK_CHARS:
                yield chunk
                chunk, size = [], 0
    if chunk:
        yield chunk


def input_files(cfg: PrepareConfig) -> List[Path]:
    """The inputs in the seeded order prepare visits them."""
    files = expand_inputs(cfg.inputs, sft=cfg.sft)
    random.Random(cfg.seed).shuffle(files)
    return files


def fingerprint(cfg: PrepareConfig, files: List[Path], part: Optional[int] = None) -> str:
    """What the shards depend on: the inputs (path, size, mtime), the settings, the tokenizer
    (the given one's carried bytes, or the settings it is trained with); with parts, their
    number (and which part, for a part's own)."""
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    tc = cfg.tokenizer
    model = Path(tc.model) if tc.model else None
    if model is not None and (model.is_dir() or model.name == "tokenizer.json"):
        tok = load_tokenizer(model, "prepare.tokenizer.model").sha256  # the bytes it carries
    elif model is not None and model.is_file():  # (a file's own bytes: as before)
        tok = hashlib.sha256(model.read_bytes()).hexdigest()
    else:
        tok = [tc.vocab_size, tc.train_bytes, tc.seed]
    settings = [cfg.seq_len, cfg.samples_per_shard, cfg.jsonl_text_field, cfg.seed, cfg.name, tok]
    if cfg.holdout_fraction > 0:
        settings += [cfg.holdout_fraction, cfg.holdout_seed]
    settings.append(SEQUENCE_ORDER)
    if cfg.sft:  # (only then: the fingerprints of pretraining shards stay what they were)
        settings += [SFT_PAIRS, cfg.sft_overflow]
    if cfg.parts > 1:
        settings += [cfg.parts] + ([part] if part is not None else [])
    h.update(json.dumps(settings).encode())
    return h.hexdigest()


def missing_shard(directory: Path, shards: List[dict]) -> Optional[str]:
    """The first listed shard that is not in ``directory`` at its recorded size."""
    for x in shards:
        path = directory / x["file"]
        if not path.is_file() or path.stat().st_size != x["bytes"]:
            return x["file"]
    return None


def _read_json(path: Path) -> Optional[dict]:
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) else None


def up_to_date(out: Path, where: Path, fingerprint: str, holdout: bool) -> Optional[dict]:
    """The manifest at ``where`` (the dataset's, or a part's) when it was written from these
    inputs and settings and every shard it lists (and its held-out split's, if one is asked
    for) is there."""
    m = _read_json(where)
    if m is None or m.get("fingerprint") != fingerprint or missing_shard(out, m["shards"]):
        return None
    if holdout:
        held = m.get("holdout") if m.get("format") == PART_FORMAT else _read_json(
            out / HOLDOUT_DIR / MANIFEST)
        if (held is None or held.get("fingerprint") != fingerprint
                or missing_shard(out / HOLDOUT_DIR, held["shards"])):
            return None
    return m


def sample_dtype(cfg: PrepareConfig, vocab_size: int) -> np.dtype:
    """The dtype of the samples: the vocabulary's, wide enough for an SFT sample's prompt length
    (up to seq_len) too."""
    return token_dtype(max(vocab_size, cfg.seq_len + 1) if cfg.sft else vocab_size)


def manifest_of(cfg: PrepareConfig, name: str, shards: List[dict], dropped: Optional[int], tok,
                fingerprint: str, sources: dict) -> dict:
    """``dropped``: the tokens of the last partial sequence (None for SFT, which packs none)."""
    samples = sum(x["samples"] for x in shards)
    tail = {} if dropped is None else {"dropped_tail_tokens": dropped}
    return {
        "format": FORMAT, "version": VERSION, "name": name,
        "kind": "sft" if cfg.sft else "pretrain",
        "seq_len": cfg.seq_len, "dtype": sample_dtype(cfg, tok.vocab_size).name,
        "samples": samples, "tokens": samples * cfg.seq_len, "shards": shards,
        "tokenizer": tok.manifest_entry(),
        "sources": {**sources, **tail},
        "fingerprint": fingerprint,
        "order": SEQUENCE_ORDER,
    }


def _where(cfg: PrepareConfig) -> Path:
    """The manifest that marks this run's output complete: the dataset's, or the part's."""
    out = Path(cfg.output)
    return part_manifest(out, cfg.part, cfg.parts) if cfg.parts > 1 else out / MANIFEST


def reuse_or_clear(cfg: PrepareConfig, fp: str, log=print) -> Optional[dict]:
    """The manifest of this run's output when it is up to date with fingerprint ``fp``;
    otherwise None, once the manifests and shards an earlier run left are removed: from here on
    the output is being rewritten, and no manifest may point at a half of it."""
    out, where, in_parts = Path(cfg.output), _where(cfg), cfg.parts > 1
    out.mkdir(parents=True, exist_ok=True)
    held_dir = out / HOLDOUT_DIR
    done = up_to_date(out, where, fp, cfg.holdout_fraction > 0)
    if done is not None:
        log(f"llada prepare: {where} is up to date ({done['samples']} samples)")
        return done
    prefix = shard_prefix(cfg.name, cfg.part, cfg.parts)
    where.unlink(missing_ok=True)
    if not in_parts:
        (held_dir / MANIFEST).unlink(missing_ok=True)
    for stale in [*out.glob(f"{prefix}-*.tar*"), *held_dir.glob(f"{prefix}-holdout-*.tar*")]:
        stale.unlink()
    return None


def dataset_tokenizer(cfg: PrepareConfig, files: List[Path]) -> Tokenizer:
    """The tokenizer the shards are written with, in OUTPUT (and in its holdout/, a dataset of
    its own) unless this run is a part, which reads the one given and never writes it (the
    parts share it and may run at once)."""
    out = Path(cfg.output)
    if cfg.parts > 1:
        return load_tokenizer(Path(cfg.tokenizer.model), "prepare.tokenizer.model")
    tok = tokenizer_for(files, cfg.tokenizer, out, cfg.jsonl_text_field)
    if cfg.holdout_fraction > 0:
        carry(tok, out / HOLDOUT_DIR)
    return tok


def split_packers(cfg: PrepareConfig, sample_len: int, dtype, key,
                  sample_tokens: Optional[int] = None) -> Tuple[Packer, Packer]:
    """The packers of the training split and of the held-out one (which gets nothing without
    holdout_fraction), each shuffled by a seed of its own."""
    out = Path(cfg.output)
    prefix = shard_prefix(cfg.name, cfg.part, cfg.parts)
    held_dir = out / HOLDOUT_DIR if cfg.holdout_fraction > 0 else out
    held_dir.mkdir(exist_ok=True)
    return (Packer(out, prefix, sample_len, cfg.samples_per_shard, dtype,
                   [cfg.seed, cfg.part, 0], key, sample_tokens),
            Packer(held_dir, f"{prefix}-holdout", sample_len, cfg.samples_per_shard, dtype,
                   [cfg.seed, cfg.part, 1], key, sample_tokens))


def write_dataset(cfg: PrepareConfig, manifest: dict, held_manifest: dict, held_counts: dict,
                  skipped: bytes) -> Path:
    """A whole dataset's manifests: the held-out split's (with ``held_counts`` in the summary the
    dataset's manifest gives of it), the list of skipped inputs, then the dataset's manifest,
    last: it marks the whole dataset complete."""
    out = Path(cfg.output)
    if cfg.holdout_fraction > 0:
        split = {"fraction": cfg.holdout_fraction, "seed": cfg.holdout_seed}
        write_manifest(out / HOLDOUT_DIR, {**held_manifest, "split": {"holdout_of": cfg.name,
                                                                      **split}})
        manifest["holdout"] = {"manifest": f"{HOLDOUT_DIR}/{MANIFEST}", **split, **held_counts,
                               "samples": held_manifest["samples"]}
    # the list of skips before the manifest: a complete dataset always has the one that fits
    atomic_write(out / SKIPPED_FILE, skipped)
    return write_manifest(out, manifest)


def skipped_lines(skipped: List[str]) -> bytes:
    return "".join(f"{line}\n" for line in skipped).encode()


def warn_skipped(skipped: List[str], counts: Counter, kinds: Tuple[str, ...], listed: Path
                 ) -> None:
    """One line on the first screen for all the skipped inputs; each is named in ``listed``."""
    if skipped:
        what = ", ".join(f"{counts[k]} {k.replace('_', ' ')}" for k in kinds if counts[k])
        warn("skipped_inputs", f"prepare skipped {len(skipped)} inputs ({what}), each named in "
             f"{listed}")


def prepare_tokenizer(cfg: PrepareConfig, log=print):
    """``--tokenizer-only``: OUTPUT's tokenizer (tokenizer.model trained on the inputs, or the
    given one carried), before the parts of a dataset prepared in parts run."""
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    tok = tokenizer_for(input_files(cfg), cfg.tokenizer, out, cfg.jsonl_text_field)
    log(f"llada prepare: tokenizer {tok.path} ({tok.vocab_size} ids)")
    return tok


def prepare(cfg: PrepareConfig, log=print) -> dict:
    """Prepare (or find up to date) the dataset cfg describes, or with ``cfg.parts > 1`` part
    ``cfg.part`` of it (then merged by ``merge``); returns the manifest (the part's). With
    ``cfg.sft``, SFT shards (data_pipeline/prepare_sft.py)."""
    if cfg.sft:
        from data_pipeline.prepare_sft import prepare_sft  # it builds on this module
        return prepare_sft(cfg, log)
    in_parts = cfg.parts > 1
    if in_parts:
        cfg = with_part_tokenizer(cfg)
    files = input_files(cfg)
    out = Path(cfg.output)
    t0 = time.perf_counter()
    fp = fingerprint(cfg, files, cfg.part if in_parts else None)
    holdout = cfg.holdout_fraction > 0
    where = _where(cfg)
    done = reuse_or_clear(cfg, fp, log)
    if done is not None:
        return done
    tok = dataset_tokenizer(cfg, files)
    pieces = split_inputs(files, cfg.parts)[cfg.part] if in_parts else [Piece(f) for f in files]

    workers = cfg.workers or len(os.sched_getaffinity(0))  # the CPUs this process may use
    dtype = sample_dtype(cfg, tok.vocab_size)
    counts: Counter = Counter()
    skipped: List[str] = []  # one line per skipped input, written to SKIPPED_FILE
    key = functools.partial(sample_key, part=cfg.part, parts=cfg.parts)
    train, held = split_packers(cfg, cfg.seq_len, dtype, key)
    try:
        with _pool(workers, tok) as pool:
            tasks = ((docs, tok.eos_id, dtype.str, cfg.holdout_fraction, cfg.holdout_seed)
                     for docs in _chunks(pieces, cfg.jsonl_text_field, counts, skipped))
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
    if not train.shards and not in_parts:  # (a part may be small; the merge checks the whole)
        raise DataConfigError(f"prepare.inputs: {counts['tokens']} tokens in {len(files)} files, "
                              f"fewer than one sequence of prepare.seq_len={cfg.seq_len}")
    if holdout and not held.shards and not in_parts:
        raise DataConfigError(
            f"prepare.holdout_fraction: {cfg.holdout_fraction} held out "
            f"{counts['held_documents']} documents ({counts['held_tokens']} tokens), fewer than "
            f"one sequence of prepare.seq_len={cfg.seq_len}; hold out more")
    sources = {k: counts[k] for k in SOURCE_COUNTS}
    sources["documents"] -= counts["held_documents"]
    manifest = manifest_of(cfg, cfg.name, train.shards, int(train.buf.size), tok, fp,
                           sources)
    held_manifest = manifest_of(cfg, f"{cfg.name}-holdout", held.shards, int(held.buf.size), tok,
                                fp, {"documents": counts["held_documents"]})
    if in_parts:  # the part's manifest, the merge's input: it marks the part complete
        split = {"fraction": cfg.holdout_fraction, "seed": cfg.holdout_seed}
        listed = skipped_list(out, cfg.part, cfg.parts)
        atomic_write(listed, skipped_lines(skipped))
        manifest.update(format=PART_FORMAT, part={"index": cfg.part, "of": cfg.parts},
                        holdout={**held_manifest, **split} if holdout else None)
        atomic_write(where, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
    else:
        listed = out / SKIPPED_FILE
        write_dataset(cfg, manifest, held_manifest, {"documents": counts["held_documents"]},
                      skipped_lines(skipped))
    warn_skipped(skipped, counts, ("empty_files", "bad_lines", "unreadable_files"), listed)
    log(f"llada prepare: {train.samples} sequences of {cfg.seq_len} tokens in "
        f"{len(train.shards)} shards from {sources['documents']} documents in "
        f"{sources['files']} files ({len(skipped)} skipped inputs), "
        f"{time.perf_counter() - t0:.1f}s; {where}")
    if holdout:
        log(f"llada prepare: held out {counts['held_documents']} documents "
            f"({cfg.holdout_fraction:g} by hash): {held.samples} sequences in "
            f"{len(held.shards)} shards"
            + ("" if in_parts else f"; {out / HOLDOUT_DIR / MANIFEST}"))
    return manifest
