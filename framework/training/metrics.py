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
``data/...``, ``time/...``, ``memory/...``, ``checkpoint/...``, ``system/...`` (MLflow's UI makes
a chart section of each first part). Components add metrics through ``MetricsStream.write`` under
their group. A record holds over its window, the steps since the previous record (the loss and
gradient norm as means over its good steps, throughput, where the time went), or at its step
(the learning rate, the length, the step's own loss), or over the run (tokens, skipped steps).
"""

from __future__ import annotations

import json
import math
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import psutil
import torch
import torch.distributed as dist

from data_pipeline.files import atomic_write
from framework.config import TrackingConfig
from framework.evaluation.validator import console_lines as val_console_lines
from framework.parallel.world import World
from framework.training.flops import FlopCounter
from framework.training.objective import LossByT
from framework.training.phases import StepTimes

# train/...: "over the window" is every step since the last record (skipped steps excluded from
# the loss and gradient norm, and counted); "at the step" is the recorded step's own value
LOSS, LOSS_STEP = "train/loss", "train/loss_step"  # the window's mean, the step's own
LR, SEQ_LEN = "train/lr", "train/seq_len"  # at the step
GRAD_NORM, GRAD_NORM_MAX = "train/grad_norm", "train/grad_norm_max"  # over the window
WINDOW_STEPS, WINDOW_SKIPPED = "train/window_steps", "train/window_skipped"
TOKENS_PER_S, MFU = "train/tokens_per_s", "train/mfu"  # over the window
CONSUMED_TOKENS, SKIPPED_STEPS = "train/consumed_tokens", "train/skipped_steps"  # over the run
LOSS_BY_T = "train/loss_by_t/"  # + the tenth of [0, 1] the mask ratio falls in: 0.0-0.1 ...
DATA = "data/"  # + missing_shards, corrupt_shards, bad_samples (skipped, over the run)
# where the window's time went: mean, median and 90th percentile step time; the fraction of the
# window's wall time (its steps, saves and evaluations) in each part
STEP_SECONDS = "time/step_seconds"
STEP_SECONDS_MEDIAN, STEP_SECONDS_P90 = "time/step_seconds_median", "time/step_seconds_p90"
TIME_PARTS = ("data", "forward_backward", "optimizer", "checkpoint", "validation")
FRACTION = "time/{}_fraction"  # .format(part)
INPUT_BOUND = 0.1  # a window that waits for data this much of its time is input-bound
ETA, JOB_LEFT = "time/eta_seconds", "time/job_seconds_left"  # to train.steps; the Slurm job's end
# stragglers: each rank's own part of its steps (framework/training/phases.py), over the window
RANK_SECONDS_MAX, RANK_SECONDS_MEDIAN = "time/rank_seconds_max", "time/rank_seconds_median"
STRAGGLER_RATIO, SLOWEST_RANK = "time/straggler_ratio", "time/slowest_rank"
# memory of the reporting rank: CUDA's now and its peak over the window; the process's resident
# memory now and its peak over the process
ALLOCATED, PEAK_MEMORY = "memory/allocated_gib", "memory/peak_allocated_gib"
RSS, PEAK_RSS = "memory/rss_gib", "memory/peak_rss_gib"
CHECKPOINT_SECONDS = "checkpoint/save_seconds"
# val/<set>/... and time/val_seconds: framework/evaluation/validator.py; system/...: MLflow's
# system metrics (framework/tracking/system.py)
# the curves drawn for MLflow (framework/tracking/plot.py): the loss window means with each step's
# own faint, each held-out set's bound, the learning rate; the loss by mask ratio beside them
PLOT = {"x": CONSUMED_TOKENS, "y": LOSS, "raw": LOSS_STEP, "lr": LR, "by": LOSS_BY_T,
        "val": "val/"}
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
    times: Optional[StepTimes] = None  # where this rank's step went (phases.py)


class Window:
    """What the steps since the last record add up to (losses, tokens, FLOPs, time), on every
    rank; ``take`` makes the record's values, with the collectives that sum over data parallel.
    ``optimizer_timer``: under pipeline parallelism, the optimizer step's seconds since its last
    call (phases.OptimizerTimer: DeepSpeed's schedule is one call, which marks cannot split)."""

    def __init__(self, world: World, flops: FlopCounter, peak: Optional[float],
                 optimizer_timer: Optional[Callable[[], float]] = None):
        self.world, self.flops, self.peak = world, flops, peak
        self.optimizer_timer = optimizer_timer
        self.process = psutil.Process()
        self.total_flops = self.total_seconds = 0.0
        self.pace: Optional[tuple] = None  # (time, step) at this job's first step's end: the ETA
        self._reset()

    def _reset(self) -> None:
        self.steps = self.tokens = self.skipped = 0
        self.losses: List[float] = []  # of the good steps
        self.grad_norms: List[float] = []
        self.step_seconds: List[float] = []
        self.parts = dict.fromkeys(TIME_PARTS, 0.0)  # seconds
        self.own_seconds = 0.0
        self.dense_flops = 0.0  # the FLOPs that do not depend on this rank's masks
        self.masked = 0  # this rank's masked positions: the head's FLOPs, summed at take
        if self.world.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.world.device)

    def add(self, result: StepResult) -> None:
        self.steps += 1
        self.tokens += result.tokens
        self.step_seconds.append(result.seconds)
        if result.skipped:
            self.skipped += 1
        else:
            self.losses.append(result.loss)
            if result.grad_norm is not None:
                self.grad_norms.append(result.grad_norm)
        if result.times is not None:
            self.own_seconds += result.times.own
            for part in ("data", "forward_backward", "optimizer"):
                self.parts[part] += getattr(result.times, part)
        self.dense_flops += self.flops.step(result.tokens, result.seq_len, 0)
        self.masked += result.masked
        if self.pace is None:
            self.pace = (time.monotonic(), result.step)

    def note(self, part: str, seconds: float) -> None:
        """Time between steps that the window's wall time holds: a ``checkpoint`` save or a
        ``validation``."""
        self.parts[part] += seconds

    def take(self, result: StepResult, *, consumed_tokens: int, skipped_steps: int,
             data_counters: Dict[str, int], loss_by_t: LossByT, steps_left: int = 0,
             job_seconds_left: Optional[float] = None) -> Dict[str, float]:
        """The values of the record at ``result``'s step; resets the window. Collective."""
        # the skipped inputs and the masked positions in one collective
        counts = sum_over_data_parallel({**data_counters, "_masked": self.masked}, self.world)
        masked = counts.pop("_masked")
        group = self.world.dp_group
        by_t = loss_by_t.take(self.world.device, lambda t: dist.all_reduce(t, group=group))
        flops = self.dense_flops + self.flops.step(0, 0, masked)
        seconds = max(sum(self.step_seconds), 1e-9)
        values: Dict[str, Optional[float]] = {
            LOSS: _mean(self.losses), LOSS_STEP: result.loss, LR: result.lr,
            GRAD_NORM: _mean(self.grad_norms) if self.grad_norms else None,
            GRAD_NORM_MAX: max(self.grad_norms) if self.grad_norms else None,
            WINDOW_STEPS: self.steps, WINDOW_SKIPPED: self.skipped,
            TOKENS_PER_S: self.tokens / seconds, MFU: self._mfu(flops, seconds),
            SEQ_LEN: result.seq_len, CONSUMED_TOKENS: consumed_tokens,
            SKIPPED_STEPS: skipped_steps, **{f"{DATA}{k}": v for k, v in counts.items()},
            **{f"{LOSS_BY_T}{k}": v for k, v in by_t.items()},
            **self._time(seconds, steps_left, result.step), **self._stragglers(),
            **memory(self.world.device, self.process),
        }
        if job_seconds_left is not None:
            values[JOB_LEFT] = max(job_seconds_left, 0.0)
        self.total_flops += flops
        self.total_seconds += seconds
        self._reset()
        return {k: v for k, v in values.items() if v is not None}

    def _time(self, seconds: float, steps_left: int, step: int) -> Dict[str, float]:
        """Step time and where the window's wall time went; the ETA at this job's pace since
        its first step (saves and evaluations included; the first step, which compiles and
        warms up, left out, unless it is all there is)."""
        if self.optimizer_timer is not None:  # pipeline: the optimizer's part of the schedule
            optimizer = min(self.optimizer_timer(), self.parts["forward_backward"])
            self.parts["optimizer"] = optimizer
            self.parts["forward_backward"] -= optimizer
        wall = seconds + self.parts["checkpoint"] + self.parts["validation"]
        times = sorted(self.step_seconds)
        values = {STEP_SECONDS: seconds / self.steps, STEP_SECONDS_MEDIAN: statistics.median(times),
                  # the nearest rank: of 10 steps, the 9th slowest
                  STEP_SECONDS_P90: times[math.ceil(0.9 * len(times)) - 1],
                  **{FRACTION.format(p): s / wall for p, s in self.parts.items()}}
        since, first = self.pace
        done = step - first
        per_step = (time.monotonic() - since) / done if done > 0 else wall / self.steps
        values[ETA] = steps_left * per_step
        return values

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
    line, metrics.jsonl (``path``; None: not written) and MLflow (``tracker``; None: off); the
    records' windows (``window``) and the run's summary.json (``summary_path``: written by the
    rank that has one, with the run's ``facts``)."""

    def __init__(self, cfg: TrackingConfig, *, console: bool, path: Optional[Path], tracker,
                 total_steps: int, resumed_at: Optional[int], rollback: bool,
                 window: Optional["Window"] = None, summary_path: Optional[Path] = None,
                 facts: Optional[dict] = None):
        """``console``: this rank prints the step lines (and the progress bar, on a terminal);
        the other ranks' streams write nothing."""
        self.cfg, self.path, self.tracker = cfg, path, tracker
        self.window, self.summary_path, self.facts = window, summary_path, facts or {}
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

    def summary(self, summary: dict) -> None:
        """summary.json, by the rank that writes it."""
        if self.summary_path is not None:
            self.summary_path.write_text(json.dumps(summary, indent=2) + "\n")

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


def sum_over_data_parallel(counts: Dict[str, int], world: World) -> Dict[str, int]:
    """Integer counts summed over the data-parallel group (collective; on the training device:
    NCCL groups reduce CUDA tensors only)."""
    names = sorted(counts)
    t = torch.tensor([counts[k] for k in names], dtype=torch.int64, device=world.device)
    dist.all_reduce(t, group=world.dp_group)
    return dict(zip(names, t.tolist()))


def memory(device: torch.device, process: psutil.Process) -> Dict[str, float]:
    """The reporting rank's memory, GiB: CUDA's allocated now and at its peak since the last
    reset (each record resets it), on CUDA; the process's resident set now and at its peak."""
    values = {RSS: process.memory_info().rss / 2**30,
              # Linux reports the peak in KiB
              PEAK_RSS: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if device.type == "cuda":
        values[ALLOCATED] = torch.cuda.memory_allocated(device) / 2**30
        values[PEAK_MEMORY] = torch.cuda.max_memory_allocated(device) / 2**30
    return values


def console_line(step: int, total: int, values: Dict[str, float]) -> str:
    """``step    200/200 | loss 5.2877 (steps 191-200) | lr 1.000e-04 | grad norm 0.612 (max
    0.914) | 9,916 tokens/s | step 0.410 s (p90 0.450) | data wait 2% fwd+bwd 81% optimizer 15% |
    eta 1m10s | rss 1.2 GiB | skipped 0``: the loss and gradient norm over the window (the
    steps named), the throughput and the times over it, what is left, memory."""
    count, skipped = int(values.get(WINDOW_STEPS, 1)), int(values.get(WINDOW_SKIPPED, 0))
    steps = f"step {step}" if count == 1 else f"steps {step - count + 1}-{step}"
    if skipped:
        steps += f", {skipped} skipped"
    grad = values.get(GRAD_NORM)
    line = (f"step {step:>6}/{total} | loss {values[LOSS]:.4f} ({steps}) | lr {values[LR]:.3e} | "
            f"grad norm {'n/a' if grad is None else f'{grad:.3f}'}")
    if GRAD_NORM_MAX in values and count > 1:
        line += f" (max {values[GRAD_NORM_MAX]:.3f})"
    line += f" | {values[TOKENS_PER_S]:,.0f} tokens/s"
    if MFU in values:
        line += f" | mfu {100 * values[MFU]:.1f}%"
    if STEP_SECONDS_MEDIAN in values:
        line += (f" | step {values[STEP_SECONDS_MEDIAN]:.3f} s (p90 "
                 f"{values[STEP_SECONDS_P90]:.3f}) | " + time_split(values))
    if ETA in values:
        line += f" | eta {duration(values[ETA])}"
    if JOB_LEFT in values:
        line += f" (job ends in {duration(values[JOB_LEFT])})"
    if PEAK_MEMORY in values:
        line += f" | mem {values[ALLOCATED]:.1f} GiB (peak {values[PEAK_MEMORY]:.1f})"
    elif RSS in values:
        line += f" | rss {values[RSS]:.1f} GiB"
    line += f" | skipped {values[SKIPPED_STEPS]:.0f}"
    if STRAGGLER_RATIO in values:
        line += (f" | slowest rank {values[SLOWEST_RANK]:.0f} "
                 f"{values[STRAGGLER_RATIO]:.2f}x median")
    bad = {k.removeprefix(DATA): v for k, v in values.items() if k.startswith(DATA) and v}
    if bad:
        line += " | data skipped " + ", ".join(f"{k} {v:.0f}" for k, v in bad.items())
    return line


def time_split(values: Dict[str, float]) -> str:
    """``data wait 2% fwd+bwd 81% optimizer 15%`` (+ ``save``, ``eval`` where the window had
    them); ``INPUT-BOUND`` first where the data wait reaches INPUT_BOUND."""
    names = {"data": "data wait", "forward_backward": "fwd+bwd", "optimizer": "optimizer",
             "checkpoint": "save", "validation": "eval"}
    parts = [f"{names[p]} {100 * values[FRACTION.format(p)]:.0f}%" for p in TIME_PARTS
             if p in ("data", "forward_backward", "optimizer") or values[FRACTION.format(p)]]
    bound = values[FRACTION.format("data")] >= INPUT_BOUND
    return ("INPUT-BOUND: " if bound else "") + " ".join(parts)


def duration(seconds: float) -> str:
    """45s, 12m05s, 3h02m, 2d04h."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _mean(values: List[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


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
