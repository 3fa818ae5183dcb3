"""One metrics stream: one record per logged step, to the console, metrics.jsonl and MLflow.

Step numbers: a step is numbered by the optimizer steps done once it is done, from 1 (the state
``checkpoints/step_N`` holds). The same number, the same names and the same values go to every
sink. Steps that run again after a resume (those after the checkpoint resumed from) follow one
rule, in metrics.jsonl as in MLflow: the first record of a step wins (MLflow cannot replace a
logged point; on the same layout the re-run values are the same anyway). A fresh start in an old
run.dir starts a new record, and a rollback (a resume to before a checkpoint the run completed)
continues from the step resumed on; in both cases the records it would shadow are moved to a side
file, never deleted (MLflow: a new run, a child run).

Names are grouped by concern (README, "What a run produces"): ``train/...``, ``val/<set>/...``,
``data/...``, ``time/...``, ``memory/...``, ``checkpoint/...``, ``system/...``. Components add
metrics through ``MetricsStream.write`` under their group.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from data_pipeline.files import atomic_write
from framework.config import TrackingConfig
from framework.evaluation.validator import console_lines as val_console_lines
from framework.parallel.world import World
from framework.training.flops import FlopCounter
from framework.training.objective import LossByT

LOSS, LR, GRAD_NORM = "train/loss", "train/lr", "train/grad_norm"
TOKENS_PER_S, MFU, SEQ_LEN = "train/tokens_per_s", "train/mfu", "train/seq_len"
CONSUMED_TOKENS, SKIPPED_STEPS = "train/consumed_tokens", "train/skipped_steps"
LOSS_BY_T = "train/loss_by_t/"  # + the tenth of [0, 1] the mask ratio falls in: 0.0-0.1 ...
DATA = "data/"  # + missing_shards, corrupt_shards, bad_samples (skipped, over the run)
STEP_SECONDS = "time/step_seconds"
# stragglers: each rank's own part of its steps (framework/training/phases.py), over the window
RANK_SECONDS_MAX, RANK_SECONDS_MEDIAN = "time/rank_seconds_max", "time/rank_seconds_median"
STRAGGLER_RATIO, SLOWEST_RANK = "time/straggler_ratio", "time/slowest_rank"
PEAK_MEMORY = "memory/peak_allocated_gib"
CHECKPOINT_SECONDS = "checkpoint/save_seconds"
# val/<set>/... and time/val_seconds: framework/evaluation/validator.py
# the curves sent to MLflow: the loss (and each held-out set's bound), the loss by mask ratio
PLOT = {"x": CONSUMED_TOKENS, "y": LOSS, "by": LOSS_BY_T, "val": "val/"}
SUMMARY_WINDOW = 10  # first_loss / last_loss: means over this many steps


@dataclass
class StepResult:
    step: int  # the step's number: optimizer steps done once it is done, from 1
    loss: float  # mean over micro-batches and data-parallel ranks; NaN when skipped
    lr: float
    grad_norm: Optional[float]
    tokens: int  # tokens in this step's global batch
    seq_len: int  # after the 1% variable-length cut
    masked: int  # masked positions in this data-parallel rank's batches: where the head ran
    seconds: float  # wall time of the step (data, forward, backward, optimizer step)
    skipped: bool
    # this rank's own part of the step: until it waits for the others (phases.py)
    own_seconds: float = 0.0


class Window:
    """What the steps since the last record add up to (tokens, FLOPs, time), on every rank;
    ``take`` makes the record's values, with the collectives that sum over data parallel."""

    def __init__(self, world: World, flops: FlopCounter, peak: Optional[float]):
        self.world, self.flops, self.peak = world, flops, peak
        self.total_flops = self.total_seconds = 0.0
        self._reset()

    def _reset(self) -> None:
        self.steps = self.tokens = 0
        self.seconds = self.own_seconds = 0.0
        self.dense_flops = 0.0  # the FLOPs that do not depend on this rank's masks
        self.masked = 0  # this rank's masked positions: the head's FLOPs, summed at take
        if self.world.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.world.device)

    def add(self, result: StepResult) -> None:
        self.steps += 1
        self.tokens += result.tokens
        self.seconds += result.seconds
        self.own_seconds += result.own_seconds
        self.dense_flops += self.flops.step(result.tokens, result.seq_len, 0)
        self.masked += result.masked

    def take(self, result: StepResult, *, consumed_tokens: int, skipped_steps: int,
             data_counters: Dict[str, int], loss_by_t: LossByT) -> Dict[str, float]:
        """The values of the record at ``result``'s step; resets the window. Collective."""
        # the skipped inputs and the masked positions in one collective
        counts = sum_over_data_parallel({**data_counters, "_masked": self.masked},
                                        self.world.device)
        masked = counts.pop("_masked")
        group = parallel_state.get_data_parallel_group()
        by_t = loss_by_t.take(self.world.device, lambda t: dist.all_reduce(t, group=group))
        flops = self.dense_flops + self.flops.step(0, 0, masked)
        seconds = max(self.seconds, 1e-9)
        values: Dict[str, Optional[float]] = {
            LOSS: result.loss, LR: result.lr, GRAD_NORM: result.grad_norm,
            TOKENS_PER_S: self.tokens / seconds, MFU: self._mfu(flops, seconds),
            SEQ_LEN: result.seq_len, CONSUMED_TOKENS: consumed_tokens,
            SKIPPED_STEPS: skipped_steps, STEP_SECONDS: seconds / self.steps,
            **{f"{DATA}{k}": v for k, v in counts.items()},
            **{f"{LOSS_BY_T}{k}": v for k, v in by_t.items()},
            **self._stragglers(),
        }
        if self.world.device.type == "cuda":
            values[PEAK_MEMORY] = torch.cuda.max_memory_allocated(self.world.device) / 2**30
        self.total_flops += flops
        self.total_seconds += seconds
        self._reset()
        return {k: v for k, v in values.items() if v is not None}

    def _stragglers(self) -> Dict[str, float]:
        """The spread of the ranks' own step time over the window: slowest / median and which
        rank (one small all-gather over the world; nothing on one process)."""
        if self.world.world_size == 1:
            return {}
        mine = torch.tensor([self.own_seconds / max(self.steps, 1)], dtype=torch.float64,
                            device=self.world.device)
        every = [torch.empty_like(mine) for _ in range(self.world.world_size)]
        dist.all_gather(every, mine)
        times = torch.cat(every).tolist()
        median = statistics.median(times)
        slowest = max(range(len(times)), key=lambda r: (times[r], -r))
        return {RANK_SECONDS_MAX: times[slowest], RANK_SECONDS_MEDIAN: median,
                STRAGGLER_RATIO: times[slowest] / max(median, 1e-9), SLOWEST_RANK: slowest}

    def _mfu(self, flops: float, seconds: float) -> Optional[float]:
        """Model FLOPs utilisation of the whole world against the accelerators' datasheet peak;
        None where the peak is unknown (CPU)."""
        if self.peak is None:
            return None
        return flops / (seconds * self.peak * self.world.world_size)

    def run_mfu(self) -> Optional[float]:
        """Over every record taken so far."""
        return None if not self.total_seconds else self._mfu(self.total_flops, self.total_seconds)


