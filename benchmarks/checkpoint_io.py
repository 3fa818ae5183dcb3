"""Checkpoint save and load time against a plain ``torch.save`` / ``torch.load`` of the same
tensors, in the same run.

(a) ours: ``Trainer.save_checkpoint`` (DeepSpeed's sharded files, data and RNG state, meta.json,
    a sync to disk, the rename and the ``latest`` pointer) and
    ``framework.checkpoint.resume.load_checkpoint`` (DeepSpeed's load into the live engine, data
    stream and RNG state);
(b) reference: the model weights and the optimizer's fp32 master weights and Adam moments as one
    dict, ``torch.save`` then ``os.sync()`` (durable, as ours is), and ``torch.load``.

The model is the 1B recipe's, after one optimizer step so that the Adam state exists. A 1B model
with its fp32 optimizer state (16 bytes per parameter) does not fit twice in a small CPU
machine's memory: ``model.num_layers=...`` / ``model.vocab_size=...`` scale it down there, and the
table records the parameter count and bytes written.

    python benchmarks/checkpoint_io.py [--repeats 2] [key=value ...]
"""

from __future__ import annotations

import argparse
import os
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
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from benchmarks.results import machine, record, today
    from data_pipeline.shards import load_manifest
    from framework.checkpoint.checkpointer import read_meta
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
    params = trainer.facts["parameters"]

    rows = []
    for _ in range(args.repeats):
        save_s, path = timed(trainer.save_checkpoint)
        written = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        load_s, _ = timed(lambda: load_checkpoint(path, trainer.engine, trainer.data,
                                                  trainer.world, read_meta(path)["layout"],
                                                  log=lambda _: None))
        trainer.data.close()

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
        rows.append([today(), machine(), f"{params / 1e6:.0f}M params "
                     f"({' '.join(args.overrides) or 'recipe as is'})",
                     f"{written / 2**30:.2f}", f"{ref_bytes / 2**30:.2f}",
                     f"{save_s:.2f}", f"{ref_save_s:.2f}", f"{save_s / ref_save_s:.2f}",
                     f"{load_s:.2f}", f"{ref_load_s:.2f}", f"{load_s / ref_load_s:.2f}",
                     f"`python benchmarks/checkpoint_io.py {' '.join(sys.argv[1:])}`"])
    record("Checkpoint save and load: ours vs torch.save / torch.load",
           "Ours: DeepSpeed's shards + data/RNG state + meta.json, synced, renamed, `latest` "
           "moved; loaded into the live engine. Reference: the same weights, fp32 masters and "
           "Adam moments as one dict, torch.save + os.sync, torch.load. ratio = ours / "
           "reference time (lower is better). "
           "One process, ZeRO-1, one optimizer step taken.",
           ["date", "machine", "model", "ours GiB", "reference GiB", "save s", "ref save s",
            "save ratio", "load s", "ref load s", "load ratio", "command"], rows)


if __name__ == "__main__":
    main()
