"""Builds a Trainer from the config: the world, the data, the resume decision, the model, the
DeepSpeed engine, the checkpointer, the tracker and the metrics stream, in the order they depend
on one another. Each component gets its own sub-config (and runtime values), never the root; the
resolved config as plain data goes to meta.json and MLflow.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable, List, Optional

import torch
import torch.distributed as dist

from data_pipeline.collate import MaskCollator, NextTokenCollator
from data_pipeline.config import ObjectiveConfig
from data_pipeline.datasets import open_datasets, open_validation
from data_pipeline.loader import PretrainLoader
from data_pipeline.sft import SFTCollator
from data_pipeline.shards import ShardSet
from framework.checkpoint.checkpointer import Checkpointer
from framework.checkpoint.resume import (Progress, RollbackRequest, agree_on_resume,
                                         check_resumable, checkpoint_meta, damaged_anywhere,
                                         layout,
                                         load_checkpoint, rollback_done)
from framework.checkpoint.source import init_from
from framework.config import (Config, ConfigError, EvalConfig, ModelConfig, check_world,
                              to_dict, to_yaml)
from framework.evaluation.validator import HeldOutSet, Validator
from framework.model.model import Layer, LLaDAModel, piece_specs, transformer_config
from framework.model.model import head_loss, vocab_cross_entropy
from framework.model.params import total_params
from framework.model.pipeline import LLaDAPipeline
from framework.model.weights import init_weights
from framework.parallel.layout import recompute_flags, stage_bounds
from framework.parallel.world import (DeepSpeedMPU, World, check_sequence_parallel, init_world,
                                      reduce_sequence_parallel_grads)
from framework.tracking.tracker import flatten, open_tracker, run_id_for_rank0
from framework.training.phases import OptimizerTimer
from framework.training.deepspeed_config import deepspeed_json
from framework.training.flops import FlopCounter, peak_flops
from framework.training.metrics import PLOT, MetricsStream, Window
from framework.training.objective import LossByT, ObjectiveLoss
from framework.training.optimizer import NonFiniteGuard, SkippableAdamW, param_groups
from framework.training.preemption import StopRequest, deadline_from_env, stop_signals
from framework.training.schedule import schedule_warnings, wsd_lr
from framework.training.trainer import Trainer


def build_trainer(cfg: Config, stop: Optional[StopRequest] = None,
                  recipe: Optional[str] = None,
                  rollback: Optional[RollbackRequest] = None) -> Trainer:
    """``stop``: the signal handler the CLI installed before anything slow started; by default
    only the deadline guard (``LLADA_DEADLINE``) can stop the run early. ``recipe``: where the
    config came from (a tag of the MLflow run). ``rollback``: the run diverged: resume from the
    newest complete checkpoint before the divergence (framework/training/run.py)."""
    import deepspeed

    stop = stop if stop is not None else StopRequest(cfg.preemption, deadline_from_env())
    world = init_world(cfg.parallel, cfg.run.device)
    log = _rank0_print(world)
    tc, run_dir = cfg.train, Path(cfg.run.dir)
    check_world(tc, cfg.parallel, world.world_size)
    accum = tc.global_batch_size // (tc.micro_batch_size * world.dp)
    on_gpu = world.device.type == "cuda"
    bf16 = tc.precision == "bf16" or (tc.precision == "auto" and on_gpu)
    sp = cfg.parallel.sequence_parallel
    if sp:
        check_sequence_parallel(world.device)
    for warning in schedule_warnings(tc.steps, cfg.schedule):
        log(f"llada: warning: {warning}")

    # data: every rank reads it, pipeline stages too, so all ranks of a tensor/pipeline group
    # hold the same batches (and the same loader state) without any broadcast
    kind = cfg.objective.kind
    unused = {"ar": "objective.eps, objective.t_sampling and objective.mask_id are not used "
                    "(the autoregressive objective masks nothing)",
              "sft": "objective.variable_length_prob is not used (SFT never cuts a batch: it "
                     "would drop responses)"}
    if kind in unused:
        log(f"llada: objective.kind={kind}: {unused[kind]}")
    sets = open_datasets(cfg.data, world.is_main, dist.barrier, kind=kind)
    mask_id = _check_data(cfg.objective.mask_id, cfg.model, sets)
    val_sets = open_validation(cfg.data, sets[0], kind=kind)
    data = PretrainLoader(
        cfg.data, sets, [d.weight for d in cfg.data.datasets],
        _collator(cfg.objective, mask_id, cfg.data.seq_len, world.tp if sp else 1),
        micro_batch_size=tc.micro_batch_size, accumulation=accum, dp_rank=world.dp_rank,
        dp_size=world.dp, pin_memory=on_gpu, ignore_signals=stop_signals(cfg.preemption))

    # the checkpoint to resume from, agreed by every rank before anything is built
    tokenizer, hashes = sets[0].tokenizer_path, [ds.tokenizer_sha256 for ds in sets]
    config = to_dict(cfg)
    bounds = stage_bounds(cfg.model.num_layers, world.pp, cfg.parallel.pp_layers)
    shard_layout = layout(world, zero_stage=cfg.deepspeed.zero_stage, bf16=bf16, stages=bounds,
                          data_workers=data.workers)
    checkpointer = Checkpointer(cfg.checkpoint, run_dir / "checkpoints", world, tokenizer, log)
    # ... and the content of the files each rank will read from it checked meanwhile
    pending = agree_on_resume(
        cfg.checkpoint.resume, checkpointer.root, world,
        lambda path, meta: check_resumable(path, meta, config, hashes, tokenizer), log,
        now=shard_layout, request=rollback)

    # model, loss, optimizer, engine
    guard, loss_by_t = NonFiniteGuard(world.device), LossByT()
    # the autoregressive objective masks nothing: it has no loss by mask ratio
    loss_fn = ObjectiveLoss(head_loss, guard.observe,
                            None if kind == "ar" else loss_by_t)
    torch.manual_seed(cfg.run.seed)
    if on_gpu:  # megatron's per-tensor-rank CUDA generators
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
        model_parallel_cuda_manual_seed(cfg.run.seed)
    model = _build_model(cfg.model, world, bounds, loss_fn, bf16=bf16, sequence_parallel=sp,
                         recompute=recompute_flags(cfg.model.num_layers, bounds,
                                                   tc.activation_checkpointing,
                                                   tc.checkpoint_layers),
                         compile=tc.compile, causal=kind == "ar",
                         fused_head=_fused_head(tc, cfg.deepspeed.zero_stage, log))
    init_weights(model, cfg.model, cfg.run.seed, world.tp_rank, world.tp)
    if cfg.init.from_ and not pending.resuming:  # a resumed run has its own weights
        src = init_from(model, Path(cfg.init.from_), cfg.model, world.tp_rank, world.tp,
                        hashes[0], warn=log, damaged=lambda tag: damaged_anywhere(tag, world))
        log(f"llada: weights from {src.source} (trained with objective {src.objective})")
    oc = cfg.optimizer
    optimizer = SkippableAdamW(param_groups(model, oc.weight_decay), lr=oc.lr,
                               betas=(oc.beta1, oc.beta2), eps=oc.eps, fused=on_gpu, guard=guard)
    ds_config = deepspeed_json(cfg.deepspeed, micro_batch_size=tc.micro_batch_size,
                               grad_accumulation=accum, data_parallel_size=world.dp, bf16=bf16,
                               grad_clip=oc.grad_clip, pipeline_partitioned=not sp)
    # a PipelineModule brings its own topology (same groups); DeepSpeed then refuses an mpu
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                           mpu=None if world.pp > 1 else DeepSpeedMPU)

    resume = pending.finish()  # the check's verdict, agreed; a damaged checkpoint passed over
    progress = Progress() if resume is None else load_checkpoint(resume.path, engine, data,
                                                                 world, shard_layout, log)
    if resume is not None and resume.divergence is not None:  # rolled back to this step
        progress = replace(progress, lr_factor=resume.divergence["lr_factor"],
                           rollbacks=resume.divergence["rollbacks"])
        log(f"llada: the learning rate is x{progress.lr_factor:g} of the schedule from step "
            f"{progress.step} on (rollback {progress.rollbacks}: {resume.divergence['reason']})")
    if world.is_main:  # only now: a refused resume leaves the run's config as it was
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))

    resumed_at = None if resume is None else resume.step
    rollback = resume is not None and resume.rollback
    tracker = open_tracker(
        cfg.tracking, world, run_dir, run_name=cfg.run.name, run_id=progress.run_id,
        resumed_at=resumed_at, rollback=rollback,
        params=flatten(config), recipe=recipe, config_yaml=to_yaml(cfg), tokenizer=tokenizer,
        plot=PLOT, ignore_signals=stop_signals(cfg.preemption))
    metrics_file = run_dir / "metrics.jsonl" if cfg.tracking.metrics_file else None
    metrics = MetricsStream(cfg.tracking, console=world.reports,
                            path=metrics_file if world.reports else None, tracker=tracker,
                            total_steps=tc.steps, resumed_at=resumed_at, rollback=rollback)
    rollback_done(checkpointer.root, world)
    peak = peak_flops(torch.cuda.get_device_name(world.device)) if on_gpu else None
    if on_gpu and peak is None:
        log(f"llada: no MFU: the dense bf16 peak of {torch.cuda.get_device_name(world.device)!r} "
            "is not in framework/training/flops.py")

    def meta_for(p: Progress) -> dict:  # the run id is the tracker's, known once it is made
        return checkpoint_meta(replace(p, run_id=run_id_for_rank0(tracker, world)),
                               global_batch_size=tc.global_batch_size, layout=shard_layout,
                               tokenizer_sha256=hashes, special_ids=sets[0].special_ids,
                               config=config)

    facts = {"resumed_from": None if resume is None else str(resume.path),
             "parameters": total_params(cfg.model), "world_size": world.world_size,
             "data_parallel": world.dp, "tensor_parallel": world.tp,
             "pipeline_parallel": world.pp, "sequence_parallel": sp,
             "zero_stage": cfg.deepspeed.zero_stage, "precision": "bf16" if bf16 else "fp32",
             "device": str(world.device),
             # the run's automatic rollbacks so far (train.on_divergence=rollback)
             "rollbacks": [] if resume is None else list(resume.history)}
    log(f"llada: {facts['parameters'] / 1e6:.2f}M parameters on {world.device}, world "
        f"{world.world_size} (tp {world.tp}, pp {world.pp}, dp {world.dp}), "
        f"ZeRO-{cfg.deepspeed.zero_stage}, {facts['precision']}, global batch "
        f"{tc.global_batch_size} = {tc.micro_batch_size} x {accum} accumulation x {world.dp} "
        f"data-parallel")
    validator = _validator(cfg.eval, val_sets, [v.name for v in cfg.data.validation], world,
                           engine, tc.micro_batch_size, mask_id, kind, log)
    return Trainer(tc, world=world, data=data, engine=engine, optimizer=optimizer,
                   loss_fn=loss_fn, guard=guard, loss_by_t=loss_by_t,
                   lr_at=lambda step: wsd_lr(step, tc.steps, oc.lr, cfg.schedule),
                   checkpointer=checkpointer, checkpoint_meta=meta_for, metrics=metrics,
                   window=Window(world, FlopCounter(cfg.model, kind), peak,
                                 # the pipeline's schedule is one call: its optimizer step timed
                                 OptimizerTimer(engine.optimizer, world.device).take
                                 if world.pp > 1 else None),
                   stop=stop,
                   progress=progress, resume=resume, summary_path=run_dir / "summary.json",
                   facts=facts, log=log, validator=validator, eval_cfg=cfg.eval)


def _validator(cfg: EvalConfig, sets: List[ShardSet], names: List[str], world: World, engine,
               train_micro_batch: int, mask_id: int, kind: str, log) -> Optional[Validator]:
    if not sets or not (cfg.interval or cfg.at_start or cfg.at_end):
        return None
    held = [HeldOutSet.read(name, s, cfg.sequences, kind) for name, s in zip(names, sets)]
    when = ", ".join(w for w, on in ((f"every {cfg.interval} steps", cfg.interval),
                                     ("at the start", cfg.at_start), ("at the end", cfg.at_end))
                     if on)
    log(f"llada: validation {when}: " + ", ".join(
        f"{h.name} ({h.tokens.shape[0]} sequences of {h.tokens.shape[1]})" for h in held)
        + (", the exact NLL" if kind == "ar" else f", {cfg.t_samples} draws each"))
    return Validator(cfg, held, world, engine,
                     micro_batch_size=cfg.micro_batch_size or train_micro_batch, mask_id=mask_id,
                     cross_entropy=vocab_cross_entropy, pipeline=world.pp > 1)


def _rank0_print(world: World) -> Callable[[str], None]:
    def log(msg: str) -> None:
        if world.is_main:
            print(msg, flush=True)
    return log


def _check_data(mask_id: Optional[int], model: ModelConfig, sets: List[ShardSet]) -> int:
    """The datasets against the model and objective; returns the mask id to use."""
    ids = sets[0].special_ids
    if mask_id is not None and mask_id != ids["mask"]:
        raise ConfigError(f"objective.mask_id: {mask_id}, but the tokenizer of "
                          f"{sets[0].manifest} has the mask token at id {ids['mask']}")
    if sets[0].vocab_size > model.vocab_size:
        raise ConfigError(f"model.vocab_size: {model.vocab_size} is smaller than the "
                          f"tokenizer's {sets[0].vocab_size} pieces ({sets[0].manifest})")
    return ids["mask"]


def _collator(cfg: ObjectiveConfig, mask_id: int, seq_len: int, length_multiple: int):
    """The objective's collator (data_pipeline/collate.py, data_pipeline/sft.py)."""
    if cfg.kind == "ar":
        return NextTokenCollator(cfg, seq_len, length_multiple)
    if cfg.kind == "sft":
        return SFTCollator(cfg, mask_id)
    return MaskCollator(cfg, mask_id, seq_len, length_multiple)


