"""Save and resume, end to end (torchtitan's CheckpointManager over a TrainState): which
checkpoint a start resumes from, agreed by every rank before anything is built and its content
checked in the background while the engine is built; loading it into the engine (resharded when
the layout changed: framework/checkpoint/reshard.py) and the data stream (any data-parallel size:
data_pipeline/loader.py); the run's ``TrainState``; ``init.from`` weights; when to save and the
atomic, checksummed save itself (checkpointer.py); and the bookkeeping of rollbacks.

The trainer hands it nothing but the step's wishes (``due``) and the validation of the step it
saves: the engine, the data stream and the state it saves are the ones it loaded into.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch

from framework.checkpoint.checkpointer import Checkpointer
from framework.checkpoint.resume import (Resume, RollbackRequest, RunRecord, TrainState,
                                         agree_on_resume, check_resumable, checkpoint_meta,
                                         damaged_anywhere, load_checkpoint, rollback_done)
from framework.config import CheckpointConfig, ModelConfig
from framework.parallel.world import World

__all__ = ["CheckpointManager", "RunRecord", "RollbackRequest", "TrainState"]


class CheckpointManager:
    def __init__(self, cfg: CheckpointConfig, root: Path, world: World, run: RunRecord,
                 log: Callable[[str], None], rollback: Optional[RollbackRequest] = None):
        """Collective: the checkpoint to resume from (``checkpoint.resume``; ``rollback``: an
        automatic rollback's, the newest intact one before the divergence) is agreed by every
        rank now, and the check of its content starts."""
        self.cfg, self.root, self.world, self.run, self.log = cfg, root, world, run, log
        self.checkpointer = Checkpointer(cfg, root, world, run.tokenizer, log)
        self.pending = agree_on_resume(
            cfg.resume, root, world,
            lambda path, meta: check_resumable(path, meta, run.config, run.tokenizer_sha256,
                                               run.tokenizer),
            log, now=run.layout, request=rollback)
        self.resume: Optional[Resume] = None  # what ``load`` resumed from
        self.engine = self.data = None
        self.state = TrainState()

    @property
    def resuming(self) -> bool:
        """Whether ``load`` will load a checkpoint (or the start fail): a resumed run keeps its
        own weights, ``init.from`` does not apply."""
        return self.pending.resuming

    def init_weights(self, model: torch.nn.Module, source: Path, cfg: ModelConfig) -> str:
        """``init.from``: this rank's slice of the weights at ``source`` (a checkpoint's content
        checked by every rank together: collective); returns what they were trained with."""
        from framework.checkpoint.source import init_from
        src = init_from(model, source, cfg, self.world.tp_rank, self.world.tp,
                        self.run.tokenizer_sha256[0], warn=self.log,
                        damaged=lambda tag: damaged_anywhere(tag, self.world))
        return f"{src.source} (trained with objective {src.objective})"

    def load(self, engine, data) -> TrainState:
        """The agreed checkpoint (a damaged one passed over) into the engine and the data
        stream, or a fresh state; from now on ``save`` saves these (collective)."""
        self.engine, self.data = engine, data
        self.resume = self.pending.finish()
        if self.resume is None:
            return self.state
        state = load_checkpoint(self.resume.path, engine, data, self.world, self.run.layout,
                                self.log)
        divergence = self.resume.divergence
        if divergence is not None:  # rolled back to this step: its own rate
            state.lr_factor, state.rollbacks = divergence["lr_factor"], divergence["rollbacks"]
            self.log(f"llada: the learning rate is x{state.lr_factor:g} of the schedule from "
                     f"step {state.step} on (rollback {state.rollbacks}: "
                     f"{divergence['reason']})")
        self.state = state
        return state

    @property
    def resumed_at(self) -> Optional[int]:
        return None if self.resume is None else self.resume.step

    @property
    def rolled_back(self) -> bool:
        return self.resume is not None and self.resume.rollback

    @property
    def rollback_history(self) -> list:
        """The run's automatic rollbacks so far (train.on_divergence=rollback), oldest first."""
        return [] if self.resume is None else list(self.resume.history)

    def rollback_done(self) -> None:
        """metrics.jsonl and MLflow have carried out a rollback: the next start from its step
        is an ordinary resume."""
        rollback_done(self.root, self.world)

    # ------------------------------------------------------------------ saving
    @property
    def async_save(self) -> bool:
        return self.checkpointer.async_save

    @property
    def completed(self):
        """(step, path, seconds) of the background saves completed since last taken."""
        return self.checkpointer.completed

    def due(self, step: int, final: bool, stop: bool = False):
        """(save, stop) after ``step``, agreed by every rank (collective)."""
        return self.checkpointer.due(step, final, stop)

    def request(self) -> None:
        """Save at the end of the current step (e.g. from a signal handler)."""
        self.checkpointer.request()

    def wait(self) -> None:
        """Until the last save is complete; a background save that failed raises here."""
        self.checkpointer.wait()

    def save(self, validation: Optional[dict] = None) -> Path:
        """The complete checkpoint of the state's step: the engine, the data stream, the RNG and
        the state (collective). ``validation``: {"set", "loss"} of this very step, for
        checkpoint.keep_best."""
        meta = checkpoint_meta(self.state, self.run)
        if validation is not None:
            meta["validation"] = validation
        return self.checkpointer.save(self.engine, self.state.step, meta,
                                      self.data.state_dict())
