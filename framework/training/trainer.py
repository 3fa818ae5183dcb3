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

import json
import math
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from data_pipeline.errors import DataError
from data_pipeline.loader import PretrainLoader
from framework.checkpoint.checkpointer import Checkpointer, CheckpointError
from framework.checkpoint.resume import Progress, Resume
from framework.config import EvalConfig, TrainConfig
from framework.evaluation.validator import VAL_SECONDS, Validator
from framework.parallel.world import World
from framework.training.metrics import (CONSUMED_TOKENS, MetricsStream, StepResult, Window,
                                        sum_over_data_parallel)
from framework.training.metrics import summary as make_summary
from framework.training.divergence import DivergenceWatch, RollbackNeeded, TrainingError
from framework.training.objective import LossByT, ObjectiveLoss, masked_labels
from framework.training.optimizer import NonFiniteGuard
from framework.training.phases import (DATA, FINISH, FORWARD_BACKWARD, LOG, OPTIMIZER, PIPELINE,
                                       SAVE, SYNC, VALIDATE, Heartbeat)
from framework.training.preemption import StopRequest
from framework.training.watchdog import Watchdog, hang_forever, hang_hook

__all__ = ["Trainer", "TrainingError"]


class Trainer:
    def __init__(self, cfg: TrainConfig, *, world: World, data: PretrainLoader, engine,
                 optimizer: torch.optim.Optimizer, loss_fn: ObjectiveLoss, guard: NonFiniteGuard,
                 loss_by_t: LossByT, lr_at: Callable[[int], float], checkpointer: Checkpointer,
                 checkpoint_meta: Callable[[Progress], dict], metrics: MetricsStream,
                 window: Window, stop: StopRequest, progress: Progress, resume: Optional[Resume],
                 summary_path: Path, facts: dict, log: Callable[[str], None],
                 validator: Optional[Validator] = None, eval_cfg: EvalConfig = EvalConfig()):
        """``lr_at(step)``: the schedule; ``checkpoint_meta(progress)``: a checkpoint's meta.json
        (the MLflow run id added);
        ``facts``: what summary.json says of the run's setup (layout, precision, parameters);
        ``validator``: the held-out sets, evaluated when ``eval_cfg`` says (None: never)."""
        self.cfg, self.world, self.data, self.engine = cfg, world, data, engine
        self.optimizer, self.loss_fn, self.lr_at = optimizer, loss_fn, lr_at
        self.guard, self.loss_by_t = guard, loss_by_t
        self.checkpointer, self.checkpoint_meta = checkpointer, checkpoint_meta
        self.metrics, self.window, self.stop, self.resume = metrics, window, stop, resume
        self.summary_path, self.facts, self.log = summary_path, facts, log
        self.validator, self.eval_cfg = validator, eval_cfg
        self.validations: dict = {}  # per set: this job's last and best evaluation
        self.accum = cfg.global_batch_size // (cfg.micro_batch_size * world.dp)
        self.step = progress.step
        self.consumed_tokens = progress.consumed_tokens  # over the whole run, resumes included
        self.skipped_steps = progress.skipped_steps  # over the whole run, resumes included
        self.lr_factor, self.rollbacks = progress.lr_factor, progress.rollbacks
        self.history: List[StepResult] = []  # this job's steps
        self.divergence = DivergenceWatch(cfg, progress.lr_factor, progress.rollbacks, log,
                                          agree=self._any_rank)
        self.pipe_length: Optional[int] = None  # activation shape the pipeline last sent
        # the phases, marked once here: the watchdog watches them, the records time them
        self.beat = Heartbeat(world.device)
        self.watchdog = Watchdog(cfg, self.beat, world.rank)
        self._hang_at = hang_hook(world.rank) if progress.step == 0 else None  # tests only

    # ------------------------------------------------------------------ one optimizer step
    def train_step(self) -> StepResult:
        start = time.perf_counter()
        self.beat.mark(DATA, self.step + 1)
        if self._hang_at == self.step + 1:
            hang_forever(self.world.rank, self.step + 1)
        lr = self.lr_factor * self.lr_at(self.step)  # the factor: lowered by each rollback
        for group in self.optimizer.param_groups:
            group["lr"] = lr

        # data: the step's micro-batches, made by the objective's collator (masked with a
        # per-sequence t seeded by each sample's global index, or shifted for the autoregressive
        # objective); 1% of steps cut to a random length, alike on every rank
        batches = [self._next_batch() for _ in range(self.accum)]
        length = batches[0].noisy.shape[1]
        masked = sum(int(b.mask.sum()) for b in batches)  # host tensors: no device sync
        self.guard.reset()
        # forward, loss, backward, clip + optimizer step (skipped on a non-finite loss)
        if self.world.pp > 1:
            self.beat.mark(PIPELINE)
            loss = self._pipeline_step(batches, length)
        else:
            self.beat.mark(FORWARD_BACKWARD)
            loss = self._micro_steps(batches)
        times = self.beat.times()  # the loss is on the host: the step's device work is done
        skipped = self.guard.verdict()
        self.loss_by_t.end_step(keep=not skipped)
        grad_norm = None if skipped else self.engine.get_global_grad_norm()

        self.step += 1
        tokens = self.cfg.global_batch_size * length
        self.consumed_tokens += tokens
        self.skipped_steps += skipped
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
            labels = masked_labels(batch.targets, batch.mask, batch.p_mask, batch.norm).to(device)
            noisy = batch.noisy.to(device, non_blocking=True)
            out = engine(noisy, select=labels.positions)  # the head runs where the loss needs it
            loss = self.loss_fn(out, labels)
            if last:  # its backward reduces the gradients over data parallel: ranks wait there
                self.beat.mark(SYNC)
            engine.backward(loss)
            if last:
                self.beat.mark(OPTIMIZER)
            engine.step()
            loss_sum += loss.detach().double()
        self.beat.work_queued()  # what follows is the loss for the step's record
        dist.all_reduce(loss_sum, group=parallel_state.get_data_parallel_group())
        return loss_sum.item() / (len(batches) * self.world.dp)

    def _pipeline_step(self, batches, length: int) -> float:
        """DeepSpeed's 1F1B schedule over the micro-batches: the first stage takes the inputs,
        the last the labels and the loss; the mean loss comes back to every stage."""
        if length != self.pipe_length:  # the 1% cut: stages must agree on new activation shapes
            self.engine.reset_activation_shape()
            self.pipe_length = length
        micro = iter([((b.noisy, b.mask), (b.targets, b.mask, b.p_mask, b.norm))
                      for b in batches])
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
            if self.step == 0 and self.validator is not None and self.eval_cfg.due(0, False):
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
                due = self.validator is not None and self.eval_cfg.due(self.step,
                                                                        self.step == steps)
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
                    self.checkpointer.wait()  # a stop exits only once its save is complete
                except CheckpointError as e:  # the run's end is recorded all the same
                    save_error, status = e, "failed"
                self.beat.mark(FINISH)
                self._report_saves()
                summary = self._summary(status, time.perf_counter() - start)
                if self.world.is_main:
                    self.summary_path.write_text(json.dumps(summary, indent=2) + "\n")
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
                 f"{self.summary_path}")
        return summary

    def _record(self, result: StepResult, validation: dict) -> None:
        """The step into the window; at a logged or evaluated step, its one record to every
        sink (the first record of a step wins, so a step's values go out together)."""
        self.window.add(result)
        self.metrics.progress(result)
        if self.metrics.due(result.step):
            values = self.window.take(result, consumed_tokens=self.consumed_tokens,
                                      skipped_steps=self.skipped_steps,
                                      data_counters=self.data.counters, loss_by_t=self.loss_by_t,
                                      steps_left=self.cfg.steps - self.step,
                                      job_seconds_left=self.stop.seconds_left())
            self.metrics.write(result.step, {**values, **validation})
        elif validation:
            self.metrics.write(result.step, {CONSUMED_TOKENS: self.consumed_tokens, **validation})

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
        save, stop = self.checkpointer.due(self.step, final, stop=self.stop.reason is not None)
        if save:
            start = time.perf_counter()
            self.beat.mark(SAVE)
            path = self.save_checkpoint()
            self.beat.mark(LOG)
            seconds = time.perf_counter() - start  # what the training waited
            self.window.note("checkpoint", seconds)
            if not self.checkpointer.async_save:
                self.stop.note_save(seconds)
                self.metrics.checkpoint(self.step, path, seconds)
        return stop

    def _report_saves(self) -> None:
        """The background saves completed since the last look: their record (the whole save's
        seconds, ``checkpoint/latest``) and the deadline guard's time for a save."""
        while self.checkpointer.completed:
            step, path, seconds = self.checkpointer.completed.popleft()
            self.stop.note_save(seconds)
            self.beat.last[SAVE] = max(self.beat.last[SAVE], seconds)  # the watchdog's bound
            self.metrics.checkpoint(step, path, seconds)

    def save_checkpoint(self) -> Path:
        """The complete checkpoint of this step (collective)."""
        progress = Progress(self.step, self.consumed_tokens, self.skipped_steps,
                            lr_factor=self.lr_factor, rollbacks=self.rollbacks)
        meta = self.checkpoint_meta(progress)
        if self.validations:  # the first set's loss at this very step: checkpoint.keep_best
            name, entry = next(iter(self.validations.items()))
            if entry["last"]["step"] == self.step:
                meta["validation"] = {"set": name, "loss": entry["last"]["loss"]}
        return self.checkpointer.save(self.engine, self.step, meta, self.data.state_dict())

    def _summary(self, status: str, elapsed: float) -> dict:
        # after a failure the other ranks may not join a collective; after a stop they do
        counters = self.data.counters
        if status in ("completed", "stopped"):
            counters = sum_over_data_parallel(counters, self.world.device)
        return make_summary(
            self.history, status=status, tokens=sum(r.tokens for r in self.history),
            elapsed=elapsed, mfu=self.window.run_mfu(), final_step=self.step,
            # the FLOP counter's count, through the last record (every step of a completed job)
            flops=self.window.total_flops,
            stop_reason=self.stop.reason if status == "stopped" else None,
            skipped_steps=self.skipped_steps, data_skipped=counters,
            validation=self.validations or None, **self.facts)
