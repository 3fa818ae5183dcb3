"""Stopping a run early without losing work.

Slurm ends jobs in two ways a long run must survive: the time limit (the job asks for a signal
ahead of it: ``--signal=B:USR1@600``) and preemption (SIGTERM, then SIGKILL after a grace time).
Either way the trainer finishes the step it is in, saves a checkpoint and exits with
``EXIT_REQUEUE``; framework/launch/llada.sbatch turns that status into ``scontrol requeue`` and the
next start resumes from that checkpoint. A deadline guard does the same on its own when the job's end
(``LLADA_DEADLINE``, epoch seconds, which the sbatch script reads from Slurm) is closer than the
next step plus a save, so a lost or late signal costs nothing either.

The handler only records the signal: the decision is taken between steps, agreed by all ranks
(``Checkpointer.due``), because a rank cannot save alone and a step cannot be cut in half.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Callable, Dict, Optional

from framework.config import ConfigError, PreemptionConfig

EXIT_REQUEUE = 3  # "checkpoint saved, stopped early: start me again"; llada.sbatch knows it
DEADLINE_ENV = "LLADA_DEADLINE"


def deadline_from_env(env: Dict[str, str] = os.environ) -> Optional[float]:
    """The job's end in epoch seconds, from ``LLADA_DEADLINE``; None when unset or empty."""
    raw = env.get(DEADLINE_ENV, "").strip()
    if not raw:
        return None
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"{DEADLINE_ENV}: expected epoch seconds, got {raw!r}") from None


def stop_signals(cfg: PreemptionConfig) -> list:
    """``cfg.signals`` as signal numbers."""
    return [getattr(signal, f"SIG{name}") for name in cfg.signals]


class StopRequest:
    """Whether this rank wants the run to stop after the current step, and why."""

    def __init__(self, cfg: PreemptionConfig, deadline: Optional[float] = None,
                 clock: Callable[[], float] = time.time):
        self.cfg, self.deadline, self.clock = cfg, deadline, clock
        self.signal_name: Optional[str] = None
        self.step_seconds = 0.0  # the slowest step seen: the next one may be as slow
        self.save_seconds = 0.0  # the last save's duration
        self._previous: Dict[int, object] = {}

    def install(self) -> "StopRequest":
        """Handle ``cfg.signals`` in this (main) thread until ``uninstall``. DataLoader workers
        forked later inherit the handler: there it only sets a flag nobody reads, so a signal
        that Slurm sends to every process of the step does not kill them."""
        for sig in stop_signals(self.cfg):
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame) -> None:
        # a handler must not block or print (it may interrupt a print): record the first only
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name

    def request(self, why: str) -> None:
        """Ask for a stop from code (tests, an operator hook)."""
        if self.signal_name is None:
            self.signal_name = why

    def note_step(self, seconds: float) -> None:
        self.step_seconds = max(self.step_seconds, seconds)

    def note_save(self, seconds: float) -> None:
        self.save_seconds = seconds

    def seconds_left(self) -> Optional[float]:
        """Until the job's end (None: no deadline known)."""
        return None if self.deadline is None else self.deadline - self.clock()

    @property
    def reason(self) -> Optional[str]:
        """Why this rank wants to stop now, or None."""
        if self.signal_name is not None:
            return f"{self.signal_name} received"
        if self.deadline is None:
            return None
        left = self.deadline - self.clock()
        need = 60 * self.cfg.deadline_margin_minutes + 2 * self.step_seconds + self.save_seconds
        if left < need:
            return (f"time limit: {max(left, 0):.0f} s left, the next step and a save need "
                    f"~{need:.0f} s (preemption.deadline_margin_minutes="
                    f"{self.cfg.deadline_margin_minutes:g} included)")
        return None
