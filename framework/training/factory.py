"""Builds a Trainer from the config: the world, the data, the checkpoint manager (the resume
decision), the model and objective, the DeepSpeed engine, the metrics stream and the held-out
sets, in the order they depend on one another. Each component gets its own sub-config (and
runtime values), never the root; the resolved config as plain data goes to meta.json and MLflow.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, NamedTuple, Optional

import torch
import torch.distributed as dist

from data_pipeline.collate import MaskCollator, MixedCollator, NextTokenCollator
from data_pipeline.config import ObjectiveConfig
from data_pipeline.datasets import open_datasets, open_validation
from data_pipeline.loader import PretrainLoader
from data_pipeline.sft import SFTCollator
from data_pipeline.shards import ShardSet
from framework.checkpoint.manager import CheckpointManager, RollbackRequest
from framework.checkpoint.resume import RunRecord, layout
from framework.config import Config, ConfigError, ModelConfig, check_world, to_dict, to_yaml
from framework.evaluation.validator import HeldOutSet, Validator
from framework.model.model import Layer, LLaDAModel, piece_specs, transformer_config
from framework.model.model import head_loss, vocab_cross_entropy
from framework.model.params import total_params
from framework.model.pipeline import LLaDAPipeline
from framework.model.weights import init_weights, param_groups
from framework.parallel.layout import recompute_flags, stage_bounds
from framework.parallel.world import (DeepSpeedMPU, World, check_sequence_parallel, init_world,
                                      log_hosts, reduce_sequence_parallel_grads)
from framework.tracking.tracker import flatten, open_tracker
from framework.training import faults
from framework.training.deepspeed_config import deepspeed_json
from framework.training.flops import FlopCounter, peak_flops
from framework.training.metrics import PLOT, MetricsStream, Window
from framework.training.objective import Objective
from framework.training.optimizer import SkippableAdamW
from framework.training.phases import OptimizerTimer
from framework.training.preemption import StopRequest, deadline_from_env, stop_signals
from framework.training.schedule import LearningRate, schedule_warnings, wsd_lr
from framework.training.trainer import Trainer


class TrainData(NamedTuple):
    loader: PretrainLoader  # this data-parallel rank's micro-batches
    sets: List[ShardSet]  # the training mixture's datasets
    validation: List[ShardSet]  # the held-out sets
    mask_id: int


def build_trainer(cfg: Config, stop: Optional[StopRequest] = None,
                  recipe: Optional[str] = None,
                  rollback: Optional[RollbackRequest] = None) -> Trainer:
    """``stop``: the signal handler the CLI installed before anything slow started; by default
    only the deadline guard (``LLADA_DEADLINE``) can stop the run early. ``recipe``: where the
    config came from (a tag of the MLflow run). ``rollback``: the run diverged: resume from the
    newest complete checkpoint before the divergence (framework/training/run.py)."""
    stop = stop if stop is not None else StopRequest(cfg.preemption, deadline_from_env())
    world = init_world(cfg.parallel, cfg.run.device)
    log_hosts(world)
    check_world(cfg.train, cfg.parallel, world.world_size)
    on_gpu = world.device.type == "cuda"
    bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and on_gpu)
    if cfg.parallel.sequence_parallel:
        check_sequence_parallel(world.device)
    for warning in schedule_warnings(cfg.train.steps, cfg.schedule):
        world.log(f"llada: warning: {warning}")
    bounds = stage_bounds(cfg.model.num_layers, world.pp, cfg.parallel.pp_layers)

    # every rank reads the data, pipeline stages too, so all ranks of a tensor/pipeline group
    # hold the same batches (and the same loader state) without any broadcast
    data = _data(cfg, world)
    # the checkpoint to resume from, agreed by every rank before anything is built; the content
    # of the files each rank will read from it checked meanwhile
    checkpoints = CheckpointManager(
        cfg.checkpoint, Path(cfg.run.dir) / "checkpoints", world, RunRecord(
            to_dict(cfg), layout(world, zero_stage=cfg.deepspeed.zero_stage, bf16=bf16,
                                 stages=bounds),
            data.sets[0].tokenizer_path, [ds.tokenizer_sha256 for ds in data.sets],
            data.sets[0].special_ids), world.log, rollback)
    objective = Objective(head_loss, world.device, cfg.objective, cfg.data.seq_len)
    model = _model(cfg, world, objective, bounds, bf16)
    if cfg.init.from_ and not checkpoints.resuming:  # a resumed run has its own weights
        source = checkpoints.init_weights(model, Path(cfg.init.from_), cfg.model)
        world.log(f"llada: weights from {source}")
    engine, lr = _engine(cfg, world, model, objective, bf16, data.loader.accum)
    checkpoints.load(engine, data.loader)  # the check's verdict first: a damaged one passed over
    _memory_check(world, data.loader)
    if world.is_main:  # only now: a refused resume leaves the run's config as it was
        Path(cfg.run.dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.run.dir) / "config.yaml").write_text(to_yaml(cfg))
    metrics = _metrics(cfg, world, engine, checkpoints, recipe, bf16, data.loader.accum)
    trainer = Trainer(cfg.train, world=world, data=data.loader, engine=engine,
                      objective=objective, lr=lr, checkpoints=checkpoints, metrics=metrics,
                      stop=stop, validator=_validator(cfg, data, world, engine))
    if os.environ.get(faults.ENV):  # the tests' injected faults
        faults.install(trainer)
    return trainer


def _data(cfg: Config, world: World) -> TrainData:
    """The mixture (rank 0 prepares what is missing), checked against the model and objective,
    this rank's loader, and the held-out sets."""
    kind = cfg.objective.kind
    unused = {"ar": "objective.eps, objective.t_sampling and objective.mask_id are not used "
                    "(the autoregressive objective masks nothing)",
              "sft": "objective.variable_length_prob is not used (SFT never cuts a batch: it "
                     "would drop responses)"}
    if kind in unused:
        world.log(f"llada: objective.kind={kind}: {unused[kind]}")
    oc = cfg.objective
    adapting = [what for what, on in (
        ("the logit shift (Dream)", oc.logit_shift),
        (f"attention annealed from causal over {oc.anneal_steps} steps (DiffuLLaMA)",
         oc.anneal_steps > 0),
        (f"+ {oc.ar_loss_weight} x the next-token CE (mixed objective)", oc.mixed)) if on]
    if adapting:
        world.log(f"llada: adapting to diffusion: {', '.join(adapting)}")
    sets = open_datasets(cfg.data, world.is_main, dist.barrier, kind=kind)
    mask_id = _check_data(cfg.objective.mask_id, cfg.model, sets)
    tc, sp = cfg.train, cfg.parallel.sequence_parallel
    loader = PretrainLoader(
        cfg.data, sets, [d.weight for d in cfg.data.datasets],
        _collator(cfg.objective, mask_id, cfg.data.seq_len, world.tp if sp else 1),
        micro_batch_size=tc.micro_batch_size,
        accumulation=tc.global_batch_size // (tc.micro_batch_size * world.dp),
        dp_rank=world.dp_rank, dp_size=world.dp, pin_memory=world.device.type == "cuda",
        ignore_signals=stop_signals(cfg.preemption))
    return TrainData(loader, sets, open_validation(cfg.data, sets[0], kind=kind), mask_id)


