"""Warmup-Stable-Decay learning rate (LLaDA, ../shared/LLADA.md): a pure function of the step,
so a resumed run needs no scheduler state and every rank agrees."""

from __future__ import annotations

from typing import List, Optional

from framework.config import ScheduleConfig


def _nearest(x: float) -> int:
    return int(x + 0.5)  # halves up (Python's round() takes them to the even neighbour)


def drop_step(total_steps: int, cfg: ScheduleConfig) -> Optional[int]:
    """After how many steps the rate drops (the 0-based index of the first step at drop_lr):
    drop_at x the run, to the nearest step."""
    return None if cfg.drop_at is None else _nearest(cfg.drop_at * total_steps)


def decay_start(total_steps: int, cfg: ScheduleConfig) -> int:
    """After how many steps the decay starts (the 0-based index of its first step): the last
    decay_fraction of the run, to the nearest step."""
    return total_steps - _nearest(cfg.decay_fraction * total_steps)


def wsd_lr(step: int, total_steps: int, peak_lr: float, cfg: ScheduleConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based: the steps done before it) of
    ``total_steps``.

    Linear warmup 0 -> peak over warmup_steps; stable at peak; from ``drop_step`` at drop_lr
    (the paper's 4e-4 -> 1e-4); linear decay to final_lr from ``decay_start`` to the end,
    starting from the rate in force when the decay begins.
    """
    if step < cfg.warmup_steps:
        return peak_lr * (step + 1) / cfg.warmup_steps
    dropped_at = drop_step(total_steps, cfg)

    def stable(s: int) -> float:
        return cfg.drop_lr if dropped_at is not None and s >= dropped_at else peak_lr

    start = decay_start(total_steps, cfg)
    if step < start:
        return stable(step)
    start_lr = stable(start)
    frac = min((step - start + 1) / (total_steps - start), 1.0)
    return start_lr + (cfg.final_lr - start_lr) * frac


def schedule_warnings(total_steps: int, cfg: ScheduleConfig) -> List[str]:
    """A warmup that runs into the drop, the decay or past the run: legal (short smoke and test
    runs may want one), but rarely meant; one line each, naming the keys."""
    warmup = cfg.warmup_steps
    if warmup > total_steps:
        return [f"schedule.warmup_steps={warmup} is longer than the run (train.steps="
                f"{total_steps}): the rate never reaches optimizer.lr"]
    out = []
    dropped_at = drop_step(total_steps, cfg)
    if dropped_at is not None and warmup > dropped_at:
        out.append(f"schedule.warmup_steps={warmup} runs past the drop after {dropped_at} steps "
                   f"(schedule.drop_at={cfg.drop_at:g} of train.steps={total_steps})")
    start = decay_start(total_steps, cfg)
    if warmup > start:
        out.append(f"schedule.warmup_steps={warmup} runs into the decay, which starts after "
                   f"{start} steps (schedule.decay_fraction={cfg.decay_fraction:g} of "
                   f"train.steps={total_steps})")
    return out


class LearningRate:
    """The schedule applied to the optimizer: ``lr_at(step)`` (the steps done before it) times
    the run's factor, which each automatic rollback lowers."""

    def __init__(self, optimizer, lr_at):
        self.optimizer, self.lr_at = optimizer, lr_at

    def set(self, step: int, factor: float = 1.0) -> float:
        lr = factor * self.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr
