"""The loader at the 8B recipe's data scale, measured without the cluster: a dataset of 2.3T
tokens in 4096 x 4096-token shards (about 137,000 shards: a manifest of that many, each shard a
symbolic link to one tiny real shard, so that planning and manifest sizes are real and reading is
cheap) read by 1,024 data-parallel ranks x 2 DataLoader workers.

Measured, for a few readers spread over the ranks (each in this process, one after the other):
the time a reader takes to plan its shards and open its stream (its units of epoch 0, its open
shards read and checked, its first step's samples), the size of its state (JSON), the memory it
allocates for that (tracemalloc's peak: numpy arrays included), and the time a rank takes to
resume under another data-parallel size (512: half the nodes lost) from the state files the
saved ranks wrote: read its saved ranks' files, rebuild its streams, make its first step. Also
what each process pays once, whatever its readers: loading the manifest (time and resident
memory). The same for a dataset of 1,000 shards in the same run: the ratio shows what the
dataset's size costs. Targets (issue 34): under 5 s and 1 MB of state per reader.

A global batch of 2048 sequences (the 8B recipe's 1280 does not divide over 1,024 ranks), so 2048
canonical streams: one per reader.

    python benchmarks/data_scale.py [--shards 137090] [--dp 1024] [--workers 2] [--resume-dp 512]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SEQ_LEN, VOCAB, MASK = 4096, 126464, 126336  # LLaDA's tokenizer
TOKENS = 2_300_000_000_000  # the 8B recipe's 2.3T
SAMPLES_PER_SHARD = 4096


def synthetic(out: Path, shards: int) -> Path:
    """A manifest of ``shards`` shards, each a symbolic link to one real 4-sample shard (a
    file system allows only so many hard links to one file)."""
    from data_pipeline.shards import FORMAT, VERSION, ShardWriter, token_dtype, write_manifest

    out.mkdir(parents=True)
    rng = np.random.default_rng(0)
    writer = ShardWriter(out / "seed.tar")
    for k in range(4):
        writer.add(f"{k:010d}", rng.integers(0, MASK, SEQ_LEN).astype(token_dtype(VOCAB)))
    entry = writer.close()
    entries = []
    for i in range(shards):
        name = f"web-{i:06d}.tar"
        os.symlink("seed.tar", out / name)
        entries.append({**entry, "file": name, "tokens": entry["samples"] * SEQ_LEN})
    write_manifest(out, {
        "format": FORMAT, "version": VERSION, "name": "web", "kind": "pretrain",
        "seq_len": SEQ_LEN, "dtype": token_dtype(VOCAB).name,
        "samples": 4 * shards, "tokens": 4 * shards * SEQ_LEN, "shards": entries,
        "tokenizer": {"file": "tokenizer.model", "sha256": "0" * 64, "vocab_size": VOCAB,
                      "special_ids": {"mask": MASK, "eos": 126081, "bos": 126080}}})
    return out / "manifest.json"


def rss_mib() -> float:
    import psutil
    return psutil.Process().memory_info().rss / 2**20


def reader_streams(k: int, dp: int, workers: int, streams: int) -> list:
    """The streams reader k holds: worker k % workers of rank k // workers (the loader's deal)."""
    rank, worker = divmod(k, workers)
    share = streams // dp
    return list(range(rank * share, (rank + 1) * share))[worker::min(workers, share)]


def reader(ds, mine: list, streams: int, per_stream: int, open_shards: int):
    """One reader: plan, open, first step of its streams. (seconds, state bytes, peak allocated
    bytes)."""
    from data_pipeline.streams import CanonicalStream

    tracemalloc.start()
    start = time.perf_counter()
    held = [CanonicalStream([ds], [1.0], c, streams, seed=0, open_shards=open_shards)
            for c in mine]
    rows, sources = [], []
    for s in held:
        s.take(per_stream, rows, sources)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return seconds, len(json.dumps([s.state() for s in held])), peak


def loader(ds, dp_rank: int, dp: int, batch: int, open_shards: int):
    from data_pipeline.collate import MaskCollator
    from data_pipeline.config import DataConfig, DatasetConfig, ObjectiveConfig
    from data_pipeline.loader import PretrainLoader

    cfg = DataConfig(datasets=[DatasetConfig(manifest=str(ds.manifest))], seq_len=SEQ_LEN,
                     open_shards=open_shards, num_workers=0)
    return PretrainLoader(cfg, [ds], [1.0], MaskCollator(ObjectiveConfig(), MASK, SEQ_LEN),
                          micro_batch_size=batch // dp, accumulation=1, dp_rank=dp_rank,
                          dp_size=dp)