def _memory_check(world: World, loader: PretrainLoader) -> None:
    """The data's share of host memory: a run resumed on fewer GPUs holds more streams per
    reader (a warning when the node's readers would take over half of its memory)."""
    import psutil

    world.log(f"llada: data: {loader.describe()}")
    node = loader.reader_bytes() * loader.workers * int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if node > psutil.virtual_memory().total / 2:
        world.log(f"llada: warning: the data readers of this node would hold about "
                  f"{node / 2**30:.0f} GiB, over half of its memory: lower data.open_shards "
                  "(or start runs with fewer data.streams)")


def _model(cfg: Config, world: World, objective: Objective, bounds: List[int], bf16: bool
           ) -> torch.nn.Module:
    """This rank's part of the model, initialised alike under every layout."""
    tc = cfg.train
    torch.manual_seed(cfg.run.seed)
    if world.device.type == "cuda":  # megatron's per-tensor-rank CUDA generators
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
        model_parallel_cuda_manual_seed(cfg.run.seed)
    model = _build_model(cfg.model, world, bounds, objective.loss, bf16=bf16,
                         sequence_parallel=cfg.parallel.sequence_parallel,
                         recompute=recompute_flags(cfg.model.num_layers, bounds,
                                                   tc.activation_checkpointing,
                                                   tc.checkpoint_layers),
                         compile=tc.compile, causal=cfg.objective.kind == "ar",
                         fused_head=_fused_head(tc, cfg.deepspeed.zero_stage, world.log))
    init_weights(model, cfg.model, cfg.run.seed, world.tp_rank, world.tp)
    return model


