"""The hang watchdog: a rank whose run stops moving ends itself, so the job restarts.

A rank stuck in a collective whose peer died, on a filesystem that stopped answering, or behind a
deadlocked worker holds the whole job until NCCL's timeout (if one fires at all). Every rank runs
this thread; when its Heartbeat (framework/training/phases.py) stays in one phase longer than
that phase's limit, it writes every thread's Python stack to stderr, each line under its rank,
and exits with ``EXIT_HUNG``: a crash to framework/launch/llada.sbatch, which requeues the job,
and the next start resumes from the newest complete checkpoint. The peers of a hung rank wait in
a collective for it, so their watchdogs fire too and the job ends within the limit.

Limits: ``train.hang_timeout_minutes`` for a phase of a step (automatic: 10 x the slowest step so
far, at least 5 minutes); the first step of a start, validations and saves at least
``train.hang_floor_minutes`` (and 3 x the last validation or save). A thread that never lets go
of the GIL would keep this one from running: faulthandler's C watchdog, re-armed by this thread,
then dumps the stacks and exits (status 1, also a crash) a little later.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
import traceback
from typing import Callable, Optional

from framework.config import TrainConfig
from framework.training.phases import FINISH, LONG_PHASES, SAVE, VALIDATE, Heartbeat

EXIT_HUNG = 4  # llada.sbatch: a crash (requeued, at most LLADA_MAX_CRASH_RETRIES in a row)
AUTO_MIN_S, AUTO_STEPS = 300.0, 10.0  # automatic limit: at least 5 min, 10 x the slowest step
LONG_FACTOR = 3.0  # a save or validation may take 3 x its last duration


class Watchdog:
    def __init__(self, cfg: TrainConfig, beat: Heartbeat, rank: int,
                 clock: Callable[[], float] = time.monotonic):
        self.beat, self.rank, self.clock = beat, rank, clock
        self.fixed = None if cfg.hang_timeout_minutes is None else 60 * cfg.hang_timeout_minutes
        self.floor = 60 * cfg.hang_floor_minutes
        self.enabled = self.fixed != 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def limit(self, phase: str) -> float:
        """Seconds the rank may stay in ``phase`` before it counts as hung."""
        beat = self.beat
        step = self.fixed if self.fixed is not None else \
            max(AUTO_MIN_S, AUTO_STEPS * beat.slowest_step)
        if phase in LONG_PHASES:
            return max(step, self.floor, LONG_FACTOR * beat.last.get(phase, 0.0))
        if beat.steps_done == 0:  # compilation, the first batches, the first collectives
            return max(step, self.floor)
        return step

    def start(self) -> "Watchdog":
        if self.enabled:
            self._thread = threading.Thread(target=self._watch, name="llada-watchdog",
                                            daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.enabled:
            faulthandler.cancel_dump_traceback_later()

    def _watch(self) -> None:
        while not self._stop.is_set():
            phase, since, step = self.beat.now
            limit = self.limit(phase)
            stuck = self.clock() - since
            if stuck > limit:
                self._fire(phase, step, stuck, limit)
            # the backstop, should this thread ever be kept from running (fd 2: sys.stderr may
            # be replaced by an object without a file descriptor)
            faulthandler.dump_traceback_later(limit - stuck + max(30.0, 0.1 * limit), exit=True,
                                              file=2)
            self._stop.wait(min(5.0, max(0.1, (limit - stuck) / 2)))

    def _fire(self, phase: str, step: int, stuck: float, limit: float) -> None:
        where = f"phase {phase}" + (f" of step {step}" if phase not in (VALIDATE, SAVE, FINISH)
                                     else f" after step {step}")
        lines = [f"llada: watchdog: rank {self.rank}: no progress for {stuck:.0f} s in {where} "
                 f"(limit {limit:.0f} s: train.hang_timeout_minutes, train.hang_floor_minutes); "
                 f"every thread's stack follows; exiting {EXIT_HUNG} so that the job restarts "
                 "from its newest complete checkpoint"]
        names = {t.ident: t.name for t in threading.enumerate()}
        for ident, frame in sys._current_frames().items():
            if ident == threading.get_ident():
                continue  # this thread's own stack says nothing
            lines.append(f"thread {names.get(ident, ident)}:")
            lines += [part for entry in traceback.format_stack(frame)
                      for part in entry.rstrip("\n").split("\n")]
        text = "".join(f"[rank {self.rank}] {line}\n" for line in lines)
        try:
            os.write(2, text.encode(errors="replace"))
        finally:
            os._exit(EXIT_HUNG)
