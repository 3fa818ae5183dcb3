"""Resuming a run: which checkpoint (agreed by every rank before anything is built), whether it
fits this config, and loading it back: model, optimizer, data stream, RNG and progress. The same
layout loads DeepSpeed's shards as they are; another one goes through full tensors (reshard.py).
Also what a checkpoint's meta.json records, so that saving and resuming read one definition.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import torch
import torch.distributed as dist

from framework.checkpoint.checkpointer import (CheckpointError, complete_checkpoints, read_meta,
                                               resolve_resume, set_aside_newer, set_rng_state)
from data_pipeline.files import atomic_write
from framework.checkpoint.files import ROLLBACK, rank_file
from framework.config import ConfigError
from framework.parallel.world import World

# what the shards depend on: a resume under other values reshards (or is refused)
SHARD_LAYOUT = ("tp", "pp", "dp", "zero_stage", "precision", "stages")


@dataclass(frozen=True)
class Resume:
    path: Path  # the step_N directory
    step: int
    # to before a checkpoint the run had completed (an explicit checkpoint.resume=PATH older than
    # the newest): the steps after it take another path, so MLflow and metrics.jsonl keep the
    # old records apart (a child run; a side file) instead of treating them as already logged
    rollback: bool


@dataclass
class Progress:
    """A run's progress as meta.json records it and a resume restores it."""
    step: int = 0  # optimizer steps done
    consumed_tokens: int = 0  # over the whole run, resumes included
    skipped_steps: int = 0  # non-finite steps skipped, over the whole run
    run_id: Optional[str] = None  # the MLflow run


def layout(world: World, *, zero_stage: int, bf16: bool, stages: Sequence[int],
           data_workers: int) -> dict:
    """What a checkpoint's files depend on (meta.json's ``layout``)."""
    return {"tp": world.tp, "pp": world.pp, "dp": world.dp, "world_size": world.world_size,
            "zero_stage": zero_stage, "precision": "bf16" if bf16 else "fp32",
            "stages": list(stages), "data_workers": data_workers}


def checkpoint_meta(progress: Progress, *, global_batch_size: int, layout: dict,
                    tokenizer_sha256: List[str], special_ids: dict, config: dict) -> dict:
    """meta.json of a checkpoint of this progress (the Checkpointer adds format, step, files)."""
    import deepspeed
    return {"consumed_samples": progress.step * global_batch_size,
            "consumed_tokens": progress.consumed_tokens, "skipped_steps": progress.skipped_steps,
            "tracking": {"run_id": progress.run_id}, "layout": layout,
            "tokenizer_sha256": tokenizer_sha256, "special_ids": special_ids, "config": config,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__}}


def agree_on_resume(spec: str, root: Path, world: World, check: Callable[[Path, dict], None],
                    log: Callable[[str], None]) -> Optional[Resume]:
    """``checkpoint.resume`` resolved and ``check``-ed against this config on rank 0 (its
    warnings printed once), checkpoints after it set aside, agreed by all ranks."""
    answer: List[Optional[object]] = [None, None]  # [(path, step, rollback), error]
    if world.is_main:
        warn = lambda msg: log(f"llada: warning: {msg}")  # noqa: E731
        try:
            path = resolve_resume(spec, root, warn)
            if path is not None:
                meta = read_meta(path)
                check(path, meta)
                step = meta["step"]
                newest = max((s for s, _ in complete_checkpoints(root, lambda _: None)),
                             default=-1)
                rollback = newest > step or _pending_rollback(root) == step
                if rollback:  # durable before the evidence (the newer checkpoints) goes aside
                    atomic_write(root / ROLLBACK, json.dumps({"to": step}).encode(),
                                 durable=True)
                set_aside_newer(root, step, warn)
                answer[0] = (str(path), step, rollback)
        except ConfigError as e:
            answer[1] = str(e)
        except Exception as e:  # noqa: BLE001 - every rank must hear of it, not only rank 0
            answer[1] = f"checkpoint.resume: {type(e).__name__}: {e}"
    dist.broadcast_object_list(answer, src=0)
    if answer[1] is not None:
        raise ConfigError(answer[1])
    if answer[0] is None:
        return None
    path, step, rollback = answer[0]
    return Resume(Path(path), step, rollback)


