"""The training loop: one Trainer whose ``train_step`` reads top to bottom (data, forward, loss,
backward, clip + step) and whose ``fit`` runs it to train.steps (log, checkpoint, stop). It is
built by factory.py, which hands it its components ready made.

DeepSpeed owns gradient accumulation, data-parallel reduction, ZeRO partitioning, clipping and the
optimizer step; megatron-core owns the tensor-parallel layers; the Trainer owns the order of
things, the schedule, non-finite steps and the run's progress.

Step numbers: ``self.step`` counts the optimizer steps done; the step being taken is number
``self.step + 1`` wherever a step is named (records, log lines, checkpoints, MLflow). The data
stream and the schedule index a step by the steps done before it (``self.step`` during it).
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import List, Optional

import torch
import torch.distributed as dist

from data_pipeline.errors import DataError
from data_pipeline.loader import PretrainLoader
from framework.checkpoint.checkpointer import CheckpointError
from framework.checkpoint.manager import CheckpointManager
from framework.config import TrainConfig
from framework.evaluation.validator import VAL_SECONDS, Validator
from framework.model.attention import set_training_mask
from framework.parallel.world import World
from framework.tracking.tracker import run_id_for_rank0
from framework.training.metrics import (CONSUMED_TOKENS, MetricsStream, StepResult,
                                        sum_over_data_parallel)
from framework.training.metrics import summary as make_summary
from framework.training.divergence import DivergenceWatch, RollbackNeeded, TrainingError
from framework.training.objective import Objective
from framework.training.phases import (DATA, FINISH, FORWARD_BACKWARD, LOG, OPTIMIZER, PIPELINE,
                                       SAVE, SYNC, VALIDATE, Heartbeat)
from framework.training.preemption import StopRequest
from framework.training.schedule import LearningRate
from framework.training.watchdog import Watchdog

__all__ = ["Trainer", "TrainingError"]


class Trainer:
    def __init__(self, cfg: TrainConfig, *, world: World, data: PretrainLoader, engine,
                 objective: Objective, lr: LearningRate, checkpoints: CheckpointManager,
                 metrics: MetricsStream, stop: StopRequest, validator: Optional[Validator] = None):
        """``checkpoints``: loaded into ``engine`` and ``data`` already; its state is the run's
        progress, which this advances and it saves. ``metrics``: the step records, their
        windows and summary.json; ``validator``: the held-out sets, evaluated when its config
        says (None: never)."""
        self.cfg, self.world, self.data, self.engine = cfg, world, data, engine
        self.objective, self.lr, self.checkpoints = objective, lr, checkpoints
        self.metrics, self.window, self.stop = metrics, metrics.window, stop
        self.validator = validator
        self.state = checkpoints.state
        self.log = world.log
        self.validations: dict = {}  # per set: this job's last and best evaluation
        self.accum = cfg.global_batch_size // (cfg.micro_batch_size * world.dp)
        self.history: List[StepResult] = []  # this job's steps
        self.divergence = DivergenceWatch(cfg, self.state.lr_factor, self.state.rollbacks,
                                          self.log, agree=self._any_rank)
        self.pipe_length: Optional[int] = None  # activation shape the pipeline last sent
        # the phases, marked once here: the watchdog watches them, the records time them
        self.beat = Heartbeat(world.device)
        self.watchdog = Watchdog(cfg, self.beat, world.rank)

    @property
    def step(self) -> int:
        """Optimizer steps done (the TrainState's)."""
        return self.state.step

    @step.setter
    def step(self, value: int) -> None:
        self.state.step = value

    @property
    def resume(self):
        """What this job resumed from (None: a fresh start)."""
        return self.checkpoints.resume

    # ------------------------------------------------------------------ one optimizer step
    def train_step(self) -> StepResult:
        start = time.perf_counter()
        self.beat.mark(DATA, self.step + 1)
        lr = self.lr.set(self.step, self.state.lr_factor)  # the factor: lowered by rollbacks

        # data: the step's micro-batches, made by the objective's collator (masked with a
        # per-sequence t seeded by each sample's global index, or shifted for the autoregressive
        # objective; the mixed objective's also clean, as next-token rows); 1% of steps cut to
        # a random length, alike on every rank
        batches = [self._next_batch() for _ in range(self.accum)]
        length = batches[0].noisy.shape[1]
        masked = sum(int(b.mask.sum()) for b in batches)  # host tensors: no device sync
        self.objective.start_step()
        # the step's attention, built alike on every rank: bidirectional, or (adapting an
        # autoregressive model) DiffuLLaMA's annealed mask and the mixed objective's causal rows
        set_training_mask(self.engine.module,
                          *self.objective.attention(self.step, batches[0].noisy.shape[0]))
        # forward, loss, backward, clip + optimizer step (skipped on a non-finite loss)
        try:
            if self.world.pp > 1:
                self.beat.mark(PIPELINE)
                loss = self._pipeline_step(batches, length)
            else:
                self.beat.mark(FORWARD_BACKWARD)
                loss = self._micro_steps(batches)
        finally:  # evaluation and inference attend as the trained model will: every key
            set_training_mask(self.engine.module)
        times = self.beat.times()  # the loss is on the host: the step's device work is done
        skipped = self.objective.end_step()
        grad_norm = None if skipped else self.engine.get_global_grad_norm()

        tokens = self.cfg.global_batch_size * length
        self.state.step += 1
        self.state.consumed_tokens += tokens
        self.state.skipped_steps += skipped
        return StepResult(step=self.step, loss=float("nan") if skipped else loss, lr=lr,
                          grad_norm=None if grad_norm is None else float(grad_norm),
                          tokens=tokens, seq_len=length, masked=masked,
                          seconds=time.perf_counter() - start, skipped=skipped, times=times)

    def _micro_steps(self, batches) -> float:
        """One process holds the whole model: forward, loss, backward per micro-batch; DeepSpeed
        scales by 1/accumulation, reduces over data parallel and steps at the boundary."""
        engine, device = self.engine, self.world.device
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # no host sync per micro
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            # the selected positions and their labels found on the host: no device sync
            labels = self.objective.labels(batch).to(device)
            noisy = batch.noisy.to(device, non_blocking=True)
            out = engine(noisy, select=labels.read)  # the head runs where the loss needs it
            loss = self.objective.loss(out, labels)
            if last:  # its backward reduces the gradients over data parallel: ranks wait there
                self.beat.mark(SYNC)
            engine.backward(loss)
            if last:
                self.beat.mark(OPTIMIZER)
            engine.step()
            loss_sum += loss.detach().double()
        self.beat.work_queued()  # what follows is the loss for the step's record
        dist.all_reduce(loss_sum, group=self.world.dp_group)
        return loss_sum.item() / (len(batches) * self.world.dp)

    def _pipeline_step(self, batches, length: int) -> float:
        """DeepSpeed's 1F1B schedule over the micro-batches: the first stage takes the inputs,
        the last the labels and the loss; the mean loss comes back to every stage."""
        if length != self.pipe_length:  # the 1% cut: stages must agree on new activation shapes
            self.engine.reset_activation_shape()
            self.pipe_length = length
        micro = iter([((b.noisy, self.objective.head_mask(b)),
                       (b.targets, b.mask, b.p_mask, b.norm)) for b in batches])
        return float(self.engine.train_batch(micro))

    def _any_rank(self, flag: bool) -> bool:
        """Whether any rank says so (collective): a verdict on a float every rank must share."""
        t = torch.tensor([float(flag)], device=self.world.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def _next_batch(self):
        try:
            batch = next(self.data)
        except DataError as e:
            raise TrainingError(f"data: {e}") from None
        if batch.step != self.step:  # a lost or repeated micro-batch must never pass silently
            raise TrainingError(f"data stream out of step: got a micro-batch of step index "
                                f"{batch.step} at step index {self.step}")
        return batch

    # ------------------------------------------------------------------ the run
    def fit(self) -> dict:
        steps = self.cfg.steps
        if self.stop.deadline is not None:
            end = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.stop.deadline))
            self.log(f"llada: the job ends at {end}: the run saves and stops before then")
        start = time.perf_counter()
        status = "running"
        self.watchdog.start()
        try:
            if self.step == 0 and self._evaluates(0, last=False):
                self.beat.mark(VALIDATE)
                self.metrics.write(0, {CONSUMED_TOKENS: 0, **self.validate()})
            while self.step < steps:
                result = self.train_step()
                self.beat.mark(LOG)
                self.beat.step_done(result.seconds)
                self.history.append(result)
                try:
                    self.divergence.observe(result)
                except (TrainingError, RollbackNeeded):
                    self._record(result, {})  # the step that diverged is on record too
                    raise
                due = self._evaluates(self.step, last=self.step == steps)
                if due:
                    self.beat.mark(VALIDATE)
                validation = self.validate() if due else {}
                self.beat.mark(LOG)
                # the deadline guard's slowest step: one that evaluates, when one does
                self.stop.note_step(result.seconds + validation.get(VAL_SECONDS, 0.0))
                self._record(result, validation)
                if self.maybe_checkpoint(final=self.step == steps):
                    self.log(f"llada: stopping after step {self.step}/{steps}: "
                             f"{self.stop.reason or 'another rank asked to stop'}; the checkpoint "
                             f"of step {self.step} is saved (this process ends once it is "
                             f"complete), the next start resumes from it")
                    break
            status = "completed" if self.step == steps else "stopped"
        except TrainingError:
            status = "diverged"
            raise
        except RollbackNeeded:
            status = "rolled_back"
            raise
        finally:
            self.beat.mark(SAVE)  # a background save may still be writing
            save_error = None
            try:
                self.data.close()
                try:
                    self.checkpoints.wait()  # a stop exits only once its save is complete
                except CheckpointError as e:  # the run's end is recorded all the same
                    save_error, status = e, "failed"
                self.beat.mark(FINISH)
                self._report_saves()
                summary = self._summary(status, time.perf_counter() - start)
                self.metrics.summary(summary)
            finally:  # never left armed: it would end this process later
                self.watchdog.stop()
            self.metrics.close(status)
            if save_error is not None:
                if sys.exc_info()[0] is not None:  # the error in flight goes on; this is told
                    self.log(f"llada: error: {save_error}")
                else:
                    raise save_error
        self.log(f"llada: {'done' if status == 'completed' else status}: {summary['steps']} "
                 f"steps, {summary['tokens']} tokens, loss {summary['first_loss']:.4f} -> "
                 f"{summary['last_loss']:.4f}, {summary['tokens_per_s']:.0f} tokens/s; "
                 f"{self.metrics.summary_path}")
        return summary

    def _record(self, result: StepResult, validation: dict) -> None:
        """The step into the window; at a logged or evaluated step, its one record to every
        sink (the first record of a step wins, so a step's values go out together)."""
        self.window.add(result)
        self.metrics.progress(result)
        if self.metrics.due(result.step):
            values = self.window.take(result, consumed_tokens=self.state.consumed_tokens,
                                      skipped_steps=self.state.skipped_steps,
                                      data_counters=self.data.counters,
                                      loss_by_t=self.objective.by_t,
                                      steps_left=self.cfg.steps - self.step,
                                      job_seconds_left=self.stop.seconds_left())
            self.metrics.write(result.step, {**values, **validation})
        elif validation:
            self.metrics.write(result.step, {CONSUMED_TOKENS: self.state.consumed_tokens,
                                             **validation})

    def _evaluates(self, step: int, last: bool) -> bool:
        return self.validator is not None and self.validator.cfg.due(step, last)

    def validate(self) -> dict:
        """The held-out sets on the weights after ``self.step`` steps (collective); this job's
        last and best of each set kept for summary.json and checkpoint.keep_best."""
        values = self.validator.evaluate()
        self.window.note("validation", values[VAL_SECONDS])
        for name, stats in self.validator.results.items():
            point = {"step": self.step, **{k: v for k, v in stats.items()
                                           if not k.startswith("loss_by_ratio/")}}
            entry = self.validations.setdefault(name, {"last": point, "best": point})
            entry["last"] = point
            if point["loss"] < entry["best"]["loss"] or math.isnan(entry["best"]["loss"]):
                entry["best"] = point  # a NaN never stays best
        return values

    # ------------------------------------------------------------------ checkpoints
    def maybe_checkpoint(self, final: bool) -> bool:
        """Save if due; whether the run stops here (both agreed by every rank)."""
        self._report_saves()
        save, stop = self.checkpoints.due(self.step, final, stop=self.stop.reason is not None)
        if save:
            start = time.perf_counter()
            self.beat.mark(SAVE)
            path = self.save_checkpoint()
            self.beat.mark(LOG)
            seconds = time.perf_counter() - start  # what the training waited
            self.window.note("checkpoint", seconds)
            if not self.checkpoints.async_save:
                self.stop.note_save(seconds)
                self.metrics.checkpoint(self.step, path, seconds)
        return stop

    def _report_saves(self) -> None:
        """The background saves completed since the last look: their record (the whole save's
        seconds, ``checkpoint/latest``) and the deadline guard's time for a save."""
        while self.checkpoints.completed:
            step, path, seconds = self.checkpoints.completed.popleft()
            self.stop.note_save(seconds)
            self.beat.last[SAVE] = max(self.beat.last[SAVE], seconds)  # the watchdog's bound
            self.metrics.checkpoint(step, path, seconds)

    def save_checkpoint(self) -> Path:
        """The complete checkpoint of this step (collective)."""
        self.state.run_id = run_id_for_rank0(self.metrics.tracker, self.world)
        validation = None
        if self.validations:  # the first set's loss at this very step: checkpoint.keep_best
            name, entry = next(iter(self.validations.items()))
            if entry["last"]["step"] == self.step:
                validation = {"set": name, "loss": entry["last"]["loss"]}
        return self.checkpoints.save(validation)

    def _summary(self, status: str, elapsed: float) -> dict:
        # after a failure the other ranks may not join a collective; after a stop they do
        counters = self.data.counters
        if status in ("completed", "stopped"):
            counters = sum_over_data_parallel(counters, self.world)
        return make_summary(
            self.history, status=status, tokens=sum(r.tokens for r in self.history),
            elapsed=elapsed, mfu=self.window.run_mfu(), final_step=self.step,
            # the FLOP counter's count, through the last record (every step of a completed job)
            flops=self.window.total_flops,
            stop_reason=self.stop.reason if status == "stopped" else None,
            skipped_steps=self.state.skipped_steps, data_skipped=counters,
            validation=self.validations or None, **self.metrics.facts)
