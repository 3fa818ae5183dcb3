"""The training loop: one Trainer whose ``train_step`` reads top to bottom
(data, forward, loss, backward, clip + step, log, checkpoint).

DeepSpeed owns gradient accumulation, data-parallel reduction, ZeRO partitioning, clipping and the
optimizer step; megatron-core owns the tensor-parallel layers; this file owns the LLaDA objective,
the schedule, non-finite handling, logging and the run directory.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

import framework.parallel

from data_pipeline.collate import MaskCollator
from data_pipeline.datasets import open_datasets
from data_pipeline.loader import DataError, PretrainLoader
from data_pipeline.shards import ShardSet
from data_pipeline.tokenizer import atomic_write
from framework.checkpoint import (CheckpointError, Checkpointer, rank_file, read_meta,
                                  resolve_resume, set_aside_newer, set_rng_state)
from framework.config import Config, ConfigError, check_world, to_dict, to_yaml
from framework.deepspeed_config import deepspeed_json
from framework.flops import peak_flops, train_flops_per_token
from framework.layout import recompute_flags, stage_bounds
from framework.model.model import (Layer, LLaDAModel, piece_specs,
                                   transformer_config, vocab_cross_entropy)
from framework.model.pipeline import LLaDAPipeline
from framework.model.weights import full_shape, init_weights, shard
from framework.objective import PretrainLoss
from framework.optimizer import NonFiniteGuard, SkippableAdamW, param_groups
from framework.parallel import (DeepSpeedMPU, World, init_world,
                                reduce_sequence_parallel_grads)
from framework.preemption import StopRequest, deadline_from_env, stop_signals
from framework.schedule import wsd_lr

SUMMARY_WINDOW = 10  # first_loss / last_loss: means over this many steps


class TrainingError(RuntimeError):
    """The run cannot continue (e.g. the loss keeps diverging). One line, names the cause."""


@dataclass
class StepResult:
    step: int
    loss: float  # mean over micro-batches and data-parallel ranks; NaN when skipped
    lr: float
    grad_norm: Optional[float]
    tokens: int  # tokens in this step's global batch
    seq_len: int  # after the 1% variable-length cut
    skipped: bool


def _log(world: World, msg: str) -> None:
    if world.is_main:
        print(msg, flush=True)


def check_data(cfg: Config, sets: List[ShardSet]) -> int:
    """The datasets against the model and objective; returns the mask id to use."""
    ids = sets[0].special_ids
    if cfg.objective.mask_id is not None and cfg.objective.mask_id != ids["mask"]:
        raise ConfigError(f"objective.mask_id: {cfg.objective.mask_id}, but the tokenizer of "
                          f"{sets[0].manifest} has the mask token at id {ids['mask']}")
    if sets[0].vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size: {cfg.model.vocab_size} is smaller than the "
                          f"tokenizer's {sets[0].vocab_size} pieces ({sets[0].manifest})")
    return ids["mask"]


class Trainer:
    def __init__(self, cfg: Config, stop: Optional[StopRequest] = None,
                 recipe: Optional[str] = None):
        """``stop``: the signal handler the CLI installed before anything slow started; by
        default only the deadline guard (``LLADA_DEADLINE``) can stop the run early.
        ``recipe``: where the config came from (a tag of the MLflow run)."""
        import deepspeed

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        self.cfg = cfg
        self.stop = stop if stop is not None else StopRequest(cfg.preemption, deadline_from_env())
        self.world = world = init_world(cfg.parallel, cfg.run.device)
        self.run_dir = Path(cfg.run.dir)

        tc = cfg.train
        check_world(tc, cfg.parallel, world.world_size)
        self.accum = tc.global_batch_size // (tc.micro_batch_size * world.dp)
        on_gpu = world.device.type == "cuda"
        self.bf16 = tc.precision == "bf16" or (tc.precision == "auto" and on_gpu)
        sp = cfg.parallel.sequence_parallel
        if sp:
            framework.parallel.check_sequence_parallel(world.device)

        sets = open_datasets(cfg.data, world.is_main, dist.barrier)
        self.mask_id = check_data(cfg, sets)
        # every rank reads the data, pipeline stages too: all ranks of a tensor/pipeline group
        # then hold the same batches (and the same loader state) without any broadcast
        self.data = PretrainLoader(
            cfg.data, sets, [d.weight for d in cfg.data.datasets],
            MaskCollator(cfg.objective, self.mask_id, cfg.data.seq_len,
                         length_multiple=world.tp if sp else 1),
            micro_batch_size=tc.micro_batch_size, accumulation=self.accum,
            dp_rank=world.dp_rank, dp_size=world.dp, pin_memory=on_gpu,
            ignore_signals=stop_signals(cfg.preemption))

        self.tokenizer = sets[0].tokenizer_path
        self.tokenizer_hashes = [ds.tokenizer_sha256 for ds in sets]
        self.special_ids = sets[0].special_ids
        self.checkpointer = Checkpointer(cfg.checkpoint, self.run_dir / "checkpoints", world,
                                         lambda msg: _log(world, msg))
        self.resume_from = self._resume_path()

        self.guard = NonFiniteGuard(world.device)
        self.loss_fn = PretrainLoss(vocab_cross_entropy, self.guard.observe)
        torch.manual_seed(cfg.run.seed)
        if on_gpu:  # megatron's per-tensor-rank CUDA generators
            from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
            model_parallel_cuda_manual_seed(cfg.run.seed)
        model = self._build_model(on_gpu)
        oc = cfg.optimizer
        self.optimizer = SkippableAdamW(
            param_groups(model, oc.weight_decay), lr=oc.lr, betas=(oc.beta1, oc.beta2), eps=oc.eps,
            fused=on_gpu, guard=self.guard)
        ds_cfg = deepspeed_json(cfg.deepspeed, micro_batch_size=tc.micro_batch_size,
                                grad_accumulation=self.accum, data_parallel_size=world.dp,
                                bf16=self.bf16, grad_clip=oc.grad_clip,
                                pipeline_partitioned=not sp)
        # a PipelineModule brings its own topology (same groups); DeepSpeed then refuses an mpu
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=self.optimizer, config=ds_cfg,
            mpu=None if world.pp > 1 else DeepSpeedMPU)
        self.pipe_length: Optional[int] = None  # activation shape the pipeline last sent
        self.flops_per_token = train_flops_per_token(cfg.model, cfg.data.seq_len)
        self.peak = peak_flops(torch.cuda.get_device_name(world.device)) if on_gpu else None

        self.step = 0
        self.consumed_tokens = 0  # over the whole run, resumes included
        self.skipped_before = 0  # skipped steps of the jobs before this one (resumed)
        self.tracking_run_id: Optional[str] = None  # the MLflow run of the checkpoint resumed
        self.history: List[StepResult] = []
        self.consecutive_nonfinite = 0
        self.metrics_path = self.run_dir / "metrics.jsonl"
        if self.resume_from is not None:
            self.load_checkpoint(self.resume_from)
        if world.is_main:  # only now: a refused resume leaves the run's config as it was
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(to_yaml(cfg))
            if self.metrics_path.exists():  # records of steps this run makes (again) go
                self._truncate_metrics()
        self.tracker = self._open_tracker(recipe)

    def _build_model(self, on_gpu: bool) -> torch.nn.Module:
        """The pieces of the model, all in one module or cut into this rank's pipeline stage;
        initialised alike under every layout (framework/model/weights.py)."""
        cfg, world = self.cfg, self.world
        mcfg = transformer_config(cfg.model, tensor_parallel=world.tp,
                                  params_dtype=torch.bfloat16 if self.bf16 else torch.float32,
                                  on_cpu=not on_gpu,
                                  sequence_parallel=cfg.parallel.sequence_parallel)
        bounds = stage_bounds(cfg.model.num_layers, world.pp, cfg.parallel.pp_layers)
        recompute = recompute_flags(cfg.model.num_layers, bounds,
                                    cfg.train.activation_checkpointing,
                                    cfg.train.checkpoint_layers)
        specs = piece_specs(cfg.model, mcfg, recompute)
        if world.pp > 1:
            model = LLaDAPipeline(specs, bounds, self.loss_fn, tp=world.tp, pp=world.pp,
                                  dp=world.dp)
        else:
            model = LLaDAModel([spec.build() for spec in specs])
        init_weights(model, cfg.model, cfg.run.seed, world.tp_rank, world.tp)
        if cfg.init.from_ and self.resume_from is None:  # a resumed run has its own weights
            self._load_hf_weights(model, Path(cfg.init.from_))
        if cfg.parallel.sequence_parallel:
            reduce_sequence_parallel_grads(model)
        # whole-model count: this rank's slices at full size, summed over pipeline stages
        count = torch.tensor(sum(full_shape(n, p.shape, world.tp).numel()
                                 for n, p in model.named_parameters()), device=world.device)
        dist.all_reduce(count, group=parallel_state.get_pipeline_model_parallel_group())
        self.num_params = int(count.item())
        if cfg.train.compile:
            for module in model.modules():
                if isinstance(module, Layer):
                    module.compile()
        return model

    # ------------------------------------------------------------------ one optimizer step
    def train_step(self) -> StepResult:
        cfg, world = self.cfg, self.world
        lr = wsd_lr(self.step, cfg.train.steps, cfg.optimizer.lr, cfg.schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

        # data: the step's micro-batches, masked by the collator (per-sequence t, seeded by each
        # sample's global index); 1% of steps cut to a random length, alike on every rank
        batches = [self._next_batch() for _ in range(self.accum)]
        length = batches[0].noisy.shape[1]
        self.guard.reset()
        # forward, loss, backward, clip + optimizer step (skipped on a non-finite loss)
        if world.pp > 1:
            loss = self._pipeline_step(batches, length)
        else:
            loss = self._micro_steps(batches)
        skipped = self.guard.verdict()
        self.loss_fn.by_t.end_step(keep=not skipped)
        grad_norm = None if skipped else self.engine.get_global_grad_norm()
        result = StepResult(step=self.step, loss=float("nan") if skipped else loss, lr=lr,
                            grad_norm=None if grad_norm is None else float(grad_norm),
                            tokens=cfg.train.global_batch_size * length, seq_len=length,
                            skipped=skipped)
        self.step += 1
        self.consumed_tokens += result.tokens
        return result

    def _micro_steps(self, batches) -> float:
        """One process holds the whole model: forward, loss, backward per micro-batch; DeepSpeed
        scales by 1/accumulation, reduces over data parallel and steps at the boundary."""
        engine, device = self.engine, self.world.device
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # no host sync per micro
        for batch in batches:
            noisy, targets, mask, p_mask = (x.to(device, non_blocking=True) for x in
                                            (batch.noisy, batch.targets, batch.mask, batch.p_mask))
            logits = engine(noisy, select=mask)  # the head runs at masked positions only
            loss = self.loss_fn(logits, (targets, mask, p_mask))
            engine.backward(loss)
            engine.step()
            loss_sum += loss.detach().double()
        dist.all_reduce(loss_sum, group=parallel_state.get_data_parallel_group())
        return loss_sum.item() / (len(batches) * self.world.dp)

    def _pipeline_step(self, batches, length: int) -> float:
        """DeepSpeed's 1F1B schedule over the micro-batches: the first stage takes the inputs,
        the last the labels and the loss; the mean loss comes back to every stage."""
        if length != self.pipe_length:  # the 1% cut: stages must agree on new activation shapes
            self.engine.reset_activation_shape()
            self.pipe_length = length
        micro = iter([((b.noisy, b.mask), (b.targets, b.mask, b.p_mask)) for b in batches])
        return float(self.engine.train_batch(micro))

    def _next_batch(self):
        try:
            batch = next(self.data)
        except DataError as e:
            raise TrainingError(f"data: {e}") from None
        if batch.step != self.step:  # a lost or repeated micro-batch must never pass silently
            raise TrainingError(f"data stream out of step: got a micro-batch of step {batch.step} "
                                f"at step {self.step}")
        return batch

    def _mfu(self, tokens_per_s: float) -> Optional[float]:
        """Model FLOPs utilisation against the accelerator's peak; None where unknown (CPU)."""
        if self.peak is None:
            return None
        return tokens_per_s * self.flops_per_token / (self.peak * self.world.world_size)

    # ------------------------------------------------------------------ the run
    def fit(self) -> dict:
        cfg, world = self.cfg, self.world
        steps = cfg.train.steps
        _log(world, f"llada: {self.num_params / 1e6:.2f}M parameters on {world.device}, "
                    f"world {world.world_size} (tp {world.tp}, pp {world.pp}, dp {world.dp}), "
                    f"ZeRO-{cfg.deepspeed.zero_stage}, {'bf16' if self.bf16 else 'fp32'}, "
                    f"global batch {cfg.train.global_batch_size} = {cfg.train.micro_batch_size} "
                    f"x {self.accum} accumulation x {world.dp} data-parallel")
        from tqdm import tqdm
        show_bar = world.is_main and cfg.tracking.progress_bar and sys.stderr.isatty()
        bar = tqdm(total=steps, disable=not show_bar, dynamic_ncols=True, desc="train")
        if self.stop.deadline is not None:
            end = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.stop.deadline))
            _log(world, f"llada: the job ends at {end}: the run saves and stops before then")
        start = window_start = time.perf_counter()
        window_tokens = total_tokens = 0
        status = "running"
        try:
            while self.step < steps:
                step_start = time.perf_counter()
                result = self.train_step()
                self.stop.note_step(time.perf_counter() - step_start)
                self.history.append(result)
                total_tokens += result.tokens
                window_tokens += result.tokens
                self._check_nonfinite(result)
                bar.update(1)
                if not result.skipped:
                    bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{result.lr:.2e}")
                if self.step % cfg.tracking.log_interval == 0 or self.step == steps:
                    now = time.perf_counter()
                    self._log_step(result, window_tokens / max(now - window_start, 1e-9))
                    window_start, window_tokens = now, 0
                if self._maybe_checkpoint(final=self.step == steps):
                    _log(world, f"llada: stopping after step {self.step}/{steps}: "
                                f"{self.stop.reason or 'another rank asked to stop'}; the "
                                f"checkpoint of step {self.step} is saved, the next start "
                                f"resumes from it")
                    break
            status = "completed" if self.step == steps else "stopped"
        except TrainingError:
            status = "diverged"
            raise
        finally:
            bar.close()
            self.data.close()
            self.checkpointer.wait()
            elapsed = time.perf_counter() - start
            summary = self._summary(total_tokens, elapsed, status)
            if world.is_main:
                (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            if self.tracker is not None:  # a stopped run is resumed: KILLED until it is
                self.tracker.close({"completed": "FINISHED", "stopped": "KILLED"}.get(status,
                                                                                  "FAILED"))
        _log(world, f"llada: {'done' if status == 'completed' else status}: "
                    f"{summary['steps']} steps, {summary['tokens']} tokens, "
                    f"loss {summary['first_loss']:.4f} -> {summary['last_loss']:.4f}, "
                    f"{summary['tokens_per_s']:.0f} tokens/s; {self.run_dir / 'summary.json'}")
        return summary

    def _check_nonfinite(self, result: StepResult) -> None:
        if not result.skipped:
            self.consecutive_nonfinite = 0
            return
        self.consecutive_nonfinite += 1
        limit = self.cfg.train.max_consecutive_nonfinite
        _log(self.world, f"llada: warning: step {result.step}: non-finite loss, step skipped "
                         f"({self.consecutive_nonfinite} in a row, limit {limit})")
        if self.consecutive_nonfinite >= limit:
            raise TrainingError(
                f"{limit} consecutive steps had a non-finite loss (steps "
                f"{result.step - limit + 1}..{result.step}); stopping "
                f"(train.max_consecutive_nonfinite={limit}); lower optimizer.lr or resume "
                f"from an earlier checkpoint")

    def _log_step(self, result: StepResult, tokens_per_s: float) -> None:
        mfu = self._mfu(tokens_per_s)
        data_skipped = self.data_skipped()
        # the loss by mask ratio over the steps since the last record, all data-parallel ranks
        by_t = self.loss_fn.by_t.take(self.world.device, lambda t: dist.all_reduce(
            t, group=parallel_state.get_data_parallel_group()))
        record = {**asdict(result), "tokens_per_s": tokens_per_s, "mfu": mfu,
                  "skipped_total": self.skipped_steps, "data_skipped": data_skipped,
                  "loss_by_t": by_t}
        if self.tracker is not None:
            self.tracker.metrics(result.step + 1, self._tracked_metrics(record))
        grad = "n/a" if result.grad_norm is None else f"{result.grad_norm:.3f}"
        mfu_s = "" if mfu is None else f" | mfu {100 * mfu:.1f}%"
        _log(self.world, f"step {result.step + 1:>6}/{self.cfg.train.steps} | loss "
                         f"{result.loss:.4f} | lr {result.lr:.3e} | grad norm {grad} | "
                         f"{tokens_per_s:,.0f} tokens/s{mfu_s} | skipped {self.skipped_steps}"
                         f"{self._data_note(data_skipped)}")
        if self.world.is_main and self.cfg.tracking.metrics_file:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def data_skipped(self, reduce: bool = True) -> dict:
        """Skipped data (missing/corrupt shards, bad samples), summed over data-parallel ranks
        (this rank's own without ``reduce``: after a failure the others may not join)."""
        counters = self.data.counters
        if not reduce:
            return counters
        # on the training device: NCCL groups reduce CUDA tensors only
        t = torch.tensor([counters[k] for k in sorted(counters)], dtype=torch.int64,
                         device=self.world.device)
        dist.all_reduce(t, group=parallel_state.get_data_parallel_group())
        return dict(zip(sorted(counters), t.tolist()))

    @staticmethod
    def _data_note(data_skipped: dict) -> str:
        bad = {k: v for k, v in data_skipped.items() if v}
        return "" if not bad else " | data skipped " + ", ".join(f"{k} {v}" for k, v in bad.items())

    @property
    def skipped_steps(self) -> int:
        """Over the whole run: this job's and those of the jobs it resumed."""
        return self.skipped_before + sum(r.skipped for r in self.history)

    # ------------------------------------------------------------------ MLflow
    def _open_tracker(self, recipe: Optional[str]):
        """The MLflow run, on the rank that holds the loss (last pipeline stage, tensor rank 0,
        data rank 0); a bad tracking.uri is one error on every rank."""
        cfg, world = self.cfg, self.world
        tracker, error = None, None
        if cfg.tracking.enabled and (world.pp_rank, world.tp_rank, world.dp_rank) == (
                world.pp - 1, 0, 0):
            from framework.tracking import Tracker, flatten, run_tags
            tc, run_dir = cfg.tracking, self.run_dir.resolve()
            resumed_at = None if self.resume_from is None else self.step
            try:
                tracker = Tracker(
                    tc, run_dir / "tracking", uri=tc.uri or f"sqlite:///{run_dir / 'mlflow.db'}",
                    # the local store keeps its artifacts beside it, not in the working directory
                    artifact_location=None if tc.uri else (run_dir / "mlartifacts").as_uri(),
                    run_name=tc.run_name or cfg.run.name, run_id=self.tracking_run_id,
                    resumed_at=resumed_at, ignore_signals=stop_signals(cfg.preemption))
            except ConfigError as e:
                error = str(e)
            else:
                tracker.params(flatten(to_dict(cfg)), self.step)
                tracker.tags(run_tags(recipe, world, resumed_at))
                config_copy = run_dir / "tracking" / "config.yaml"
                atomic_write(config_copy, to_yaml(cfg).encode())
                tracker.artifact(config_copy, "config")
                tracker.artifact(self.tokenizer, "tokenizer")
        errors: List[Optional[str]] = [None] * world.world_size
        dist.all_gather_object(errors, error)
        failed = next((e for e in errors if e is not None), None)
        if failed is not None:
            if tracker is not None:
                tracker.close("FAILED")
            raise ConfigError(failed)
        return tracker

    def _tracked_metrics(self, record: dict) -> dict:
        """A metrics.jsonl record as MLflow metrics: flat names, no unknowns (MFU off a GPU)."""
        values = {"loss": record["loss"], "lr": record["lr"], "grad_norm": record["grad_norm"],
                  "tokens_per_s": record["tokens_per_s"], "mfu": record["mfu"],
                  "consumed_tokens": self.consumed_tokens, "skipped_steps": self.skipped_steps,
                  "seq_len": record["seq_len"]}
        values.update({f"data_skipped/{k}": v for k, v in record["data_skipped"].items()})
        values.update({f"loss_by_t/{k}": v for k, v in record["loss_by_t"].items()})
        return {k: v for k, v in values.items() if v is not None}

    # ------------------------------------------------------------------ checkpoints
    def _layout(self) -> dict:
        """What a checkpoint's shards depend on; resuming under another one reshards."""
        w, cfg = self.world, self.cfg
        return {"tp": w.tp, "pp": w.pp, "dp": w.dp, "world_size": w.world_size,
                "zero_stage": cfg.deepspeed.zero_stage, "precision": "bf16" if self.bf16 else "fp32",
                "stages": stage_bounds(cfg.model.num_layers, w.pp, cfg.parallel.pp_layers),
                "data_workers": self.data.workers}

    def _maybe_checkpoint(self, final: bool) -> bool:
        """Save if due; whether the run stops here (both agreed by every rank)."""
        save, stop = self.checkpointer.due(self.step, final, stop=self.stop.reason is not None)
        if save:
            start = time.perf_counter()
            path = self.save_checkpoint()
            seconds = time.perf_counter() - start
            self.stop.note_save(seconds)
            if self.tracker is not None:
                self.tracker.checkpoint(self.step, path, seconds)
        return stop

    def save_checkpoint(self) -> Path:
        """The complete checkpoint of this step (collective)."""
        import deepspeed
        meta = {"consumed_samples": self.step * self.cfg.train.global_batch_size,
                "consumed_tokens": self.consumed_tokens, "skipped_steps": self.skipped_steps,
                "tracking": {"run_id": self._tracking_run_id()}, "layout": self._layout(),
                "tokenizer_sha256": self.tokenizer_hashes, "special_ids": self.special_ids,
                "config": to_dict(self.cfg),
                "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__}}
        return self.checkpointer.save(self.engine, self.step, meta, self.data.state_dict(),
                                      self.tokenizer)

    def _tracking_run_id(self) -> Optional[str]:
        """The MLflow run id, from the tracking rank to its pipeline's first stage (rank 0 writes
        meta.json). None while the courier has not made the run yet: run.json names it then."""
        answer = [None]
        if self.tracker is not None:
            answer[0] = self.tracker.run_id
        if self.world.pp > 1:
            dist.broadcast_object_list(
                answer, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                group=parallel_state.get_pipeline_model_parallel_group())
        return answer[0]

    def _resume_path(self) -> Optional[Path]:
        """checkpoint.resume resolved and checked against this config on rank 0 (its warnings
        printed once), agreed by all ranks before anything is built."""
        answer: List[Optional[str]] = [None, None]  # [path, error]
        if self.world.is_main:
            warn = lambda msg: _log(self.world, f"llada: warning: {msg}")  # noqa: E731
            try:
                path = resolve_resume(self.cfg.checkpoint.resume, self.checkpointer.root, warn)
                if path is not None:
                    meta = read_meta(path)
                    self._check_resumable(path, meta)
                    set_aside_newer(self.checkpointer.root, meta["step"], warn)
                    answer[0] = str(path)
            except ConfigError as e:
                answer[1] = str(e)
            except Exception as e:  # noqa: BLE001 - every rank must hear of it, not only rank 0
                answer[1] = f"checkpoint.resume: {type(e).__name__}: {e}"
        dist.broadcast_object_list(answer, src=0)
        if answer[1] is not None:
            raise ConfigError(answer[1])
        return None if answer[0] is None else Path(answer[0])

    def load_checkpoint(self, path: Path) -> None:
        """Model, optimizer, data stream, RNG and counters from a complete checkpoint; the same
        layout loads DeepSpeed's shards as they are, another one goes through full tensors."""
        world = self.world
        meta = read_meta(path)
        saved = meta["layout"]
        now = self._layout()
        if all(saved[k] == now[k] for k in ("tp", "pp", "dp", "zero_stage", "precision",
                                           "stages")):
            loaded, _ = self.engine.load_checkpoint(str(path.parent), tag=path.name,
                                                    load_optimizer_states=True,
                                                    load_lr_scheduler_states=False)
            if loaded is None:  # DeepSpeed only logs a missing file; resuming without it is wrong
                raise CheckpointError(f"{path}: DeepSpeed found no model states to load")
            how = "same layout"
        else:
            self._reshard(path, saved)
            how = (f"resharded from tp {saved['tp']} pp {saved['pp']} dp {saved['dp']} "
                   f"ZeRO-{saved['zero_stage']} {saved['precision']}")
        def data_state(dp_rank: int) -> dict:
            return json.loads((path / rank_file("data", dp_rank)).read_text())
        if saved["dp"] == world.dp:  # this rank's own stream
            self.data.load_state_dict(data_state(world.dp_rank))
        else:  # every saved rank's, regrouped
            self.data.load_state_dicts([data_state(r) for r in range(saved["dp"])])
        if saved["world_size"] == world.world_size:  # else no rank has a state of its own
            set_rng_state(torch.load(path / rank_file("rng", world.rank), weights_only=False))
        self.step, self.consumed_tokens = meta["step"], meta["consumed_tokens"]
        self.skipped_before = meta.get("skipped_steps", 0)
        self.tracking_run_id = meta.get("tracking", {}).get("run_id")
        self.engine.global_steps = self.step
        self.engine.global_samples = meta["consumed_samples"]
        _log(world, f"llada: resumed from {path} at step {self.step} ({how})")

    def _truncate_metrics(self) -> None:
        """Steps from self.step on run again (after the checkpoint; all of them in a fresh start
        in an old run.dir): their records go, so none is logged twice. A line a crash cut short
        is dropped too."""
        kept, bad = [], 0
        for line in self.metrics_path.read_text().splitlines():
            try:
                if json.loads(line)["step"] < self.step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                bad += 1
        if bad:
            _log(self.world, f"llada: warning: {self.metrics_path}: {bad} unreadable line(s) "
                             "dropped (a crash cut them short)")
        atomic_write(self.metrics_path, "".join(f"{line}\n" for line in kept).encode())

    def _check_resumable(self, path: Path, meta: dict) -> None:
        saved, now = meta["config"], to_dict(self.cfg)
        for section, keys in (("model", sorted(now["model"])), ("train", ["global_batch_size"])):
            for key in keys:
                if saved[section].get(key) != now[section][key]:
                    raise ConfigError(
                        f"checkpoint.resume: {path} was trained with {section}.{key}="
                        f"{saved[section].get(key)}, the config has {now[section][key]}")
        if meta["tokenizer_sha256"] != self.tokenizer_hashes:
            raise ConfigError(f"checkpoint.resume: {path} was trained on data of another "
                              f"tokenizer than data.datasets ({self.tokenizer} differs)")

    def _reshard(self, path: Path, saved: dict) -> None:
        from framework.reshard import Layout, ReshardError, load_full_state, read_full_state
        names = {n.removeprefix("module.") for n, _ in self.engine.module.named_parameters()}
        try:
            state = read_full_state(path, Layout.saved(saved), names)
            load_full_state(self.engine, self.engine.module, state, self.world.tp_rank,
                            self.world.tp)
        except ReshardError as e:
            raise ConfigError(f"checkpoint.resume: {path}: {e}") from None

    def _load_hf_weights(self, model: torch.nn.Module, hf_dir: Path) -> None:
        """init.from: the weights of a Hugging Face LLaDA directory, sliced for this rank."""
        from framework.hf import HFFormatError, read_hf_dir
        try:
            full = read_hf_dir(hf_dir, self.cfg.model)
        except HFFormatError as e:
            raise ConfigError(f"init.from: {e}") from None
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(shard(name, full[name], self.world.tp_rank, self.world.tp))
        _log(self.world, f"llada: weights from {hf_dir}")

    def _summary(self, total_tokens: int, elapsed: float, status: str) -> dict:
        good = [r.loss for r in self.history if not r.skipped and math.isfinite(r.loss)]
        first = good[:SUMMARY_WINDOW]
        last = good[-SUMMARY_WINDOW:]
        tokens_per_s = total_tokens / elapsed if elapsed > 0 else 0.0
        return {
            "status": status,
            "steps": len(self.history),
            "final_step": self.step,
            "resumed_from": None if self.resume_from is None else str(self.resume_from),
            "stop_reason": self.stop.reason if status == "stopped" else None,
            "tokens": total_tokens,
            "first_loss": sum(first) / len(first) if first else float("nan"),
            "last_loss": sum(last) / len(last) if last else float("nan"),
            "tokens_per_s": tokens_per_s,
            "mfu": self._mfu(tokens_per_s),
            "skipped_steps": self.skipped_steps,
            # after a failure the other ranks may not join a collective; after a stop they do
            "data_skipped": self.data_skipped(reduce=status in ("completed", "stopped")),
            "elapsed_s": elapsed,
            "parameters": self.num_params,
            "world_size": self.world.world_size,
            "data_parallel": self.world.dp,
            "tensor_parallel": self.world.tp,
            "pipeline_parallel": self.world.pp,
            "sequence_parallel": self.cfg.parallel.sequence_parallel,
            "zero_stage": self.cfg.deepspeed.zero_stage,
            "precision": "bf16" if self.bf16 else "fp32",
            "device": str(self.world.device),
        }
