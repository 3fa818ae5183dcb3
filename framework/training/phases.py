"""The phases of a run, marked once, here, by the trainer: what the hang watchdog watches
(framework/training/watchdog.py) and what the per-rank step time of the straggler report (and the
operator's step-time breakdown) is measured in.

A mark is two attribute writes and a clock read (and, inside a step on CUDA, an event recorded):
no lock (the watchdog only reads), no device sync. On CUDA a step's parts are timed with those
events, read once the step's loss has reached the host (which waited for the device anyway).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

# a step: its micro-batches' data, then forward and backward, the last micro-batch's backward
# (where data-parallel ranks exchange gradients: each waits for the slowest), the optimizer step
# and the step's record; under pipeline parallelism DeepSpeed's schedule is one call
DATA, FORWARD_BACKWARD, SYNC, OPTIMIZER, PIPELINE, LOG = (
    "data", "forward_backward", "gradient_sync", "optimizer", "pipeline", "log")
# between steps: the held-out evaluation and the checkpoint; around the run: building it, ending it
VALIDATE, SAVE, SETUP, FINISH = "validate", "save", "setup", "finish"
LONG_PHASES = (VALIDATE, SAVE, SETUP, FINISH)  # may take much longer than a step
# the marks that time a step, from DATA (its start); QUEUED: its device work is all queued (a
# point, not a phase: a hang in what follows is still the optimizer's, to the watchdog)
QUEUED = "queued"
STEP_PHASES = (DATA, FORWARD_BACKWARD, PIPELINE, SYNC, OPTIMIZER)


@dataclass
class StepTimes:
    """A step's seconds: the rank's own part (until it waits for the other data-parallel ranks,
    at the gradient synchronisation: what the straggler report compares), and its split into
    waiting for data, forward and backward, and the optimizer step."""
    own: float
    data: float
    forward_backward: float
    optimizer: float


class Heartbeat:
    """Where this rank is: the phase, since when, in which step (numbered from 1); and where the
    current step's time went, from the points marked in it."""

    def __init__(self, device: torch.device):
        # (phase, since, step): one tuple, stored at once, so the watchdog never reads half a mark
        self.now = (SETUP, time.monotonic(), 0)
        self.steps_done = 0  # by this job
        self.slowest_step = 0.0  # seconds, of this job's steps
        self.last = {VALIDATE: 0.0, SAVE: 0.0}  # the last duration of each long phase
        self._cuda = device.type == "cuda"
        # the current step's marks: phase -> (host time, CUDA event or None), from its DATA mark
        # until its times are taken
        self._points: Optional[Dict[str, Tuple[float, Optional[object]]]] = None

    def mark(self, phase: str, step: Optional[int] = None) -> None:
        now = time.monotonic()
        before, since, current = self.now
        if before in self.last:
            self.last[before] = now - since
        self.now = (phase, now, current if step is None else step)
        if phase == DATA:
            self._points = {}
        if self._points is not None and phase in STEP_PHASES and phase not in self._points:
            self._points[phase] = (now, _event(self._cuda))

    def work_queued(self) -> None:
        """The step's device work is all queued: what follows is the loss for its record."""
        if self._points is not None:
            self._points[QUEUED] = (time.monotonic(), _event(self._cuda))

    def step_done(self, seconds: float) -> None:
        self.steps_done += 1
        self.slowest_step = max(self.slowest_step, seconds)

    def times(self) -> StepTimes:
        """Where the step just taken went. Called once its loss is on the host, so the device
        work up to its last mark is done and its CUDA events can be read without a sync. The
        data wait is host time (the device has nothing queued then); the rest, device time on
        CUDA. Under pipeline parallelism DeepSpeed's schedule is one call: its host time, which
        ends when the loss reaches the host, is forward_backward (the optimizer's part is taken
        out of it at the record, from an OptimizerTimer)."""
        now = time.monotonic()
        p, self._points = self._points, None
        start = p[DATA]
        pipeline = p.get(PIPELINE)
        if pipeline is not None:
            return StepTimes(own=now - start[0], data=pipeline[0] - start[0],
                             forward_backward=now - pipeline[0], optimizer=0.0)
        compute, optimizer = p[FORWARD_BACKWARD], p[OPTIMIZER]
        end = p.get(QUEUED, (now, None))
        return StepTimes(own=_span(start, p.get(SYNC, end)), data=compute[0] - start[0],
                         forward_backward=_span(compute, optimizer),
                         optimizer=_span(optimizer, end))


class OptimizerTimer:
    """The optimizer step's seconds where the trainer cannot mark it: inside DeepSpeed's pipeline
    schedule, one call (``train_batch``). It wraps, on that instance, the step of the optimizer
    DeepSpeed calls (ZeRO's, or ours); CUDA events on CUDA, read by ``take`` once the step's loss
    is on the host. DeepSpeed's own wall-clock timers would measure it, but with them on its
    pipeline engine starts its backward timer twice and fails (DeepSpeed 0.19.8)."""

    def __init__(self, optimizer, device: torch.device):
        self._cuda = device.type == "cuda"
        self._spans: list = []
        step = optimizer.step

        def timed(*args, **kwargs):
            start = (time.monotonic(), _event(self._cuda))
            try:
                return step(*args, **kwargs)
            finally:
                self._spans.append((start, (time.monotonic(), _event(self._cuda))))
        optimizer.step = timed

    def take(self) -> float:
        """Seconds in the optimizer's steps since the last call."""
        spans, self._spans = self._spans, []
        return sum(_span(a, b) for a, b in spans)


def _span(a: tuple, b: tuple) -> float:
    """Seconds between two (host time, CUDA event or None) points: device time where both have
    an event (done: the caller waited for the step's loss), host time otherwise."""
    if a[1] is not None and b[1] is not None:
        return a[1].elapsed_time(b[1]) / 1e3
    return b[0] - a[0]


def _event(cuda: bool):
    if not cuda:
        return None
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event
