"""Step time with MLflow tracking on against off, in the same run (target: ratio <= 1.02).

One trainer, its tracker started (a real ``mlflow server`` started here with ``--store server``,
what clusters use; or the local SQLite store under run.dir with ``--store local``, whose work
then runs in the courier process on this machine). Its steps run in blocks that alternate
between tracking on and off (the tracker detached): same process, same warm caches, same data
stream, so the machine's drift cancels out. Every step is logged (``_log_step``, as ``fit`` does
at ``tracking.log_interval=1``, the worst case: metrics.jsonl and the log line in both modes),
and every ``--plot-interval`` steps of an "on" block the courier draws and sends the loss curve,
as at a checkpoint. Step time = a block's wall time / its steps; the first block of each mode
warms up and is dropped; the ratio compares the medians.

The courier's start (importing MLflow, opening the store: a few CPU seconds once per job) is
not in the blocks; on a 2-core machine it slows the first seconds of a job. The courier process,
and the system-metrics sampler in it (``tracking.system_metrics_interval_s``), run through both
modes: their cost is on the machine, not the trainer's thread (a sample every 10 s takes
milliseconds).

    python benchmarks/tracking_overhead.py [--recipe recipes/debug-cpu.yaml] [--blocks 12]
        [--block-steps 10] [--store server|local] [key=value ...]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "debug-cpu.yaml"))
    parser.add_argument("--blocks", type=int, default=12, help="per mode")
    parser.add_argument("--block-steps", type=int, default=10)
    parser.add_argument("--plot-interval", type=int, default=50)
    parser.add_argument("--store", choices=["server", "local"], default="server")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from benchmarks.results import machine, record, today
    from framework.config import load_config
    from framework.training.factory import build_trainer
    from tests.integration.mlflow_server import MlflowServer

    root = Path(tempfile.mkdtemp(prefix="bench-tracking-"))
    server = None
    tracking = ["tracking.enabled=true", "tracking.experiment=overhead"]
    if args.store == "server":
        server = MlflowServer(root / "server")
        server.start()
        tracking.append(f"tracking.uri={server.uri}")
    steps = 2 * args.blocks * args.block_steps
    cfg = load_config(args.recipe, [f"run.dir={root / 'run'}", f"train.steps={steps}",
                                    "tracking.progress_bar=false", "tracking.log_interval=1",
                                    *tracking, *args.overrides])
    times = {"off": [], "on": []}
    try:
        with open(root / "train.log", "w") as log, contextlib.redirect_stdout(log):
            trainer = build_trainer(cfg)
            stream = trainer.metrics
            tracker = stream.tracker
            sync = (torch.cuda.synchronize if trainer.world.device.type == "cuda"
                    else (lambda: None))
            for block in range(2 * args.blocks):
                mode = ["off", "on"][block % 2] if block % 4 < 2 else ["on", "off"][block % 2]
                stream.tracker = tracker if mode == "on" else None
                sync()
                start = time.perf_counter()
                for _ in range(args.block_steps):
                    result = trainer.train_step()
                    trainer.history.append(result)
                    trainer._record(result, {})  # the metrics stream, as in fit()
                    if trainer.step % args.plot_interval == 0:
                        stream.checkpoint(trainer.step, root / "run", 0.0)
                sync()
                times[mode].append((time.perf_counter() - start) / args.block_steps)
            tracker.close("FINISHED")
            trainer.data.close()
    finally:
        if server is not None:
            server.stop()
    off, on = statistics.median(times["off"][1:]), statistics.median(times["on"][1:])
    for mode in ("off", "on"):
        print(f"tracking {mode}: " + " ".join(f"{t * 1000:.1f}" for t in times[mode]) +
              " ms/step per block")
    command = "python benchmarks/tracking_overhead.py " + " ".join(sys.argv[1:])
    record("MLflow tracking: step time on vs off",
           "ratio = step time with tracking on / off: one trainer, blocks of steps alternating "
           "between its tracker attached and detached, every step logged, the loss curve drawn "
           "and sent every `--plot-interval` steps; medians over blocks after the first. "
           "Target: <= 1.02.",
           ["date", "machine", "recipe", "store", "blocks x steps per mode", "off ms/step",
            "on ms/step", "ratio", "command"],
           [[today(), machine(), f"{Path(args.recipe).name} {' '.join(args.overrides)}".strip(),
             args.store, f"{args.blocks - 1} x {args.block_steps}", f"{off * 1000:.1f}",
             f"{on * 1000:.1f}", f"{on / off:.3f}", f"`{command.strip()}`"]])


if __name__ == "__main__":
    main()