def resume(ds, out: Path, rank: int, dp: int, saved_dp: int, batch: int, open_shards: int):
    """Rank ``rank`` of ``dp`` resumes from the state files of a run of ``saved_dp`` ranks after
    one step: (seconds, bytes of state read). Only the saved ranks it reads are run here."""
    from data_pipeline.loader import saved_ranks

    files = []
    for r in saved_ranks(rank, dp, saved_dp):  # the saved run: one step, then its state file
        saved = loader(ds, r, saved_dp, batch, open_shards)
        next(saved)
        path = out / f"dp_rank_{r:05d}.json"
        path.write_text(json.dumps(saved.state_dict()))
        files.append(path)
    start = time.perf_counter()
    states = [json.loads(p.read_text()) for p in files]
    now = loader(ds, rank, dp, batch, open_shards)
    now.load_state_dicts(states)
    batch_ = next(now)
    seconds = time.perf_counter() - start
    assert int(batch_.step) == 1
    return seconds, sum(p.stat().st_size for p in files)


def measure(manifest: Path, args, work: Path) -> dict:
    from data_pipeline.shards import load_manifest

    before, start = rss_mib(), time.perf_counter()
    ds = load_manifest(manifest)
    load_s, load_mib = time.perf_counter() - start, rss_mib() - before
    streams = args.batch  # one per sample of the global batch
    per_stream = args.batch // streams
    readers = args.dp * args.workers
    sample = sorted({0, readers // 3, 2 * readers // 3, readers - 1})
    per_reader = [reader(ds, reader_streams(k, args.dp, args.workers, streams), streams,
                         per_stream, args.open_shards) for k in sample]
    ranks = sorted({0, args.resume_dp - 1})
    resumed = [resume(ds, work, r, args.resume_dp, args.dp, args.batch, args.open_shards)
               for r in ranks]
    return {"shards": len(ds.shards), "load_s": load_s, "load_mib": load_mib,
            "open_s": [x[0] for x in per_reader], "state": [x[1] for x in per_reader],
            "peak": [x[2] for x in per_reader], "resume_s": [x[0] for x in resumed],
            "resume_bytes": [x[1] for x in resumed], "readers": len(per_reader)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", type=int, default=round(TOKENS / (SAMPLES_PER_SHARD * SEQ_LEN)))
    parser.add_argument("--reference-shards", type=int, default=1000)
    parser.add_argument("--dp", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--resume-dp", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--open-shards", type=int, default=4)
    args = parser.parse_args()

    from benchmarks.results import machine, record, today

    work = Path(tempfile.mkdtemp(prefix="bench-data-scale-"))
    print(f"writing {args.shards} shard links under {work} ...", flush=True)
    big = measure(synthetic(work / "big", args.shards), args, work / "big")
    ref = measure(synthetic(work / "ref", args.reference_shards), args, work / "ref")
    command = (f"`python benchmarks/data_scale.py --shards {args.shards} --dp {args.dp} "
               f"--workers {args.workers} --resume-dp {args.resume_dp} --batch {args.batch}`")
    layout = f"{args.dp} ranks x {args.workers} workers, {args.batch} streams"

    def row(what, value, unit, ratio, target):
        return [today(), machine(), f"{big['shards']:,} shards", layout, what,
                f"{value:.3g} {unit}", "-" if ratio is None else f"{ratio:.2f}", target, command]

    def worst(key):
        return max(big[key]), max(ref[key])

    rows = [
        row("manifest load, per process", big["load_s"], "s", big["load_s"] / ref["load_s"], "-"),
        # the small manifest's is below what the resident set size resolves
        row("manifest resident memory, per process", big["load_mib"], "MiB", None, "-"),
        row(f"plan + open + first step, per reader (max of {big['readers']})",
            worst("open_s")[0], "s", worst("open_s")[0] / worst("open_s")[1], "< 5 s"),
        row("state, per reader (JSON)", max(big["state"]), "bytes",
            max(big["state"]) / max(ref["state"]), "< 1 MB"),
        row("allocated by a reader (tracemalloc peak)", worst("peak")[0] / 2**20, "MiB",
            worst("peak")[0] / worst("peak")[1], "-"),
        row(f"resume as {args.resume_dp} ranks, per rank (max)", max(big["resume_s"]), "s",
            max(big["resume_s"]) / max(ref["resume_s"]), "-"),
        row(f"state read to resume as {args.resume_dp} ranks, per rank",
            max(big["resume_bytes"]), "bytes",
            max(big["resume_bytes"]) / max(ref["resume_bytes"]), "-"),
    ]
    record("Data at scale: planning, state and resume per reader",
           "A manifest of the 8B recipe's 2.3T tokens in 4096 x 4096-token shards (each a "
           "symbolic link to one tiny real shard) read by 1,024 data-parallel ranks x 2 workers "
           "(benchmarks/data_scale.py); readers measured one after another in one process. "
           f"Ratio: against the same measure on a dataset of {args.reference_shards:,} shards in "
           "the same run.",
           ["date", "machine", "dataset", "layout", "what", "value",
            f"vs {args.reference_shards:,} shards", "target", "command"], rows)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"process peak RSS {peak_kib / 2**10:.0f} MiB")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