def _engine(cfg: Config, world: World, model: torch.nn.Module, objective: Objective,
            bf16: bool, accum: int):
    """The DeepSpeed engine (ZeRO, clipping, accumulation) around the model and our AdamW, and
    the learning-rate schedule that drives it."""
    import deepspeed

    tc, oc, on_gpu = cfg.train, cfg.optimizer, world.device.type == "cuda"
    optimizer = SkippableAdamW(param_groups(model, oc.weight_decay), lr=oc.lr,
                               betas=(oc.beta1, oc.beta2), eps=oc.eps, fused=on_gpu,
                               guard=objective.guard)
    ds_config = deepspeed_json(cfg.deepspeed, micro_batch_size=tc.micro_batch_size,
                               grad_accumulation=accum,
                               data_parallel_size=world.dp, bf16=bf16, grad_clip=oc.grad_clip,
                               pipeline_partitioned=not cfg.parallel.sequence_parallel)
    # a PipelineModule brings its own topology (same groups); DeepSpeed then refuses an mpu
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                           mpu=None if world.pp > 1 else DeepSpeedMPU)
    return engine, LearningRate(optimizer,
                                lambda step: wsd_lr(step, tc.steps, oc.lr, cfg.schedule))


def _metrics(cfg: Config, world: World, engine, checkpoints: CheckpointManager,
             recipe: Optional[str], bf16: bool, accum: int) -> MetricsStream:
    """MLflow (the resumed run, or a child after a rollback), metrics.jsonl, the records'
    windows and summary.json; the run's setup in one line."""
    run_dir, tc, on_gpu = Path(cfg.run.dir), cfg.train, world.device.type == "cuda"
    tracker = open_tracker(
        cfg.tracking, world, run_dir, run_name=cfg.run.name, run_id=checkpoints.state.run_id,
        resumed_at=checkpoints.resumed_at, rollback=checkpoints.rolled_back,
        params=flatten(checkpoints.run.config), recipe=recipe, config_yaml=to_yaml(cfg),
        tokenizer=checkpoints.run.tokenizer, plot=PLOT,
        ignore_signals=stop_signals(cfg.preemption))
    peak = peak_flops(torch.cuda.get_device_name(world.device)) if on_gpu else None
    if on_gpu and peak is None:
        world.log(f"llada: no MFU: the dense bf16 peak of "
                  f"{torch.cuda.get_device_name(world.device)!r} is not in "
                  "framework/training/flops.py")
    window = Window(world, FlopCounter(cfg.model, cfg.objective.kind,
                                         cfg.objective.ar_loss_weight > 0), peak,
                    # the pipeline's schedule is one call: its optimizer step timed
                    OptimizerTimer(engine.optimizer, world.device).take if world.pp > 1
                    else None)
    facts = {"resumed_from": None if checkpoints.resume is None else str(checkpoints.resume.path),
             "parameters": total_params(cfg.model), "world_size": world.world_size,
             "data_parallel": world.dp, "tensor_parallel": world.tp,
             "pipeline_parallel": world.pp, "sequence_parallel": cfg.parallel.sequence_parallel,
             "zero_stage": cfg.deepspeed.zero_stage, "precision": "bf16" if bf16 else "fp32",
             "device": str(world.device),
             # the run's automatic rollbacks so far (train.on_divergence=rollback)
             "rollbacks": checkpoints.rollback_history}
    world.log(f"llada: {facts['parameters'] / 1e6:.2f}M parameters on {world.device}, world "
              f"{world.world_size} (tp {world.tp}, pp {world.pp}, dp {world.dp}), "
              f"ZeRO-{cfg.deepspeed.zero_stage}, {facts['precision']}, global batch "
              f"{tc.global_batch_size} = {tc.micro_batch_size} x {accum} accumulation x "
              f"{world.dp} data-parallel")
    metrics = MetricsStream(
        cfg.tracking, console=world.reports,
        path=run_dir / "metrics.jsonl" if cfg.tracking.metrics_file and world.reports else None,
        tracker=tracker, total_steps=tc.steps, resumed_at=checkpoints.resumed_at,
        rollback=checkpoints.rolled_back, window=window,
        summary_path=run_dir / "summary.json" if world.is_main else None, facts=facts)
    checkpoints.rollback_done()
    return metrics


