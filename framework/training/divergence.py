"""When a run diverges, and what then: ``train.on_divergence``.

A run diverges when its loss is non-finite for ``train.max_consecutive_nonfinite`` steps in a row
(each of them skipped: the weights stay as they were) or, with ``rollback``, when it stays above
``train.spike_factor`` times the median of the last ``SPIKE_HISTORY`` good steps for
``train.spike_steps`` steps in a row. ``stop``: the run ends with a TrainingError (exit 1).
``rollback``: ``RollbackNeeded`` carries the request up to framework/training/run.py, which
rebuilds the run from the newest complete checkpoint before the divergence began with the
learning rate times ``train.rollback_lr_factor`` (the LLaDA authors' remedy at 1.2T tokens: 4e-4
-> 1e-4), the same data replayed; at most ``train.max_rollbacks`` times over the run.

The non-finite verdict is agreed by the guard; a spike's is agreed by one tiny all-reduce per
step (with rollback only, once SPIKE_MIN_HISTORY steps are in): data-parallel groups of
different tensor ranks reduce their losses separately, and a last-bit difference right at the
limit must not split the ranks.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Callable

from framework.checkpoint.resume import RollbackRequest
from framework.config import TrainConfig
from framework.training.metrics import StepResult

SPIKE_HISTORY = 100  # good steps the median is taken over
SPIKE_MIN_HISTORY = 10  # no spike is called before this many good steps of this job


class TrainingError(RuntimeError):
    """The run cannot continue (e.g. the loss keeps diverging). One line, names the cause."""


class RollbackNeeded(Exception):
    """The run diverged under ``train.on_divergence=rollback``: rebuild it from a checkpoint."""

    def __init__(self, request: RollbackRequest):
        super().__init__(request.reason)
        self.request = request


class DivergenceWatch:
    """Fed every step's result; raises when the run has diverged."""

    def __init__(self, cfg: TrainConfig, lr_factor: float, rollbacks: int,
                 log: Callable[[str], None], agree: Callable[[bool], bool] = lambda flag: flag):
        """``agree(flag)``: whether any rank's flag is set (collective): the losses every rank
        holds are equal up to the last bit only where one reduction made them."""
        self.cfg, self.lr_factor, self.rollbacks, self.log = cfg, lr_factor, rollbacks, log
        self.agree = agree
        self.nonfinite = 0  # steps in a row
        self.spikes = 0  # steps in a row above the limit
        self.recent: deque = deque(maxlen=SPIKE_HISTORY)

    def observe(self, result: StepResult) -> None:
        limit = self.cfg.max_consecutive_nonfinite
        if result.skipped:
            self.nonfinite += 1
            self.log(f"llada: warning: step {result.step}: non-finite loss, step skipped "
                     f"({self.nonfinite} in a row, limit {limit})")
            if self.nonfinite >= limit:
                self._diverged(result.step - limit + 1, (
                    f"{limit} consecutive steps had a non-finite loss (steps "
                    f"{result.step - limit + 1}..{result.step}; "
                    f"train.max_consecutive_nonfinite={limit})"))
            return
        self.nonfinite = 0
        if self.cfg.on_divergence != "rollback" or not math.isfinite(result.loss):
            return
        if len(self.recent) >= SPIKE_MIN_HISTORY:
            median = statistics.median(self.recent)
            if self.agree(result.loss > self.cfg.spike_factor * median):
                self.spikes += 1
                if self.spikes >= self.cfg.spike_steps:
                    first = result.step - self.spikes + 1
                    self._diverged(first, (
                        f"the loss stayed above train.spike_factor={self.cfg.spike_factor:g} x "
                        f"its recent median {median:.4f} for {self.spikes} steps (steps "
                        f"{first}..{result.step}, {result.loss:.4f} at the last)"))
                return  # a spike never enters the median it is judged by
        self.spikes = 0
        self.recent.append(result.loss)

    def _diverged(self, first: int, why: str) -> None:
        cfg = self.cfg
        if cfg.on_divergence == "stop":
            raise TrainingError(f"{why}: stopping (train.on_divergence=stop); lower "
                                "optimizer.lr or resume from an earlier checkpoint")
        if self.rollbacks >= cfg.max_rollbacks:
            raise TrainingError(f"{why}: stopping, {self.rollbacks} rollbacks done already "
                                f"(train.max_rollbacks={cfg.max_rollbacks})")
        factor = self.lr_factor * cfg.rollback_lr_factor
        self.log(f"llada: divergence: {why}: rolling back to the newest complete checkpoint "
                 f"before step {first}, the learning rate x{factor:g} of the schedule from "
                 f"there (train.rollback_lr_factor={cfg.rollback_lr_factor:g}), rollback "
                 f"{self.rollbacks + 1} of at most {cfg.max_rollbacks}")
        raise RollbackNeeded(RollbackRequest(before=first, lr_factor=factor,
                                             rollbacks=self.rollbacks + 1, reason=why))
