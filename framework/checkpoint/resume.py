"""Resuming a run: which checkpoint (agreed by every rank before anything is built), whether it
fits this config, and loading it back: model, optimizer, data stream, RNG and progress. The same
layout loads DeepSpeed's shards as they are; another one goes through full tensors (reshard.py).
Also what a checkpoint's meta.json records, so that saving and resuming read one definition.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import torch
import torch.distributed as dist

from data_pipeline.errors import DataConfigError
from data_pipeline.loader import saved_ranks
from framework.checkpoint.checkpointer import (CheckpointError, complete_checkpoints, read_meta,
                                               resume_candidates, set_aside_newer, set_rng_state)
from data_pipeline.files import atomic_write
from framework.checkpoint.files import ROLLBACK, ROLLBACKS, files_read, rank_file
from framework.checkpoint.integrity import damaged, detach_from_files, hashing_engine, share
from framework.config import ConfigError, ModelConfig, from_data, to_dict
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
    # the learning-rate factor and rollback count of an automatic rollback to this step
    # (rollbacks.json), which override the checkpoint's own; None: the checkpoint's
    divergence: Optional[dict] = None
    history: tuple = ()  # every automatic rollback of the run, oldest first (rollbacks.json)


@dataclass(frozen=True)
class RollbackRequest:
    """train.on_divergence=rollback: back to the newest complete checkpoint before step
    ``before``, continuing at ``lr_factor`` times the schedule; the run's ``rollbacks``-th."""
    before: int
    lr_factor: float
    rollbacks: int
    reason: str


@dataclass
class TrainState:
    """A run's progress as meta.json records it and a resume restores it; the trainer advances
    it, the checkpoint manager saves it."""
    step: int = 0  # optimizer steps done
    consumed_tokens: int = 0  # over the whole run, resumes included
    skipped_steps: int = 0  # non-finite steps skipped, over the whole run
    run_id: Optional[str] = None  # the MLflow run
    lr_factor: float = 1.0  # times the schedule: lowered by each automatic rollback
    rollbacks: int = 0  # automatic rollbacks so far (train.max_rollbacks)


def layout(world: World, *, zero_stage: int, bf16: bool, stages: Sequence[int]) -> dict:
    """What a checkpoint's files depend on (meta.json's ``layout``)."""
    return {"tp": world.tp, "pp": world.pp, "dp": world.dp, "world_size": world.world_size,
            "zero_stage": zero_stage, "precision": "bf16" if bf16 else "fp32",
            "stages": list(stages)}


@dataclass(frozen=True)
class RunRecord:
    """What every checkpoint of the run records of it, and a resume checks against."""
    config: dict  # the resolved config as plain data
    layout: dict  # ``layout()``: what the shards depend on
    tokenizer: Path  # the data's SentencePiece model, copied into every checkpoint
    tokenizer_sha256: List[str]  # of each dataset
    special_ids: dict


def checkpoint_meta(state: TrainState, run: RunRecord) -> dict:
    """meta.json of a checkpoint of this state (the Checkpointer adds format, step, files)."""
    import deepspeed
    return {"consumed_samples": state.step * run.config["train"]["global_batch_size"],
            "consumed_tokens": state.consumed_tokens, "skipped_steps": state.skipped_steps,
            "lr_factor": state.lr_factor, "rollbacks": state.rollbacks,
            "tracking": {"run_id": state.run_id}, "layout": run.layout,
            "tokenizer_sha256": run.tokenizer_sha256, "special_ids": run.special_ids,
            "config": run.config,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__}}


def agree_on_resume(spec: str, root: Path, world: World, check: Callable[[Path, dict], None],
                    log: Callable[[str], None], now: dict,
                    request: Optional[RollbackRequest] = None) -> "PendingResume":
    """``checkpoint.resume`` resolved on rank 0 (its warnings printed once) into the checkpoints
    the run may resume from, the newest ``check``-ed against this config, agreed by all ranks;
    each rank starts checking the content of the files it will read from the newest, in the
    background, while the caller builds the engine. ``now``: this run's shard layout
    (``layout``). ``request``: an automatic rollback, to the newest intact checkpoint before its
    step."""
    warn = (lambda msg: log(f"llada: warning: {msg}")) if world.is_main else (lambda _: None)

    def candidates():
        found, strict = resume_candidates(spec, root, warn,
                                          before=None if request is None else request.before)
        if found:  # a config that does not fit fails now, before anything is built
            check(found[0], read_meta(found[0]))
        return [str(p) for p in found], strict

    plan: List[Optional[object]] = [None, None]  # [([paths], strict), error]
    if world.is_main:
        plan = _on_rank0(candidates)
    dist.broadcast_object_list(plan, src=0)
    if plan[1] is not None:
        raise ConfigError(plan[1])
    found, strict = plan[0]
    return PendingResume([Path(p) for p in found], strict, root, world, check, warn, now,
                         request)


