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
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from data_pipeline.collate import MaskCollator
from data_pipeline.datasets import open_datasets
from data_pipeline.loader import DataError, PretrainLoader
from data_pipeline.shards import ShardSet
from data_pipeline.tokenizer import atomic_write
from framework.config import Config, ConfigError, to_yaml
from framework.deepspeed_config import deepspeed_json
from framework.flops import peak_flops, train_flops_per_token
from framework.optimizer import SkippableAdamW, param_groups
from framework.model.model import LLaDAModel, transformer_config
from framework.objective import llada_loss
from framework.parallel import DeepSpeedMPU, World, init_world
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
    def __init__(self, cfg: Config):
        import deepspeed

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        self.cfg = cfg
        self.world = world = init_world(cfg.parallel, cfg.run.device)
        self.run_dir = Path(cfg.run.dir)
        if world.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(to_yaml(cfg))

        tc = cfg.train
        per_step = tc.micro_batch_size * world.dp
        if tc.global_batch_size % per_step != 0:
            raise ConfigError(
                f"train.global_batch_size: {tc.global_batch_size} is not a multiple of "
                f"train.micro_batch_size x data-parallel size = {tc.micro_batch_size} x {world.dp}")
        self.accum = tc.global_batch_size // per_step
        on_gpu = world.device.type == "cuda"
        self.bf16 = tc.precision == "bf16" or (tc.precision == "auto" and on_gpu)

        sets = open_datasets(cfg.data, world.is_main, dist.barrier)
        self.mask_id = check_data(cfg, sets)
        self.data = PretrainLoader(
            cfg.data, sets, [d.weight for d in cfg.data.datasets],
            MaskCollator(cfg.objective, self.mask_id, cfg.data.seq_len),
            micro_batch_size=tc.micro_batch_size, accumulation=self.accum,
            dp_rank=world.dp_rank, dp_size=world.dp, pin_memory=on_gpu)

        torch.manual_seed(cfg.run.seed)
        if on_gpu:
            from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
            model_parallel_cuda_manual_seed(cfg.run.seed)
        mcfg = transformer_config(cfg.model, tensor_parallel=world.tp, pipeline_parallel=world.pp,
                                  params_dtype=torch.bfloat16 if self.bf16 else torch.float32,
                                  on_cpu=not on_gpu)
        model = LLaDAModel(cfg.model, mcfg)
        self.num_params = sum(p.numel() for p in model.parameters())
        if tc.compile:
            model.decoder = torch.compile(model.decoder)
        oc = cfg.optimizer
        self.optimizer = SkippableAdamW(
            param_groups(model, oc.weight_decay), lr=oc.lr, betas=(oc.beta1, oc.beta2), eps=oc.eps,
            fused=on_gpu)
        ds_cfg = deepspeed_json(cfg.deepspeed, micro_batch_size=tc.micro_batch_size,
                                grad_accumulation=self.accum, data_parallel_size=world.dp,
                                bf16=self.bf16, grad_clip=oc.grad_clip)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=self.optimizer, config=ds_cfg, mpu=DeepSpeedMPU)
        self.flops_per_token = train_flops_per_token(cfg.model, cfg.data.seq_len)
        self.peak = peak_flops(torch.cuda.get_device_name(world.device)) if on_gpu else None

        self.step = 0
        self.history: List[StepResult] = []
        self.consecutive_nonfinite = 0
        self.metrics_path = self.run_dir / "metrics.jsonl"

    # ------------------------------------------------------------------ one optimizer step
    def train_step(self) -> StepResult:
        cfg, engine, world = self.cfg, self.engine, self.world
        lr = wsd_lr(self.step, cfg.train.steps, cfg.optimizer.lr, cfg.schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

        # accumulated on the device: no host sync inside the micro-batch loop
        loss_sum = torch.zeros((), dtype=torch.float64, device=world.device)
        nonfinite = torch.zeros((), dtype=torch.float32, device=world.device)
        for micro in range(self.accum):
            # data: masked by the collator (per-sequence t, seeded by each sample's global
            # index); 1% of steps cut to a random length, alike on every data-parallel rank
            batch = self._next_batch()
            noisy, targets, mask, p_mask = (x.to(world.device, non_blocking=True) for x in
                                            (batch.noisy, batch.targets, batch.mask, batch.p_mask))
            length = noisy.shape[1]
            # forward: the head runs at masked positions only
            logits = engine(noisy, select=mask)
            # loss
            masked_p = p_mask[:, None].expand_as(targets)[mask]
            loss = llada_loss(logits, targets[mask], masked_p, targets.numel(),
                              cross_entropy=engine.module.cross_entropy)
            nonfinite = torch.maximum(nonfinite, (~torch.isfinite(loss.detach())).float())
            # backward (DeepSpeed scales by 1/accumulation and reduces across data parallel)
            engine.backward(loss)
            if micro == self.accum - 1:
                dist.all_reduce(nonfinite, op=dist.ReduceOp.MAX)
                # every rank skips alike; ZeRO/bf16 would also skip on the non-finite gradient
                self.optimizer.skip_next = bool(nonfinite.item())
            # clip + optimizer step (DeepSpeed applies it at the accumulation boundary)
            engine.step()
            loss_sum += loss.detach().double()

        skipped = bool(nonfinite.item())
        mean_loss = float("nan")
        if not skipped:
            dist.all_reduce(loss_sum, group=parallel_state.get_data_parallel_group())
            mean_loss = loss_sum.item() / (self.accum * world.dp)
        grad_norm = None if skipped else engine.get_global_grad_norm()
        result = StepResult(step=self.step, loss=mean_loss, lr=lr,
                            grad_norm=None if grad_norm is None else float(grad_norm),
                            tokens=cfg.train.global_batch_size * length, seq_len=length,
                            skipped=skipped)
        self.step += 1
        return result

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
        start = window_start = time.perf_counter()
        window_tokens = total_tokens = 0
        status = "running"
        try:
            while self.step < steps:
                result = self.train_step()
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
                self._maybe_checkpoint(final=self.step == steps)
            status = "completed"
        except TrainingError:
            status = "diverged"
            raise
        finally:
            bar.close()
            elapsed = time.perf_counter() - start
            summary = self._summary(total_tokens, elapsed, status)
            if world.is_main:
                (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        _log(world, f"llada: done: {summary['steps']} steps, {summary['tokens']} tokens, "
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
        record = {**asdict(result), "tokens_per_s": tokens_per_s, "mfu": mfu,
                  "skipped_total": self.skipped_steps, "data_skipped": self.data_skipped()}
        grad = "n/a" if result.grad_norm is None else f"{result.grad_norm:.3f}"
        mfu_s = "" if mfu is None else f" | mfu {100 * mfu:.1f}%"
        _log(self.world, f"step {result.step + 1:>6}/{self.cfg.train.steps} | loss "
                         f"{result.loss:.4f} | lr {result.lr:.3e} | grad norm {grad} | "
                         f"{tokens_per_s:,.0f} tokens/s{mfu_s} | skipped {self.skipped_steps}"
                         f"{self._data_note()}")
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

    def _data_note(self) -> str:
        bad = {k: v for k, v in self.data_skipped().items() if v}
        return "" if not bad else " | data skipped " + ", ".join(f"{k} {v}" for k, v in bad.items())

    @property
    def skipped_steps(self) -> int:
        return sum(r.skipped for r in self.history)

    def _maybe_checkpoint(self, final: bool) -> None:
        ck = self.cfg.checkpoint
        due = (ck.interval > 0 and self.step % ck.interval == 0) or (final and ck.save_final)
        if not due:
            return
        root = self.run_dir / "checkpoints"
        tag = f"step_{self.step:08d}"
        # the data stream's position, one small file per data-parallel rank (exact resume);
        # written first: save_checkpoint moves DeepSpeed's `latest` to this tag when it is done
        if parallel_state.get_tensor_model_parallel_rank() == 0:
            atomic_write(root / tag / "data" / f"dp_rank_{self.world.dp_rank:05d}.json",
                         json.dumps(self.data.state_dict()).encode())
        self.engine.save_checkpoint(str(root), tag=tag, client_state={"step": self.step})
        dist.barrier()
        if self.world.is_main:
            tags = sorted(p for p in root.glob("step_*") if p.is_dir())
            for old in tags[:-ck.keep]:
                shutil.rmtree(old)

    def _summary(self, total_tokens: int, elapsed: float, status: str) -> dict:
        good = [r.loss for r in self.history if not r.skipped and math.isfinite(r.loss)]
        first = good[:SUMMARY_WINDOW]
        last = good[-SUMMARY_WINDOW:]
        tokens_per_s = total_tokens / elapsed if elapsed > 0 else 0.0
        return {
            "status": status,
            "steps": len(self.history),
            "tokens": total_tokens,
            "first_loss": sum(first) / len(first) if first else float("nan"),
            "last_loss": sum(last) / len(last) if last else float("nan"),
            "tokens_per_s": tokens_per_s,
            "mfu": self._mfu(tokens_per_s),
            "skipped_steps": self.skipped_steps,
            "data_skipped": self.data_skipped(reduce=status == "completed"),
            "elapsed_s": elapsed,
            "parameters": self.num_params,
            "world_size": self.world.world_size,
            "data_parallel": self.world.dp,
            "tensor_parallel": self.world.tp,
            "zero_stage": self.cfg.deepspeed.zero_stage,
            "precision": "bf16" if self.bf16 else "fp32",
            "device": str(self.world.device),
        }
