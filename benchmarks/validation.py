"""The held-out estimator's Monte Carlo error against the plain one, at the same forward passes.

(a) ours: K draws per sequence, the number of masked tokens stratified over 1..L, exactly that
    many masked, weight L / l (../shared/LLADA.md's likelihood evaluation);
(b) reference: the plain estimator, one t ~ U(0, 1) per draw with Bernoulli masks, weight 1 / t
    (the training objective's).

Both evaluate the same checkpoint on the same held-out sequences with K draws each, over several
evaluation seeds; the Monte Carlo error of each is the spread (standard deviation) of its result
over the seeds, and the ratio (a)/(b) is what the issue bounds (<= 0.4). Also: evaluation seconds
per million held-out tokens (each evaluated K times) on this machine, for both.

    python benchmarks/validation.py [RUN_DIR|CHECKPOINT] [--data MANIFEST] [--sequences 64]
        [--t-samples 8] [--seeds 10]

Default checkpoint: runs/debug-cpu (the README's main job leaves it).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("source", nargs="?", default=str(REPO / "runs" / "debug-cpu"))
    parser.add_argument("--data", help="held-out manifest (default: the run's data.validation)")
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--t-samples", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--micro-batch-size", type=int, default=32)
    args = parser.parse_args()

    import torch

    from benchmarks.results import machine, record, today
    from data_pipeline.shards import load_manifest
    from framework.checkpoint.hf_files import open_checkpoint
    from framework.config import EvalConfig, ParallelConfig
    from framework.evaluation.validator import HeldOutSet, Validator
    from framework.inference.model import load
    from framework.model.model import vocab_cross_entropy
    from framework.parallel.world import init_world

    tag, meta, model_cfg = open_checkpoint(Path(args.source))
    manifest = args.data or meta["config"]["data"]["validation"][0]["manifest"]
    held = HeldOutSet.read("heldout", load_manifest(manifest), args.sequences)
    world = init_world(ParallelConfig(), "auto")
    model = load(tag, "auto", dtype=torch.float32).model
    cfg = EvalConfig(sequences=args.sequences, t_samples=args.t_samples)
    n, seq_len = held.tokens.shape
    rows, spreads, means = [], {}, {}
    for estimator in ("stratified", "plain"):
        v = Validator(cfg, [held], world, model, micro_batch_size=args.micro_batch_size,
                      mask_id=meta["special_ids"]["mask"], cross_entropy=vocab_cross_entropy,
                      estimator=estimator)
        start = time.perf_counter()
        losses = [v.evaluate_set(held, seed=seed)["loss"] for seed in range(args.seeds)]
        seconds = (time.perf_counter() - start) / args.seeds
        spreads[estimator] = statistics.stdev(losses)
        means[estimator] = statistics.mean(losses)
        rows.append((estimator, seconds / (n * seq_len / 1e6)))
    ratio = spreads["stratified"] / spreads["plain"]
    command = "python benchmarks/validation.py " + " ".join(sys.argv[1:])
    record("Held-out bound: stratified estimator vs plain, same forward passes",
           "Monte Carlo error = standard deviation over evaluation seeds of the bound (nats per "
           "token) on the same sequences and checkpoint; ratio = ours / plain (the issue asks "
           "<= 0.4). Seconds per million held-out tokens, each evaluated K times.",
           ["date", "machine", "checkpoint", "sequences x L x K", "seeds", "ours: mean ± MC error",
            "plain: mean ± MC error", "ratio", "ours s / M tokens", "plain s / M tokens",
            "command"],
           [[today(), machine(), f"{tag.parent.parent.name}/{tag.name}",
             f"{n} x {seq_len} x {args.t_samples}", str(args.seeds),
             f"{means['stratified']:.4f} ± {spreads['stratified']:.4f}",
             f"{means['plain']:.4f} ± {spreads['plain']:.4f}", f"{ratio:.2f}",
             f"{rows[0][1]:.1f}", f"{rows[1][1]:.1f}", f"`{command.strip()}`"]])


if __name__ == "__main__":
    main()
