"""Warmup-Stable-Decay learning rate (LLaDA, ../shared/LLADA.md): a pure function of the step,
so a resumed run needs no scheduler state and every rank agrees."""

from __future__ import annotations

from framework.config import ScheduleConfig


def wsd_lr(step: int, total_steps: int, peak_lr: float, cfg: ScheduleConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``total_steps``.

    Linear warmup 0 -> peak over warmup_steps; stable at peak; from drop_at x total at drop_lr
    (the paper's 4e-4 -> 1e-4); linear decay to final_lr over the last decay_fraction of the run,
    starting from the rate in force when the decay begins.
    """
    if step < cfg.warmup_steps:
        return peak_lr * (step + 1) / cfg.warmup_steps

    def stable(s: int) -> float:
        dropped = cfg.drop_at is not None and s >= int(cfg.drop_at * total_steps)
        return cfg.drop_lr if dropped else peak_lr

    decay_steps = int(round(cfg.decay_fraction * total_steps))
    decay_start = total_steps - decay_steps
    if step < decay_start:
        return stable(step)
    start_lr = stable(decay_start)
    frac = min((step - decay_start + 1) / decay_steps, 1.0)
    return start_lr + (cfg.final_lr - start_lr) * frac
