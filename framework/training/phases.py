"""The phases of a run, marked once, here, by the trainer: what the hang watchdog watches
(framework/training/watchdog.py) and what the per-rank step time of the straggler report (and the
operator's step-time breakdown) is measured in.

A mark is two attribute writes and a clock read: no lock (the watchdog only reads), no device
sync. On CUDA the rank's own part of a step is timed with events, read once the step's loss has
reached the host (which waited for the device anyway).
"""

from __future__ import annotations

import time
from typing import Optional

import torch

# a step: its micro-batches' data, then forward and backward, the last micro-batch's backward
# (where data-parallel ranks exchange gradients: each waits for the slowest), the optimizer step
# and the step's record; under pipeline parallelism DeepSpeed's schedule is one call
DATA, FORWARD_BACKWARD, SYNC, OPTIMIZER, PIPELINE, LOG = (
    "data", "forward_backward", "gradient_sync", "optimizer", "pipeline", "log")
# between steps: the held-out evaluation and the checkpoint; around the run: building it, ending it
VALIDATE, SAVE, SETUP, FINISH = "validate", "save", "setup", "finish"
LONG_PHASES = (VALIDATE, SAVE, SETUP, FINISH)  # may take much longer than a step


class Heartbeat:
    """Where this rank is: the phase, since when, in which step (numbered from 1); and the rank's
    own part of the current step, from its start to the gradient synchronisation."""

    def __init__(self, device: torch.device):
        # (phase, since, step): one tuple, stored at once, so the watchdog never reads half a mark
        self.now = (SETUP, time.monotonic(), 0)
        self.steps_done = 0  # by this job
        self.slowest_step = 0.0  # seconds, of this job's steps
        self.last = {VALIDATE: 0.0, SAVE: 0.0}  # the last duration of each long phase
        self._cuda = device.type == "cuda"
        self._start: Optional[tuple] = None  # (host time, CUDA event) at the step's start
        self._split: Optional[tuple] = None  # ... at the gradient synchronisation

    def mark(self, phase: str, step: Optional[int] = None) -> None:
        now = time.monotonic()
        before, since, current = self.now
        if before in self.last:
            self.last[before] = now - since
        self.now = (phase, now, current if step is None else step)
        if phase == DATA:
            self._start, self._split = self._point(now), None
        elif phase == SYNC:
            self._split = self._point(now)

    def step_done(self, seconds: float) -> None:
        self.steps_done += 1
        self.slowest_step = max(self.slowest_step, seconds)

    def own_seconds(self) -> float:
        """The rank's own part of the step just taken: from its start to where it began waiting
        for the other data-parallel ranks (the whole step where no such point was marked).
        Called once the step's loss is on the host, so its CUDA events are done."""
        end = self._split or self._point(time.monotonic(), record=False)
        if self._cuda and self._start[1] is not None and end[1] is not None:
            return self._start[1].elapsed_time(end[1]) / 1e3
        return end[0] - self._start[0]

    def _point(self, now: float, record: bool = True) -> tuple:
        if not (self._cuda and record):
            return now, None
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return now, event
