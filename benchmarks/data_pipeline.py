"""Data pipeline throughput against bare references measured in the same run.

(a) ``llada prepare`` (read, tokenise in N worker processes, cut, write tar shards) in tokens/s
    per worker, against bare SentencePiece ``encode`` of the same documents split over N
    processes running at once (per process): both sides share the machine's cores alike (on the
    2-core development machine, two encoders at once get ~0.45x the speed of one each);
(b) the streaming loader (whole-shard read and sha256 check against the manifest, sample
    checks, the uniform draw over 4 open shards, masking collator: noisy ids, targets, mask,
    p_mask of 4096-token micro-batches) in tokens/s per worker, against a bare
    ``webdataset.WebDataset(shards).decode()`` read of the same shards. The loader runs in the
    benchmark's own process (num_workers=0) with one torch thread, as torch sets in each
    DataLoader worker: one worker's work on one core. Also the loader with
    the sha256 check left out (same run): what verification costs.

Targets (issue 3): prepare >= 0.8x bare SentencePiece per core; loader >= 0.8x the bare read and
>= 2,000,000 tokens/s per worker.

    python benchmarks/data_pipeline.py [--corpus-mb 24] [--workers 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def corpus(max_bytes: int):
    from data_pipeline.corpus import read_documents, stdlib_files
    files, docs, size = [], [], 0
    for path in stdlib_files():
        for doc in read_documents(path, counts=Counter(), report=None):
            docs.append(doc)
            size += len(doc.encode())
        files.append(path)
        if size >= max_bytes:
            break
    return files, docs


_DOCS: list = []  # the corpus, inherited by the forked bare encoders


def _bare_encode(model: str, i: int, n: int):
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=model)
    start = time.perf_counter()
    count = sum(len(x) + 1 for x in sp.encode(_DOCS[i::n]))
    return count, time.perf_counter() - start


def bare_sentencepiece(model: str, n: int) -> float:
    """Tokens/s per process of n processes encoding a share of the corpus each, all at once."""
    import multiprocessing as mp
    with mp.get_context("fork").Pool(n) as pool:
        results = pool.starmap(_bare_encode, [(model, i, n) for i in range(n)])
    return sum(c for c, _ in results) / max(e for _, e in results) / n


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--corpus-mb", type=float, default=24)
    parser.add_argument("--workers", type=int, default=2, help="prepare's tokeniser processes")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--micro-batch", type=int, default=4)
    args = parser.parse_args()

    import numpy as np
    import webdataset as wds

    from benchmarks.results import machine, record, today
    from data_pipeline.collate import MaskCollator
    from data_pipeline.loader import PretrainLoader
    from data_pipeline.prepare import prepare
    from data_pipeline.shards import load_manifest
    from data_pipeline.tokenizer import train_tokenizer
    from data_pipeline.config import (DataConfig, DatasetConfig, ObjectiveConfig, PrepareConfig,
                                      TokenizerConfig)

    work = Path(tempfile.mkdtemp(prefix="bench-data-"))
    files, docs = corpus(int(args.corpus_mb * 2**20))
    tok = train_tokenizer(files, TokenizerConfig(vocab_size=32000, train_bytes=4_000_000),
                          work / "spm.model")

    # (a) bare SentencePiece in N processes vs prepare with N tokeniser workers
    _DOCS[:] = docs
    bare_tps = bare_sentencepiece(str(tok.path), args.workers)
    list_file = work / "inputs"
    list_file.mkdir()
    for i, path in enumerate(files):  # the same files, by a glob of their own
        (list_file / f"{i:05d}.txt").symlink_to(path)
    cfg = PrepareConfig(inputs=[str(list_file / "*.txt")], output=str(work / "shards"),
                        name="bench", seq_len=args.seq_len, samples_per_shard=64,
                        workers=args.workers, tokenizer=TokenizerConfig(model=str(tok.path)))
    start = time.perf_counter()
    manifest = prepare(cfg, log=lambda _: None)
    prep_s = time.perf_counter() - start
    prep_tokens = manifest["tokens"] + manifest["sources"]["dropped_tail_tokens"]
    prep_per_worker = prep_tokens / prep_s / args.workers

    # (b) bare webdataset read+decode vs our loader (masked micro-batches), one process each;
    # one torch thread, as in a DataLoader worker (torch sets that there)
    import torch
    torch.set_num_threads(1)
    ds = load_manifest(work / "shards" / "manifest.json")
    urls = [ds.url(i) for i in range(len(ds.shards))]
    start = time.perf_counter()
    n = 0
    for sample in wds.WebDataset(urls, shardshuffle=False).decode():
        n += int(np.asarray(sample["tokens.npy"]).size)
    wds_tps = n / (time.perf_counter() - start)

    dcfg = DataConfig(datasets=[DatasetConfig(manifest=str(ds.manifest))], seq_len=args.seq_len,
                      open_shards=4, num_workers=0)
    batches = ds.samples // args.micro_batch

    def loader_tokens_per_s() -> float:
        loader = PretrainLoader(dcfg, [ds], [1.0],
                                MaskCollator(ObjectiveConfig(), ds.special_ids["mask"],
                                             args.seq_len),
                                micro_batch_size=args.micro_batch, accumulation=1, dp_rank=0,
                                dp_size=1)
        start = time.perf_counter()
        count = sum(next(loader).targets.numel() for _ in range(batches))
        return count / (time.perf_counter() - start)

    loader_tps = loader_tokens_per_s()
    m = batches * args.micro_batch * args.seq_len
    import data_pipeline.loader as loader_module
    verified = loader_module.read_shard
    loader_module.read_shard = lambda s, i: open(s.url(i), "rb").read()  # no size/hash check
    unchecked_tps = loader_tokens_per_s()
    loader_module.read_shard = verified

    command = "python benchmarks/data_pipeline.py " + " ".join(sys.argv[1:])
    rows = [
        [today(), machine(), f"prepare, {args.workers} workers, {prep_tokens / 1e6:.1f}M tokens",
         f"{prep_per_worker:,.0f} per worker",
         f"{bare_tps:,.0f} per process (bare SentencePiece, {args.workers} at once)",
         f"{prep_per_worker / bare_tps:.2f}", f"`{command.strip()}`"],
        [today(), machine(), f"loader, masked {args.micro_batch}x{args.seq_len} batches, "
         f"{m / 1e6:.1f}M tokens", f"{loader_tps:,.0f} per worker",
         f"{wds_tps:,.0f} (bare webdataset read+decode)", f"{loader_tps / wds_tps:.2f}",
         f"`{command.strip()}`"],
        [today(), machine(), "loader's sha256 check: with it vs without it",
         f"{loader_tps:,.0f} per worker", f"{unchecked_tps:,.0f} per worker (no check)",
         f"{loader_tps / unchecked_tps:.2f}", f"`{command.strip()}`"],
    ]
    record("Data pipeline: prepare and loader vs bare SentencePiece / WebDataset",
           "ratio = ours / reference, both in tokens/s, measured in the same run. Targets: "
           "prepare >= 0.8 per core; loader >= 0.8 and >= 2,000,000 tokens/s per worker.",
           ["date", "machine", "what", "ours tokens/s", "reference tokens/s", "ratio", "command"],
           rows)


if __name__ == "__main__":
    main()