class PendingResume:
    """The checkpoints a start may resume from, agreed; the newest one's content being checked
    in a background thread (reading only: no collective) until ``finish``."""

    def __init__(self, candidates: List[Path], strict: bool, root: Path, world: World, check,
                 warn, now: dict, request: Optional[RollbackRequest]):
        self.candidates, self.strict, self.root, self.world = candidates, strict, root, world
        self.check, self.warn, self.now, self.request = check, warn, now, request
        self.resuming = bool(candidates)  # a checkpoint will be loaded (or the start fails)
        self._first: List[List[str]] = []
        self._thread = None
        if candidates:
            self._thread = threading.Thread(
                target=lambda: self._first.append(_damaged_here(candidates[0], world, now)),
                name="checkpoint-verify", daemon=True)
            self._thread.start()

    def finish(self) -> Optional[Resume]:
        """The checkpoint resumed from, intact on every rank (collective): a damaged one is
        passed over with a warning, or refused when named exactly; then this config's check,
        whether it is a rollback, and the newer checkpoints moved aside (rank 0)."""
        chosen, passed_over = None, []
        for i, path in enumerate(self.candidates):
            if i == 0:
                self._thread.join()
                bad = _agree(self._first[0], self.world)
            else:
                bad = damaged_anywhere(path, self.world, self.now)
            if not bad:
                chosen = path
                break
            if self.strict:  # a checkpoint named exactly is never silently replaced by another
                raise ConfigError(f"checkpoint.resume: {path} is damaged: {'; '.join(bad)}")
            self.warn(f"checkpoint {path} is damaged ({'; '.join(bad)}); not used")
            passed_over.append(path)
        if self.candidates and chosen is None:
            raise ConfigError(f"checkpoint.resume: every complete checkpoint under {self.root} "
                              "is damaged (see the warnings); `llada checkpoint verify` lists "
                              "them")
        if chosen is None:
            return None
        answer: List[Optional[object]] = [None, None]
        if self.world.is_main:
            answer = _on_rank0(lambda: _decide(chosen, self.root, self.check, self.warn,
                                               self.request, passed_over))
        dist.broadcast_object_list(answer, src=0)
        if answer[1] is not None:
            raise ConfigError(answer[1])
        path, step, rollback, divergence, history = answer[0]
        return Resume(Path(path), step, rollback, divergence, history)


def _on_rank0(fn) -> list:
    """[fn(), None], or [None, the one-line error] that every rank must hear of."""
    try:
        return [fn(), None]
    except ConfigError as e:
        return [None, str(e)]
    except Exception as e:  # noqa: BLE001 - every rank must hear of it, not only rank 0
        return [None, f"checkpoint.resume: {type(e).__name__}: {e}"]


def damaged_anywhere(path: Path, world: World, now: Optional[dict] = None) -> List[str]:
    """The damaged files of a checkpoint, checked over the world (collective, one answer on
    every rank); ``now``: the shard layout it is about to be loaded into, if any."""
    return _agree(_damaged_here(path, world, now), world)


def _agree(local: List[str], world: World) -> List[str]:
    every: List[List[str]] = [[] for _ in range(world.world_size)]
    dist.all_gather_object(every, local)
    return sorted({b for rank_bad in every for b in rank_bad})


def _damaged_here(path: Path, world: World, now: Optional[dict]) -> List[str]:
    """This rank's share of the check of a checkpoint's content. Under the same layout each rank
    checks the files it is about to read, which leaves them in the page cache for the load;
    otherwise (resharding, pipeline stages' layer files) every file is checked once over the
    world."""
    try:
        meta = read_meta(path)
        saved = meta["layout"]
        if now is not None and world.pp == 1 and all(saved[k] == now[k] for k in SHARD_LAYOUT):
            rels = files_read(saved, rank=world.rank, dp_rank=world.dp_rank,
                              mp_rank=world.tp_rank, world_size=world.world_size, dp=world.dp)
        else:
            rels = share(meta, world.rank, world.world_size)
        return damaged(path, meta, rels)
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"meta.json: unreadable ({type(e).__name__})"]