def _validator(root: Config, data: TrainData, world: World, engine) -> Optional[Validator]:
    """The held-out sets, when the eval section evaluates any (None: never)."""
    cfg = root.eval
    if not data.validation or not (cfg.interval or cfg.at_start or cfg.at_end):
        return None
    kind, log = root.objective.kind, world.log
    names = [v.name for v in root.data.validation]
    held = [HeldOutSet.read(name, s, cfg.sequences, kind)
            for name, s in zip(names, data.validation)]
    when = ", ".join(w for w, on in ((f"every {cfg.interval} steps", cfg.interval),
                                     ("at the start", cfg.at_start), ("at the end", cfg.at_end))
                     if on)
    log(f"llada: validation {when}: " + ", ".join(
        f"{h.name} ({h.tokens.shape[0]} sequences of {h.tokens.shape[1]})" for h in held)
        + (", the exact NLL" if kind == "ar" else f", {cfg.t_samples} draws each"))
    return Validator(cfg, held, world, engine,
                     micro_batch_size=cfg.micro_batch_size or root.train.micro_batch_size,
                     mask_id=data.mask_id, cross_entropy=vocab_cross_entropy,
                     pipeline=world.pp > 1, shift=root.objective.logit_shift)


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
    """The objective's collator (data_pipeline/collate.py, data_pipeline/sft.py); the mixed
    objective's appends each micro-batch's sequences clean, as next-token rows."""
    if cfg.kind == "ar":
        return NextTokenCollator(cfg, seq_len, length_multiple)
    if cfg.kind == "sft":
        collator = SFTCollator(cfg, mask_id)
    else:
        collator = MaskCollator(cfg, mask_id, seq_len, length_multiple)
    if cfg.mixed:
        return MixedCollator(collator, cfg.ar_loss_weight, response_only=cfg.kind == "sft")
    return collator


def _fused_head(tc, zero_stage: int, log) -> bool:
    """Whether the head hands the loss its input and weight (llada_kernels/linear_cross_entropy.py).
    ZeRO-3 gathers a weight only inside its own module's forward, which the fused loss is not."""
    if tc.fused_head and zero_stage >= 3:
        log("llada: train.fused_head: the unfused head runs under ZeRO-3 (its weight is gathered "
            "only inside the output layer's own forward)")
        return False
    return tc.fused_head


def _build_model(cfg: ModelConfig, world: World, bounds: List[int], loss_fn, *,
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
    if world.tp > 1:  # sequence-parallel norm gains; QK-norm gains (each rank: its heads)
        reduce_sequence_parallel_grads(model)
    if compile:
        for module in model.modules():
            if isinstance(module, Layer):
                module.compile_run()
    return model
