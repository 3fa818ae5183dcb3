"""Batch diversity: the streaming loader against a uniform in-memory sampler, on the held-out bound.

The debug recipe (its model, optimizer, schedule, steps and held-out set) trained twice per seed:
(a) ours: the streaming loader (a reader holding data.open_shards whole shards of a dataset that
    llada prepare wrote in a seeded random order);
(b) reference: every sequence of every shard read into memory and drawn uniformly (a seeded
    permutation of all of them, without replacement), through the same masking collator with the
    same global sample indices, so noise, the 1% cut and everything else match (a).
Each seed s sets the model initialisation, the data order and the noise (run.seed=1234+s,
data.seed=s, objective.seed=s) alike for both. Printed: the final held-out bound (nats/token, the
run's own evaluation: issue 9's estimator) of each run, the mean per sampler, the spread between
seeds and the relative gap of the means, (a) / (b) - 1. Target (issue 17): within 0.5%.

    python benchmarks/batch_diversity.py [--seeds 2] [--first-seed 0] [--steps 200]

About 2.5 minutes per run on 2 CPU cores (the data is prepared once, under a temporary directory).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RECIPE = REPO / "recipes" / "debug-cpu.yaml"


class UniformReference:
    """The loader's interface over every sequence of the first dataset, in memory, drawn in a
    seeded uniform permutation of all of them (one data-parallel rank)."""

    def __init__(self, cfg, sets, weights, collator, *, micro_batch_size, accumulation, dp_rank,
                 dp_size, **_):
        from data_pipeline.shards import read_sequences
        import torch
        assert dp_size == 1 and len(sets) == 1, "the reference runs on one rank, one dataset"
        self.torch, self.collator, self.mb, self.accum = torch, collator, micro_batch_size, \
            accumulation
        self.rows = read_sequences(sets[0])  # [n, seq_len] int64: all of them
        self.order = np.random.default_rng([cfg.seed, 31337]).permutation(len(self.rows))
        self.batches = 0
        self.counters = {}
        self.workers = 0  # no worker processes

    def __iter__(self):
        return self

    def __next__(self):
        first = self.batches * self.mb
        if first + self.mb > len(self.order):
            raise StopIteration("the reference draws one epoch")
        rows = self.rows[self.order[first:first + self.mb]]
        index = self.torch.arange(first, first + self.mb)
        batch = self.collator(self.torch.from_numpy(rows), index, self.batches // self.accum)
        self.batches += 1
        return batch

    def state_dict(self):
        return {"batches": self.batches}

    def load_state_dicts(self, states):
        raise RuntimeError("the reference sampler does not resume")

    def close(self):
        pass


def _train(overrides, reference: bool, out: str) -> None:
    import framework.training.factory as factory
    from framework.config import load_config
    if reference:
        factory.PretrainLoader = UniformReference
    summary = factory.build_trainer(load_config(RECIPE, overrides)).fit()
    Path(out).write_text(json.dumps(summary))


def run(overrides, reference: bool, out: Path) -> dict:
    child = mp.get_context("spawn").Process(target=_train, args=(overrides, reference, str(out)))
    child.start()
    child.join()
    if child.exitcode != 0:
        raise SystemExit(f"training run failed (exit {child.exitcode}): {overrides}")
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--first-seed", type=int, default=0)  # seeds first .. first + seeds - 1
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()

    from benchmarks.results import machine, record, today

    work = Path(tempfile.mkdtemp(prefix="bench-diversity-"))
    data = work / "stdlib-128"
    common = [f"data.datasets=[{{manifest: {data}/manifest.json, prepare_inputs: [stdlib], "
              "holdout_fraction: 0.01}]",
              f"data.validation=[{{name: stdlib, manifest: {data}/holdout/manifest.json}}]",
              f"train.steps={args.steps}", "tracking.enabled=false", "checkpoint.save_final=false",
              "checkpoint.interval=0"]
    bounds = {"loader": [], "reference": []}
    rows = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for name in ("loader", "reference"):
            run_dir = work / f"{name}-{seed}"
            overrides = [*common, f"run.dir={run_dir}", f"run.seed={1234 + seed}",
                         f"data.seed={seed}", f"objective.seed={seed}"]
            summary = run(overrides, name == "reference", work / f"{name}-{seed}.json")
            last = summary["validation"]["stdlib"]["last"]
            assert last["step"] == args.steps, last
            bounds[name].append(last["loss"])
            print(f"{name} seed {seed}: held-out bound {last['loss']:.4f} nats/token "
                  f"(+- {last['loss_mc_stderr']:.4f} Monte Carlo)", flush=True)
    means = {k: statistics.fmean(v) for k, v in bounds.items()}
    spread = {k: (max(v) - min(v)) for k, v in bounds.items()}
    gap = means["loader"] / means["reference"] - 1
    for name in ("loader", "reference"):
        seeds = f"seeds {args.first_seed}-{args.first_seed + args.seeds - 1}"
        rows.append([today(), machine(), name, f"{args.steps} steps x {seeds}",
                     " / ".join(f"{b:.4f}" for b in bounds[name]), f"{means[name]:.4f}",
                     f"{spread[name]:.4f}",
                     f"{gap:+.2%}" if name == "loader" else "(reference)",
                     f"`python benchmarks/batch_diversity.py --seeds {args.seeds} "
                     f"--first-seed {args.first_seed} "
                     f"--steps {args.steps}`"])
    record("Batch diversity: streaming loader vs uniform in-memory sampler, held-out bound",
           "The debug recipe trained with each sampler, same seeds (init, data order, noise); the "
           "final held-out bound in nats/token per seed, their mean and spread (max - min), and "
           "the loader's mean against the reference's. Target: the loader within 0.5%.",
           ["date", "machine", "sampler", "runs", "bound per seed", "mean", "spread",
            "loader / reference - 1", "command"], rows)


if __name__ == "__main__":
    main()
