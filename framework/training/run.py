"""A training run from its config to its end: the Trainer built and fitted, and built again from
a checkpoint each time the run diverges under ``train.on_divergence=rollback``
(framework/training/divergence.py)."""

from __future__ import annotations

import gc
from typing import Optional

import torch

from framework.config import Config, ConfigError
from framework.training.divergence import RollbackNeeded, TrainingError
from framework.training.factory import build_trainer
from framework.training.preemption import StopRequest


def run_training(cfg: Config, stop: Optional[StopRequest] = None,
                 recipe: Optional[str] = None) -> dict:
    """Fit to ``train.steps``; returns the summary of the last (or only) trainer. A rollback
    rebuilds everything from the checkpoint it goes back to, the way a restart would: the
    engine, the data stream at that checkpoint's position, the MLflow run (a child, from that
    step) and metrics.jsonl (later records set aside)."""
    request = None
    while True:
        try:
            trainer = build_trainer(cfg, stop, recipe=recipe, rollback=request)
        except ConfigError as e:
            if request is None:
                raise
            # nothing to go back to (no checkpoint yet) is the divergence's end, not bad input
            raise TrainingError(f"{request.reason}; the rollback failed: {e}") from None
        try:
            return trainer.fit()
        except RollbackNeeded as e:
            request = e.request
        # the old engine's memory back before the new one takes its own: DeepSpeed's hooks
        # keep an engine alive until it is destroyed
        trainer.engine.destroy()
        del trainer
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