def _pending_rollback(root: Path) -> Optional[int]:
    try:
        return int(json.loads((root / ROLLBACK).read_text())["to"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def rollback_done(root: Path, world: World) -> None:
    """metrics.jsonl and MLflow have carried out the rollback (or there was none): the next
    start from that step is an ordinary resume."""
    if world.is_main:
        (root / ROLLBACK).unlink(missing_ok=True)


def check_resumable(path: Path, meta: dict, config: dict, tokenizer_sha256: List[str],
                    tokenizer: Path) -> None:
    """The model, the global batch and the objective must be the saved ones, and the data of the
    same tokenizer; everything else (layout, precision, schedule, ...) may change on resume."""
    saved = meta["config"]
    # the objective too: its optimizer state and data stream belong to it (a run that changes
    # objective starts afresh from the weights: init.from)
    saved.setdefault("objective", {}).setdefault("kind", "pretrain")  # before the choice existed
    for section, keys in (("model", sorted(config["model"])), ("train", ["global_batch_size"]),
                          ("objective", ["kind"])):
        for key in keys:
            if saved[section].get(key) != config[section][key]:
                raise ConfigError(
                    f"checkpoint.resume: {path} was trained with {section}.{key}="
                    f"{saved[section].get(key)}, the config has {config[section][key]}")
    if meta["tokenizer_sha256"] != tokenizer_sha256:
        raise ConfigError(f"checkpoint.resume: {path} was trained on data of another "
                          f"tokenizer than data.datasets ({tokenizer} differs)")


def load_checkpoint(path: Path, engine, data, world: World, now: dict,
                    log: Callable[[str], None]) -> Progress:
    """Model, optimizer, data stream and RNG from a complete checkpoint into this layout
    (``now``, as ``layout`` gives it); returns the run's progress."""
    meta = read_meta(path)
    saved = meta["layout"]
    if all(saved[k] == now[k] for k in SHARD_LAYOUT):
        loaded, _ = engine.load_checkpoint(str(path.parent), tag=path.name,
                                           load_optimizer_states=True,
                                           load_lr_scheduler_states=False)
        if loaded is None:  # DeepSpeed only logs a missing file; resuming without it is wrong
            raise CheckpointError(f"{path}: DeepSpeed found no model states to load")
        how = "same layout"
    else:
        _reshard(path, saved, engine, world)
        how = (f"resharded from tp {saved['tp']} pp {saved['pp']} dp {saved['dp']} "
               f"ZeRO-{saved['zero_stage']} {saved['precision']}")

    def data_state(dp_rank: int) -> dict:
        return json.loads((path / rank_file("data", dp_rank)).read_text())

    if saved["dp"] == world.dp:  # this rank's own stream
        data.load_state_dict(data_state(world.dp_rank))
    else:  # every saved rank's, regrouped
        data.load_state_dicts([data_state(r) for r in range(saved["dp"])])
    if saved["world_size"] == world.world_size:  # else no rank has a state of its own
        set_rng_state(torch.load(path / rank_file("rng", world.rank), weights_only=False))
    engine.global_steps = meta["step"]
    engine.global_samples = meta["consumed_samples"]
    log(f"llada: resumed from {path} at step {meta['step']} ({how})")
    return Progress(step=meta["step"], consumed_tokens=meta["consumed_tokens"],
                    skipped_steps=meta.get("skipped_steps", 0),
                    run_id=meta.get("tracking", {}).get("run_id"))


def _reshard(path: Path, saved: dict, engine, world: World) -> None:
    from framework.checkpoint.reshard import (Layout, ReshardError, load_full_state,
                                              read_full_state)
    names = {n.removeprefix("module.") for n, _ in engine.module.named_parameters()}
    try:
        state = read_full_state(path, Layout.saved(saved), names)
        load_full_state(engine, engine.module, state, world.tp_rank, world.tp)
    except ReshardError as e:
        raise ConfigError(f"checkpoint.resume: {path}: {e}") from None