def _decide(path: Path, root: Path, check, warn, request: Optional[RollbackRequest],
            passed_over: List[Path]) -> tuple:
    """Rank 0: the chosen checkpoint against this config, whether resuming there is a rollback,
    the rollback's record, and the newer checkpoints moved aside."""
    meta = read_meta(path)
    check(path, meta)
    step = meta["step"]
    newest = max((s for s, p in complete_checkpoints(root, lambda _: None)
                  if p not in passed_over), default=-1)
    rollback = newest > step or _pending_rollback(root) == step or request is not None
    history = rollbacks(root)
    if request is not None:  # durable before anything moves: a failed start decides it again
        divergence = {"at_step": request.before, "to": step, "lr_factor": request.lr_factor,
                      "rollbacks": request.rollbacks, "reason": request.reason,
                      "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        history.append(divergence)
        atomic_write(root / ROLLBACKS, json.dumps(history, indent=1).encode(), durable=True)
    else:
        divergence = next((r for r in reversed(history) if r.get("to") == step), None)
    if rollback:  # durable before the evidence (the newer checkpoints) goes aside
        atomic_write(root / ROLLBACK, json.dumps({"to": step}).encode(), durable=True)
    set_aside_newer(root, step, warn)
    return str(path), step, rollback, divergence, history


def rollbacks(root: Path) -> List[dict]:
    """The run's automatic rollbacks (train.on_divergence=rollback), oldest first."""
    try:
        return list(json.loads((root / ROLLBACKS).read_text()))
    except FileNotFoundError:
        return []
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"{root / ROLLBACKS}: unreadable ({type(e).__name__}); it records the "
                          "run's rollbacks and their learning-rate factors") from None


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
    saved = dict(meta["config"])
    # the model as this version reads it: keys added since (qkv_bias, qk_norm, ...) at their
    # defaults, which is what the saved run had; where its weights came from (model.from_hf, a
    # directory that may have moved) is not part of the model
    saved["model"] = model_section(saved["model"], f"checkpoint.resume: {path}")
    model = model_section(config["model"], "model")
    # the objective too: its optimizer state and data stream belong to it (a run that changes
    # objective starts afresh from the weights: init.from), and the shift, which changes what
    # the head's outputs mean
    objective = {"kind": "pretrain", "logit_shift": False, **saved.get("objective", {})}
    for section, keys, theirs, ours in (
            ("model", sorted(model), saved["model"], model),
            ("train", ["global_batch_size"], saved["train"], config["train"]),
            ("objective", ["kind", "logit_shift"], objective, config["objective"])):
        for key in keys:
            if theirs.get(key) != ours[key]:
                raise ConfigError(
                    f"checkpoint.resume: {path} was trained with {section}.{key}="
                    f"{theirs.get(key)}, the config has {ours[key]}")
    if meta["tokenizer_sha256"] != tokenizer_sha256:
        raise ConfigError(f"checkpoint.resume: {path} was trained on data of another "
                          f"tokenizer than data.datasets ({tokenizer} differs)")


def model_section(model: dict, key: str) -> dict:
    """A model section (a recipe's or a checkpoint's) with every key this version has, at its
    default where absent (``head_dim`` null where it is hidden / heads), without ``from_hf``."""
    cfg = from_data(ModelConfig, {k: v for k, v in model.items() if k != "from_hf"}, key=key)
    return {k: v for k, v in to_dict(cfg).items() if k != "from_hf"}


def load_checkpoint(path: Path, engine, data, world: World, now: dict,
                    log: Callable[[str], None]) -> TrainState:
    """Model, optimizer, data stream and RNG from a complete checkpoint into this layout
    (``now``, as ``layout`` gives it); returns the run's progress."""
    meta = read_meta(path)
    saved = meta["layout"]
    if all(saved[k] == now[k] for k in SHARD_LAYOUT):
        hashing_engine(engine)  # its load: memory-mapped
        loaded, _ = engine.load_checkpoint(str(path.parent), tag=path.name,
                                           load_optimizer_states=True,
                                           load_lr_scheduler_states=False)
        if loaded is None:  # DeepSpeed only logs a missing file; resuming without it is wrong
            raise CheckpointError(f"{path}: DeepSpeed found no model states to load")
        detach_from_files(engine)
        how = "same layout"
    else:
        _reshard(path, saved, engine, world)
        how = (f"resharded from tp {saved['tp']} pp {saved['pp']} dp {saved['dp']} "
               f"ZeRO-{saved['zero_stage']} {saved['precision']}")

    # the saved ranks that held this rank's data streams (its own, under the same size)
    try:
        data.load_state_dicts([json.loads((path / rank_file("data", r)).read_text())
                               for r in saved_ranks(world.dp_rank, world.dp, saved["dp"])])
    except DataConfigError as e:
        raise ConfigError(f"checkpoint.resume: {path}: {e}") from None
    if saved["world_size"] == world.world_size:  # else no rank has a state of its own
        set_rng_state(torch.load(path / rank_file("rng", world.rank), weights_only=False))
    engine.global_steps = meta["step"]
    engine.global_samples = meta["consumed_samples"]
    log(f"llada: resumed from {path} at step {meta['step']} ({how})")
    return TrainState(step=meta["step"], consumed_tokens=meta["consumed_tokens"],
                      skipped_steps=meta.get("skipped_steps", 0),
                      run_id=meta.get("tracking", {}).get("run_id"),
                      lr_factor=meta.get("lr_factor", 1.0), rollbacks=meta.get("rollbacks", 0))


def _reshard(path: Path, saved: dict, engine, world: World) -> None:
    """Any saved layout and ZeRO stage into this engine: each rank reads only the slices of its
    own parameters, memory-mapped (framework/checkpoint/reshard.py)."""
    from framework.checkpoint.reshard import Layout, ReshardError, load_resharded
    try:
        load_resharded(path, Layout.saved(saved), engine, world.tp_rank, world.tp)
    except ReshardError as e:
        raise ConfigError(f"checkpoint.resume: {path}: {e}") from None