class MetricsStream:
    """The sinks of the step records, on the rank that reports (``World.reports``): the console
    line, metrics.jsonl (``path``; None: not written) and MLflow (``tracker``; None: off)."""

    def __init__(self, cfg: TrackingConfig, *, console: bool, path: Optional[Path], tracker,
                 total_steps: int, resumed_at: Optional[int], rollback: bool):
        """``console``: this rank prints the step lines (and the progress bar, on a terminal);
        the other ranks' streams write nothing."""
        self.cfg, self.path, self.tracker = cfg, path, tracker
        self.log: Callable[[str], None] = print if console else (lambda _: None)
        self.total_steps = total_steps
        self.high = -1  # the highest step metrics.jsonl holds: steps up to it are not written
        if path is not None and path.exists():
            self.high = self._reopen(path, resumed_at, rollback)
        from tqdm import tqdm
        show = console and cfg.progress_bar and sys.stderr.isatty()
        self.bar = tqdm(total=total_steps, initial=resumed_at or 0, disable=not show,
                        dynamic_ncols=True, desc="train")

    def due(self, step: int) -> bool:
        return step % self.cfg.log_interval == 0 or step == self.total_steps

    def progress(self, result: StepResult) -> None:
        self.bar.update(1)
        if not result.skipped:
            self.bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{result.lr:.2e}")

    def write(self, step: int, values: Dict[str, float]) -> None:
        """The record of a step, to every sink."""
        if LOSS in values:
            self.log(console_line(step, self.total_steps, values))
        for line in val_console_lines(step, values):
            self.log(line)
        if self.tracker is not None:
            self.tracker.metrics(step, values)
        if self.path is not None and step > self.high:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
            self.high = step

    def checkpoint(self, step: int, path: Path, seconds: float) -> None:
        """A checkpoint event: MLflow gets its duration and a fresh curve."""
        if self.tracker is not None:
            self.tracker.metrics(step, {CHECKPOINT_SECONDS: seconds}, stream="checkpoint")
            self.tracker.tags({"checkpoint/latest": path})
            self.tracker.plot()

    def close(self, status: str) -> None:
        """``status``: the run's (completed, stopped, rolled_back, diverged, failed)."""
        self.bar.close()
        if self.tracker is not None:  # a stopped run is resumed: KILLED until it is; a rolled
            # back one goes on in a child run
            self.tracker.close({"completed": "FINISHED", "stopped": "KILLED",
                                "rolled_back": "KILLED"}.get(status, "FAILED"))

    def _reopen(self, path: Path, resumed_at: Optional[int], rollback: bool) -> int:
        """metrics.jsonl as this job continues it; returns its highest step. A line a crash cut
        short is dropped; records this job must not keep are moved to a side file."""
        records, bad = [], 0
        for line in path.read_text().splitlines():
            try:
                records.append((int(json.loads(line)["step"]), line))
            except (ValueError, KeyError, TypeError):
                bad += 1
        if bad:
            self.log(f"llada: warning: {path}: {bad} unreadable line(s) dropped (a crash cut "
                     "them short)")
        last = 0 if resumed_at is None else resumed_at

        def kept(step: int) -> bool:
            return resumed_at is not None and (not rollback or step <= last)

        keep = [(step, line) for step, line in records if kept(step)]
        aside = [line for step, line in records if not kept(step)]
        if aside:
            why = "a fresh start" if resumed_at is None else f"the rollback to step {last}"
            side = path.with_name(f"metrics-set-aside-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
            atomic_write(side, "".join(f"{line}\n" for line in aside).encode())
            self.log(f"llada: {len(aside)} records of {path} after step {last} moved to "
                     f"{side.name} ({why})")
        atomic_write(path, "".join(f"{line}\n" for _, line in keep).encode())
        return max((step for step, _ in keep), default=-1)


def sum_over_data_parallel(counts: Dict[str, int], device: torch.device) -> Dict[str, int]:
    """Integer counts summed over the data-parallel group (collective; on the training device:
    NCCL groups reduce CUDA tensors only)."""
    names = sorted(counts)
    t = torch.tensor([counts[k] for k in names], dtype=torch.int64, device=device)
    dist.all_reduce(t, group=parallel_state.get_data_parallel_group())
    return dict(zip(names, t.tolist()))


def console_line(step: int, total: int, values: Dict[str, float]) -> str:
    """``step    200/200 | loss 5.2877 | lr 1.000e-04 | grad norm 1.018 | 9,916 tokens/s ...``"""
    grad = values.get(GRAD_NORM)
    line = (f"step {step:>6}/{total} | loss {values[LOSS]:.4f} | lr {values[LR]:.3e} | "
            f"grad norm {'n/a' if grad is None else f'{grad:.3f}'} | "
            f"{values[TOKENS_PER_S]:,.0f} tokens/s")
    if MFU in values:
        line += f" | mfu {100 * values[MFU]:.1f}%"
    line += f" | skipped {values[SKIPPED_STEPS]:.0f}"
    if STRAGGLER_RATIO in values:
        line += (f" | slowest rank {values[SLOWEST_RANK]:.0f} "
                 f"{values[STRAGGLER_RATIO]:.2f}x median")
    bad = {k.removeprefix(DATA): v for k, v in values.items() if k.startswith(DATA) and v}
    if bad:
        line += " | data skipped " + ", ".join(f"{k} {v:.0f}" for k, v in bad.items())
    return line


def summary(history: List[StepResult], *, status: str, tokens: int, elapsed: float,
            mfu: Optional[float], **facts) -> dict:
    """summary.json: the first and last losses (means over SUMMARY_WINDOW good steps), tokens,
    throughput and MFU of this job; ``facts`` (the run's layout, counts) as given."""
    good = [r.loss for r in history if not r.skipped and math.isfinite(r.loss)]
    first, last = good[:SUMMARY_WINDOW], good[-SUMMARY_WINDOW:]
    return {"status": status, "steps": len(history), "tokens": tokens,
            "first_loss": sum(first) / len(first) if first else float("nan"),
            "last_loss": sum(last) / len(last) if last else float("nan"),
            "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0, "mfu": mfu,
            "elapsed_s": elapsed, **facts}