def _fused_head(tc, zero_stage: int, log) -> bool:
    """Whether the head hands the loss its input and weight (kernels/linear_cross_entropy.py).
    ZeRO-3 gathers a weight only inside its own module's forward, which the fused loss is not."""
    if tc.fused_head and zero_stage >= 3:
        log("llada: train.fused_head: the unfused head runs under ZeRO-3 (its weight is gathered "
            "only inside the output layer's own forward)")
        return False
    return tc.fused_head


def _build_model(cfg: ModelConfig, world: World, bounds: List[int], loss_fn: ObjectiveLoss, *,
                 bf16: bool, sequence_parallel: bool, recompute: List[bool],
                 compile: bool, causal: bool = False, fused_head: bool = False
                 ) -> torch.nn.Module:
    """The pieces of the model, all in one module or cut into this rank's pipeline stage
    (initialised by the caller, alike under every layout)."""
    on_gpu = world.device.type == "cuda"
    mcfg = transformer_config(cfg, tensor_parallel=world.tp,
                              params_dtype=torch.bfloat16 if bf16 else torch.float32,
                              on_cpu=not on_gpu, sequence_parallel=sequence_parallel)
    specs = piece_specs(cfg, mcfg, recompute, causal, fused_head)
    if world.pp > 1:
        model = LLaDAPipeline(specs, bounds, loss_fn, tp=world.tp, pp=world.pp, dp=world.dp)
    else:
        model = LLaDAModel([spec.build() for spec in specs])
    if sequence_parallel:
        reduce_sequence_parallel_grads(model)
    if compile:
        for module in model.modules():
            if isinstance(module, Layer):
                module.compile_run()
    return model
