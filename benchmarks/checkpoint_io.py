"""Checkpoint save and load time against a plain ``torch.save`` / ``torch.load`` of the same
tensors, in the same run.

(a) ours: ``Trainer.save_checkpoint`` (DeepSpeed's sharded files, data and RNG state, meta.json,
    a sync to disk, the rename and the ``latest`` pointer) and
    ``framework.checkpoint.resume.load_checkpoint`` (DeepSpeed's load into the live engine, data
    stream and RNG state);
(b) reference: the model weights and the optimizer's fp32 master weights and Adam moments as one
    dict, ``torch.save`` then ``os.sync()`` (durable, as ours is), and ``torch.load``.

(c) verification: our save with its content checksums (each file hashed as it is written) against
    the same save with hashing switched off, and our load after the resume's check of the files
    it reads against their checksums against the load alone, from a cold page cache. Target: at
    most 1.1x each.

The model is the 1B recipe's, after one optimizer step so that the Adam state exists. A 1B model
with its fp32 optimizer state (16 bytes per parameter) does not fit twice in a small CPU
machine's memory: ``model.num_layers=...`` / ``model.vocab_size=...`` scale it down there, and the
table records the parameter count and bytes written.

(d) asynchronous save: the training's stall per save with ``checkpoint.async_save`` against the
    synchronous save (target: at most a third); (e) a restart's load, the resume's check
    included, from a cold page cache against ``torch.load`` of the same tensors (target: 1.5x).
    ``--quick`` runs these two only.

    [BENCH_DIR=/dev/shm] python benchmarks/checkpoint_io.py [--repeats 2] [--quick] [key=value ...]

BENCH_DIR: where the checkpoints go (default: the system's temp directory). On a RAM disk the
save and load take no disk time, so the verification rows show the checksums' cost at its
largest share.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def reference_tensors(trainer) -> dict:
    """What a checkpoint must hold, as plain tensors: weights, fp32 masters, Adam moments."""
    opt = trainer.engine.optimizer
    state = {"module": trainer.engine.module.state_dict()}
    masters = getattr(opt, "single_partition_of_fp32_groups", None)  # ZeRO-1/2
    if masters is not None:
        state["fp32"] = list(masters)
    state["adam"] = [dict(s) for s in opt.optimizer.state.values()] \
        if hasattr(opt, "optimizer") else [dict(s) for s in opt.state.values()]
    return state


@contextlib.contextmanager
def checksums_off():
    """Our save without any hashing: DeepSpeed's plain torch.save engine, no checksum of the
    small files (for the verification rows' reference only)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from framework.checkpoint import checkpointer

    class Plain(TorchCheckpointEngine):
        def take(self):
            return {}

    saved = checkpointer.hash_bytes, checkpointer.hash_file, checkpointer.hashing_engine
    checkpointer.hash_bytes = checkpointer.hash_file = lambda _: "-"
    checkpointer.hashing_engine = lambda engine: setattr(
        engine, "checkpoint_engine", Plain(engine._config)) or engine.checkpoint_engine
    try:
        yield
    finally:
        checkpointer.hash_bytes, checkpointer.hash_file, checkpointer.hashing_engine = saved


@contextlib.contextmanager
def check_off():
    """A resume without the check of the checkpoint's content (the reference only)."""
    from framework.checkpoint import resume

    saved = resume._damaged_here
    resume._damaged_here = lambda *_: []
    try:
        yield
    finally:
        resume._damaged_here = saved


def evict(tag_dir: Path) -> None:
    """The checkpoint's files out of the page cache (written back first), as after a restart."""
    os.sync()
    for path in tag_dir.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def with_median(rows: list, model: str, end: int, command: str) -> None:
    """A last row of the medians of columns 4..end-1 (after date, machine, model, size): one
    repeat is noise on a shared machine."""
    if len(rows) > 1:
        rows.append([*rows[0][:2], f"{model}, **median of {len(rows)}**", rows[0][3],
                     *(f"{statistics.median(float(r[i]) for r in rows):.2f}"
                       for i in range(4, end)), command])


def async_rows(trainer, cfg, repeats, model, command, machine, today, record) -> None:
    """(d) The training's stall per save with checkpoint.async_save against the synchronous
    save of the same state, alternating; the async save's whole time (its background write
    included) beside it."""
    from dataclasses import replace

    from framework.checkpoint.checkpointer import Checkpointer

    manager = trainer.checkpoints  # its Checkpointer swapped for an async one, and back
    sync = manager.checkpointer
    background = Checkpointer(replace(cfg.checkpoint, async_save=True), sync.root,
                              trainer.world, sync.tokenizer, sync.log)
    rows = []
    for i in range(repeats):
        times = {}
        for mode in (["sync", "async"] if i % 2 == 0 else ["async", "sync"]):
            manager.checkpointer = background if mode == "async" else sync
            start = time.perf_counter()
            path = trainer.save_checkpoint()
            stall = time.perf_counter() - start
            trainer.checkpoints.wait()
            times[mode] = (stall, time.perf_counter() - start)
            trainer.step += 1
        written = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        rows.append([today, machine, model, f"{written / 2**30:.2f}",
                     f"{times['sync'][0]:.2f}", f"{times['async'][0]:.2f}",
                     f"{times['async'][1]:.2f}", f"{times['async'][0] / times['sync'][0]:.2f}",
                     command])
    manager.checkpointer = sync
    with_median(rows, model, 8, command)
    record("Checkpoint save: the training's stall with checkpoint.async_save vs the sync save",
           "stall = how long save_checkpoint keeps the training waiting: with async_save the "
           "copy of every rank's state into host buffers (pinned on CUDA, reused); the writing, "
           "hashing, sync, meta.json, rename and `latest` then run in a background thread "
           "(async total: until that is done, measured with the training idle). Synchronous "
           "and asynchronous saves alternate. ratio = async stall / sync save; target <= 0.33. "
           "One process, ZeRO-1.",
           ["date", "machine", "model", "GiB", "sync save s", "async stall s", "async total s",
            "stall ratio", "command"], rows)


def cold_load_rows(trainer, work, repeats, model, command, machine, today, record,
                   verified_load) -> None:
    """(e) A restart's load from a cold page cache, the resume's check of the files included,
    against torch.load of the same tensors from a cold page cache, alternating."""
    trainer.checkpoints.wait()
    path = trainer.save_checkpoint()
    trainer.checkpoints.wait()
    trainer.step += 1
    ref_file = work / "reference.pt"
    torch.save(reference_tensors(trainer), ref_file)
    rows = []
    for i in range(repeats):
        times = {}
        for mode in (["ours", "ref"] if i % 2 == 0 else ["ref", "ours"]):
            evict(path)
            evict(work)
            if mode == "ours":
                times[mode], _ = timed(lambda: verified_load(path))
            else:
                times[mode], loaded = timed(lambda: torch.load(ref_file, map_location="cpu",
                                                               weights_only=False))
                del loaded
        rows.append([today, machine, model, f"{ref_file.stat().st_size / 2**30:.2f}",
                     f"{times['ours']:.2f}", f"{times['ref']:.2f}",
                     f"{times['ours'] / times['ref']:.2f}", command])
    ref_file.unlink()
    with_median(rows, model, 7, command)
    record("Checkpoint load from a cold page cache: ours, checked, vs torch.load",
           "ours: the resume's check of the files this rank reads against their checksums "
           "(one read of each), then DeepSpeed's load into the live engine through our "
           "checkpoint engine (memory-mapped torch.load: from the page cache the check filled), "
           "the data stream and RNG state. Reference: torch.load of the same weights, fp32 "
           "masters and Adam moments as one file. Each from a cold page cache (as a restarted "
           "job reads), alternating. ratio = ours / reference; target <= 1.5. One process, "
           "ZeRO-1.",
           ["date", "machine", "model", "GiB", "ours s", "torch.load s", "ratio", "command"],
           rows)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "llada-1b.yaml"))
    parser.add_argument("--data", default=str(REPO / "runs" / "data" / "stdlib-128" /
                                              "manifest.json"),
                        help="a prepared manifest (the debug recipe's, by default)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true",
                        help="only (d) and (e): the asynchronous save's stall, the cold load")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from benchmarks.results import machine, record, today
    from data_pipeline.shards import load_manifest
    from framework.checkpoint.checkpointer import read_meta
    from framework.checkpoint.files import files_read
    from framework.checkpoint.integrity import damaged
    from framework.checkpoint.resume import load_checkpoint
    from framework.config import load_config
    from framework.training.factory import build_trainer

    seq_len = load_manifest(args.data).seq_len
    work = Path(tempfile.mkdtemp(prefix="bench-ckpt-", dir=os.environ.get("BENCH_DIR")))
    on_gpu = torch.cuda.is_available()
    cfg = load_config(args.recipe, [
        f"run.dir={work / 'run'}", f"data.datasets=[{{manifest: {args.data}}}]",
        f"data.seq_len={seq_len}", "data.num_workers=0",
        "train.micro_batch_size=1", "train.global_batch_size=1", "train.steps=1000",
        f"run.device={'cuda' if on_gpu else 'cpu'}", f"train.precision={'bf16' if on_gpu else 'fp32'}",
        *args.overrides])
    trainer = build_trainer(cfg)
    trainer.train_step()  # creates the Adam state
    trainer.data.close()
    params = trainer.metrics.facts["parameters"]

    rows, checks = [], []
    model = f"{params / 1e6:.0f}M params ({' '.join(args.overrides) or 'recipe as is'})"
    where = f"BENCH_DIR={os.environ['BENCH_DIR']} " if os.environ.get("BENCH_DIR") else ""
    command = f"`{where}python benchmarks/checkpoint_io.py {' '.join(sys.argv[1:])}`"

    def load(path):
        load_checkpoint(path, trainer.engine, trainer.data, trainer.world,
                        read_meta(path)["layout"], log=lambda _: None)
        trainer.data.close()

    def verified_load(path):
        # what a resume checks before it loads: the files this rank reads, then the load
        meta = read_meta(path)
        rels = files_read(meta["layout"], rank=0, dp_rank=0, mp_rank=0, world_size=1, dp=1)
        assert damaged(path, meta, rels) == [], path
        load(path)

    async_rows(trainer, cfg, args.repeats, model, command, machine(), today(), record)
    cold_load_rows(trainer, work, args.repeats, model, command, machine(), today(), record,
                   verified_load)
    if args.quick:
        shutil.rmtree(work, ignore_errors=True)
        return

    for _ in range(args.repeats):
        save_s, path = timed(trainer.save_checkpoint)
        written = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        load_s, _ = timed(lambda: load(path))

        ref_file = work / "reference.pt"
        tensors = reference_tensors(trainer)
        # bound as a default: the del below frees them once the lambda is gone
        ref_save_s, _ = timed(lambda t=tensors: (torch.save(t, ref_file), os.sync()))
        del tensors
        ref_load_s, loaded = timed(lambda: torch.load(ref_file, map_location="cpu",
                                                      weights_only=False))
        del loaded
        ref_bytes = ref_file.stat().st_size
        ref_file.unlink()
        trainer.step += 1  # the next save is a new checkpoint, as in a run
        rows.append([today(), machine(), model,
                     f"{written / 2**30:.2f}", f"{ref_bytes / 2**30:.2f}",
                     f"{save_s:.2f}", f"{ref_save_s:.2f}", f"{save_s / ref_save_s:.2f}",
                     f"{load_s:.2f}", f"{ref_load_s:.2f}", f"{load_s / ref_load_s:.2f}",
                     command])

        # verification: the same save and load with checksums and without, in alternating
        # order, each save after the last one's retention, each load from a cold page cache
        # (as a restarted job reads), so neither side inherits the other's disk state
        order = [False, True] if len(checks) % 2 == 0 else [True, False]
        save_s, saved_at = {}, {}
        for hashed in order:
            trainer.checkpoints.wait()
            with contextlib.nullcontext() if hashed else checksums_off():
                save_s[hashed], saved_at[hashed] = timed(trainer.save_checkpoint)
            trainer.step += 1
        trainer.checkpoints.wait()
        load_s = {}
        for hashed in order:
            evict(saved_at[hashed])
            load_s[hashed], _ = timed(lambda h=hashed: (verified_load if h else load)(
                saved_at[h]))
        # written with hashing off, its checksums are dashes: no resume may pick it
        shutil.rmtree(saved_at[False], ignore_errors=True)
        checks.append([today(), machine(), model, f"{written / 2**30:.2f}",
                       f"{save_s[True]:.2f}", f"{save_s[False]:.2f}",
                       f"{save_s[True] / save_s[False]:.2f}", f"{load_s[True]:.2f}",
                       f"{load_s[False]:.2f}", f"{load_s[True] / load_s[False]:.2f}"])

    # a restart as a job makes it: build the trainer, which checks the files it will read in
    # the background while it builds the engine, then loads; against the same without the check
    newest = saved_at[True]
    trainer.data.close()
    trainer.metrics.close("stopped")
    trainer.engine.destroy()  # DeepSpeed's hooks keep an engine alive until it is destroyed
    trainer = None  # its memory back before the resumes build theirs
    gc.collect()
    for i, row in enumerate(checks):
        resume_s = {}
        for check in ([True, False] if i % 2 == 0 else [False, True]):
            evict(newest)
            with contextlib.nullcontext() if check else check_off():
                resume_s[check], resumed = timed(lambda: build_trainer(cfg))
            assert resumed.resume.path == newest
            resumed.data.close()
            resumed.metrics.close("stopped")
            resumed.engine.destroy()
            del resumed
            gc.collect()
        row += [f"{resume_s[True]:.2f}", f"{resume_s[False]:.2f}",
                f"{resume_s[True] / resume_s[False]:.2f}", command]
    with_median(checks, model, 13, command)
    record("Checkpoint save and load: ours vs torch.save / torch.load",
           "Ours: DeepSpeed's shards + data/RNG state + meta.json, synced, renamed, `latest` "
           "moved; loaded into the live engine. Reference: the same weights, fp32 masters and "
           "Adam moments as one dict, torch.save + os.sync, torch.load. ratio = ours / "
           "reference time (lower is better). "
           "One process, ZeRO-1, one optimizer step taken.",
           ["date", "machine", "model", "ours GiB", "reference GiB", "save s", "ref save s",
            "save ratio", "load s", "ref load s", "load ratio", "command"], rows)
    record("Checkpoint verification: content checksums on vs off",
           "Save: ours with every file hashed (XXH3-128) as its rank writes it, against the same "
           "save with hashing off, in alternating order. Load: the files the rank reads checked "
           "against their checksums (as a resume does before it loads), then the load, against "
           "the load alone, each from a cold page cache (as a restarted job reads), back to back; "
           "and a whole resume (build_trainer: the check runs in the background while the "
           "engine is built, then the load) against the same resume without the check. ratio = with / "
           "without (lower is better); target <= 1.1 (save, resume). One process, ZeRO-1.",
           ["date", "machine", "model", "GiB", "save s", "save s, no checksums", "save ratio",
            "check then load s", "load s", "back to back ratio", "resume s",
            "resume s, no check", "resume ratio", "command"], checks)


if __name__ == "__main__":
    main()
