"""Checkpoints that never leave a run without a usable one: when to save, the atomic save,
which checkpoints are complete, which one a run resumes from, and retention. What the directory
holds, by name: framework/checkpoint/files.py.

Atomicity: every rank writes into ``step_N.tmp``, hashing each file as it writes it; after a
barrier each node syncs its page cache, then rank 0 lists what is there, with the sizes and the
checksums every rank sent it, into meta.json, renames the directory to ``step_N`` and only then
moves ``latest``. A checkpoint is *complete* when meta.json parses, matches its own checksum and
every file it lists is there with its recorded size; its content is checked against the checksums
at resume (framework/checkpoint/integrity.py, resume.py). On resume an incomplete, corrupt or
damaged newest one is skipped with a warning and the previous complete one is used. Old
checkpoints are deleted only after a newer one is complete.
"""

from __future__ import annotations

import collections
import io
import json
import os
import random
import shutil
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from data_pipeline.files import atomic_write
from data_pipeline.tokenizer import TOKENIZER_FILES
from framework.checkpoint.async_save import async_engine
from framework.checkpoint.files import (FORMAT, LATEST, META, TOKENIZER, deepspeed_files,
                                        rank_file, step_of, tag_for)
from framework.checkpoint.integrity import (ALGORITHM, damaged, hash_bytes, hash_file,
                                            hashing_engine, meta_bytes, meta_problem)
from framework.config import CheckpointConfig, ConfigError
from framework.parallel.world import World


class CheckpointError(RuntimeError):
    """A checkpoint could not be written completely. One line, names the checkpoint and cause."""


def read_meta(tag_dir: Path) -> dict:
    return json.loads((tag_dir / META).read_text())


def problem(tag_dir: Path) -> Optional[str]:
    """Why this checkpoint cannot be used (missing or corrupt metadata, a missing or truncated
    file), or None when it is complete."""
    try:
        meta = read_meta(tag_dir)
        if meta.get("format") != FORMAT:
            return f"{META} has format {meta.get('format')!r}, not {FORMAT}"
        files: Dict[str, int] = dict(meta["files"])
        layout = meta["layout"]
        # what every rank must have written, whether or not rank 0 saw it when listing
        # the tokenizer under its kind's name (data_pipeline/tokenizer.py TOKENIZER_FILES)
        tokenizer = next((n for n in TOKENIZER_FILES if n in meta["files"]), TOKENIZER)
        required = [*deepspeed_files(layout), tokenizer,
                    *(rank_file("rng", r) for r in range(layout["world_size"])),
                    *(rank_file("data", r) for r in range(layout["dp"]))]
    except FileNotFoundError:
        return f"no {META}"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{META} unreadable ({type(e).__name__})"
    if meta_problem(meta) is not None:
        return meta_problem(meta)
    for rel in required:
        if rel not in files:
            return f"{rel} missing"
    for rel, size in files.items():
        path = tag_dir / rel
        if not path.is_file():
            return f"{rel} missing"
        if path.stat().st_size != size:
            return f"{rel} is {path.stat().st_size} bytes, {size} were written"
    return None


def complete_checkpoints(root: Path, warn: Callable[[str], None]) -> List[Tuple[int, Path]]:
    """(step, path) of the complete checkpoints under root, oldest first; each incomplete one
    gets a warning."""
    found = []
    for path in sorted(root.glob("step_*")):
        step = step_of(path)
        if step is None or not path.is_dir():
            continue
        why = problem(path)
        if why is None:
            found.append((step, path))
        else:
            warn(f"checkpoint {path} is incomplete or corrupt ({why}); not used")
    return sorted(found)


def resume_candidates(spec: str, root: Path, warn: Callable[[str], None],
                      before: Optional[int] = None) -> Tuple[List[Path], bool]:
    """The checkpoints ``checkpoint.resume`` (auto | never | PATH) may resume from, newest first,
    each complete by its sizes, and whether the first must be used (strict: a PATH naming one
    step_N), or a damaged one gives way to the next. ``before``: a rollback, to the newest
    complete checkpoint before that step. Their content is checked by the caller."""
    ours = [p for p in root.glob("step_*") if step_of(p) is not None]
    if before is not None:
        found = [path for step, path in complete_checkpoints(root, warn) if step < before]
        if not found:
            raise ConfigError(f"train.on_divergence=rollback: no complete checkpoint under {root} "
                              f"before step {before} to roll back to")
        return found[::-1], False
    if spec == "never":
        if ours:
            raise ConfigError(f"checkpoint.resume=never, but {root} holds checkpoints: resume "
                              "(checkpoint.resume=auto) or choose another run.dir")
        return [], False
    if spec == "auto":
        found = complete_checkpoints(root, warn)
        if ours and not found:  # never silently start over a run whose checkpoints all fail
            raise ConfigError(f"checkpoint.resume=auto: none of the {len(ours)} checkpoints "
                              f"under {root} is complete (see the warnings); move them away or "
                              "name one with checkpoint.resume=PATH")
        return [path for _, path in found[::-1]], False
    return checkpoint_candidates(Path(spec), warn, key="checkpoint.resume")


def checkpoint_candidates(path: Path, warn: Callable[[str], None],
                          key: str) -> Tuple[List[Path], bool]:
    """A checkpoint named by its step_N directory (exactly that one: strict) or by a checkpoints
    directory (its complete ones, newest first)."""
    if (path / META).exists() or step_of(path) is not None:
        why = problem(path)
        if why is not None:
            raise ConfigError(f"{key}: {path} cannot be used ({why})")
        return [path], True
    if not path.is_dir():
        raise ConfigError(f"{key}: {path} is not a checkpoint or checkpoints directory")
    found = complete_checkpoints(path, warn)
    if not found:
        raise ConfigError(f"{key}: no complete checkpoint under {path}")
    return [p for _, p in found[::-1]], False


def resolve_checkpoint(path: Path, warn: Callable[[str], None], key: str,
                       verify: bool = True) -> Path:
    """The checkpoint ``path`` names. ``verify`` (one process: export, validation, inference):
    its content checked in full, a damaged newest one of a checkpoints directory giving way to
    the one before; without it, by its sizes only (``init.from``, where the ranks check the
    content together: framework/checkpoint/resume.py ``damaged_anywhere``)."""
    found, strict = checkpoint_candidates(path, warn, key)
    if not verify:
        return found[0]
    for tag_dir in found:
        bad = verify_checkpoint(tag_dir)
        if not bad:
            return tag_dir
        if strict:
            raise ConfigError(f"{key}: {tag_dir} is damaged: {'; '.join(bad)}")
        warn(f"checkpoint {tag_dir} is damaged ({'; '.join(bad)}); not used")
    raise ConfigError(f"{key}: every complete checkpoint under {path} is damaged (see the "
                      "warnings)")


def verify_checkpoint(tag_dir: Path) -> List[str]:
    """Everything wrong with one checkpoint, content included: [] when it is intact."""
    why = problem(tag_dir)
    if why is not None:
        return [why]
    meta = read_meta(tag_dir)
    return damaged(tag_dir, meta, sorted(meta["files"]))


def checkpoints_under(path: Path) -> List[Path]:
    """The step_N directories a path names: itself, those of a checkpoints directory, or those
    of a run directory's checkpoints/."""
    if (path / META).exists() or step_of(path) is not None:
        return [path]
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    return sorted(p for p in root.glob("step_*") if step_of(p) is not None and p.is_dir())


def set_aside_newer(root: Path, step: int, warn: Callable[[str], None]) -> None:
    """Resuming from step S abandons the checkpoints after S (a rollback, or ones that were
    incomplete): renamed to step_M.abandoned, never deleted, so that a later ``auto`` resume
    cannot pick them up and retention never measures against them."""
    for path in sorted(root.glob("step_*")):
        later = step_of(path)
        if later is not None and later > step:
            aside = path.with_name(f"{path.name}.abandoned")
            if aside.exists():
                shutil.rmtree(aside)
            os.replace(path, aside)
            warn(f"{path} is after the resumed step {step}: moved aside to {aside.name}")


def to_keep(steps: List[int], keep: int, keep_every: int) -> set:
    """Retention among complete checkpoints: the newest ``keep``, plus every ``keep_every``-th."""
    kept = set(sorted(steps)[-keep:])
    if keep_every:
        kept |= {s for s in steps if s % keep_every == 0}
    return kept


def best_step(complete: List[Tuple[int, Path]]) -> Optional[int]:
    """The step of the complete checkpoint with the lowest validation loss in its meta.json (the
    evaluation of the step it was saved at); None when none has one."""
    best: Optional[Tuple[float, int]] = None
    for step, path in complete:
        try:
            loss = float(read_meta(path)["validation"]["loss"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if loss == loss and (best is None or loss < best[0]):  # NaN never wins
            best = (loss, step)
    return None if best is None else best[1]


# ----------------------------------------------------------------------------- RNG state
def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        from megatron.core.tensor_parallel import get_cuda_rng_tracker
        state["cuda"] = torch.cuda.get_rng_state()  # this rank's device only
        state["cuda_tracker"] = get_cuda_rng_tracker().get_states()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        from megatron.core.tensor_parallel import get_cuda_rng_tracker
        torch.cuda.set_rng_state(state["cuda"])
        get_cuda_rng_tracker().set_states(state["cuda_tracker"])


# ----------------------------------------------------------------------------- saving
class Checkpointer:
    """When to save (every ``interval`` steps, every ``interval_minutes``, at the end, on
    request), the atomic save itself, and retention."""

    def __init__(self, cfg: CheckpointConfig, root: Path, world: World, tokenizer: Path,
                 log: Callable[[str], None]):
        """``tokenizer``: the data's SentencePiece model, copied into every checkpoint.
        Collective where saves are asynchronous: their background collectives get a group."""
        self.cfg, self.root, self.world, self.log = cfg, root, world, log
        self.tokenizer = tokenizer
        self.async_save = world.device.type == "cuda" if cfg.async_save is None \
            else cfg.async_save
        # a group of its own: its collectives run beside the training's, in another thread
        self._group = dist.new_group(backend="gloo") if self.async_save else None
        self._saving: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None
        # (step, path, seconds from the save's start) of background saves completed since
        # the trainer last took them
        self.completed: collections.deque = collections.deque()
        # [due by rank 0's clock, save requested, stop wanted]: agreed once per step
        self._flags = torch.zeros(3, device=world.device)
        self._last_save = time.monotonic()
        self._requested = False
        self._retention: Optional[threading.Thread] = None

    def request(self) -> None:
        """Save at the end of the current step (e.g. from a signal handler: only sets a flag)."""
        self._requested = True

    def due(self, step: int, final: bool, stop: bool = False) -> Tuple[bool, bool]:
        """(save, stop) after ``step``, the same answer on every rank (collective). ``stop``:
        this rank wants the run to stop here; any rank's wish stops all, and a stop saves."""
        cfg = self.cfg
        by_step = (cfg.interval > 0 and step % cfg.interval == 0) or (final and cfg.save_final)
        # the clock, a request and a stop are per rank: agree on them, or ranks would part ways
        timed = cfg.interval_minutes > 0 and self.world.is_main and \
            time.monotonic() - self._last_save >= 60 * cfg.interval_minutes
        self._flags[0], self._flags[1], self._flags[2] = float(timed), float(self._requested), \
            float(stop)
        dist.all_reduce(self._flags, op=dist.ReduceOp.MAX)
        timed, requested, stop = (bool(v > 0) for v in self._flags.tolist())
        stop = stop and not final  # the last step: the run is complete, not stopped
        return by_step or timed or requested or stop, stop

    def save(self, engine, step: int, meta: dict, data_state: Optional[dict]) -> Path:
        """Every rank calls this. Returns the checkpoint's path: complete, or (async_save) once
        every rank's state is copied to host memory, its files being written in the background
        (``wait`` for them; ``latest`` names it once every rank's files are complete)."""
        self.wait()  # the previous save complete, and its retention
        tag = tag_for(step)
        final, tmp = self.root / tag, self.root / f"{tag}.tmp"
        sums: Dict[str, str] = {}  # this rank's files (relative to tmp) -> checksum
        if self.world.is_main:
            for stale in [*self.root.glob("step_*.tmp"), *self.root.glob("step_*.replaced")]:
                shutil.rmtree(stale, ignore_errors=True)  # saves that died half-way
            tmp.mkdir(parents=True)
            name = Path(self.tokenizer).name  # SentencePiece's or Hugging Face's file
            if name not in TOKENIZER_FILES:
                raise ValueError(f"{self.tokenizer}: not a tokenizer file a dataset carries "
                                 f"({', '.join(TOKENIZER_FILES)})")
            shutil.copyfile(self.tokenizer, tmp / name)
            sums[name] = hash_file(tmp / name)
        dist.barrier()
        writer = async_engine(engine, self.world.device.type == "cuda") if self.async_save \
            else hashing_engine(engine)
        engine.save_checkpoint(str(self.root), tag=tmp.name, client_state={"step": step},
                               save_latest=False)
        small = {rank_file("rng", self.world.rank): _torch_bytes(rng_state())}
        # one writer per data-parallel rank: its tensor/pipeline peers hold the same stream
        if data_state is not None and self.world.tp_rank == 0 and self.world.pp_rank == 0:
            small[rank_file("data", self.world.dp_rank)] = json.dumps(data_state).encode()
        meta = {**meta, "format": FORMAT, "step": step}
        self._last_save, self._requested = time.monotonic(), False
        if not self.async_save:
            self._complete(step, tmp, final, meta, sums, small, writer, None)
            return final
        captured = writer.captured()  # all the step waits for
        self._saving = threading.Thread(
            target=self._background, name="checkpoint-save",
            args=(step, tmp, final, meta, sums, small, writer, captured, time.monotonic()))
        self._saving.start()
        return final

    def _background(self, step, tmp, final, meta, sums, small, writer, captured,
                    start) -> None:
        try:
            self._complete(step, tmp, final, meta, sums, small, writer, captured)
            self.completed.append((step, final, time.monotonic() - start))
        except BaseException as e:  # noqa: BLE001 - raised again by wait, in the main thread
            self._error = e

    def _complete(self, step: int, tmp: Path, final: Path, meta: dict, sums: Dict[str, str],
                  small: Dict[str, bytes], writer, captured) -> None:
        """This rank's files written and hashed, then, once every rank's are on disk, rank 0
        publishes (collective: on the world, or in the background on the save's own group)."""
        group = self._group if captured is not None else None
        problem_here = None
        try:
            if captured is not None:
                writer.write(captured)
            sums.update({os.path.relpath(p, os.path.abspath(tmp)): h
                         for p, h in writer.take().items()})
            for rel, data in small.items():
                atomic_write(tmp / rel, data)
                sums[rel] = hash_bytes(data)
        except Exception as e:  # noqa: BLE001 - told to every rank below: all fail alike
            problem_here = f"rank {self.world.rank} could not write its files: {e}"
        every: Optional[List[tuple]] = [None] * self.world.world_size \
            if self.world.is_main else None
        dist.gather_object((sums, problem_here), every, dst=0, group=group)
        dist.barrier(group=group)
        # every rank's shards on disk before meta.json claims them: one sync per node, which
        # flushes what all of its ranks wrote (cheaper than each rank fsyncing each file)
        if self.world.local_rank == 0:
            os.sync()
        dist.barrier(group=group)
        verdict: List[Optional[str]] = [None]
        if self.world.is_main:
            failed = next((why for _, why in every if why is not None), None)
            try:
                if failed is not None:
                    raise CheckpointError(failed)
                sums = {rel: h for rank_sums, _ in every for rel, h in rank_sums.items()}
                self._publish(tmp, final, meta, sums)
            except Exception as e:  # noqa: BLE001 - every rank must hear of it
                verdict[0] = f"checkpoint at step {step}: {e}"
        dist.broadcast_object_list(verdict, src=0, group=group)
        if verdict[0] is not None:
            raise CheckpointError(verdict[0])
        self.log(f"llada: checkpoint {final}")
        if self.world.is_main:  # deleting old trees can be slow on a parallel filesystem
            self._retention = threading.Thread(target=self._retain, args=(step,),
                                               name="checkpoint-retention")
            self._retention.start()

    def _publish(self, tmp: Path, final: Path, meta: dict, sums: Dict[str, str]) -> None:
        """Rank 0, once every rank's files are on disk: meta.json (sizes and the checksums the
        writers computed), the rename, then ``latest``."""
        files = {str(p.relative_to(tmp)): p.stat().st_size
                 for p in sorted(tmp.rglob("*")) if p.is_file()}
        # a file no writer hashed (one DeepSpeed writes past its checkpoint engine): read back
        checksums = {rel: sums[rel] if rel in sums else hash_file(tmp / rel) for rel in files}
        atomic_write(tmp / META, meta_bytes({**meta, "files": files, "checksums": {
            "algorithm": ALGORITHM, "files": checksums}}), durable=True)
        why = problem(tmp)
        if why is not None:
            raise CheckpointError(f"{tmp} is incomplete after every rank saved ({why}); run.dir "
                                  "must be on a filesystem that all ranks share")
        replaced = None
        if final.exists():  # the same step saved again after resuming from an earlier one
            replaced = final.with_name(f"{final.name}.replaced")
            os.replace(final, replaced)
        os.replace(tmp, final)
        _fsync_dir(self.root)
        atomic_write(self.root / LATEST, final.name.encode(), durable=True)
        if replaced is not None:
            shutil.rmtree(replaced)

    def _retain(self, saved: int) -> None:
        complete = [(s, p) for s, p in complete_checkpoints(self.root, self.log) if s <= saved]
        kept = to_keep([s for s, _ in complete], self.cfg.keep, self.cfg.keep_every) | {saved}
        if self.cfg.keep_best:
            kept.add(best_step(complete))
        for path in self.root.glob("step_*"):
            step = step_of(path)
            # older complete ones beyond retention, and incomplete ones a complete one supersedes
            if step is not None and step < saved and step not in kept:
                shutil.rmtree(path, ignore_errors=True)

    def wait(self) -> None:
        """Until the last save is complete (async_save) and its retention pass has finished:
        before a save, and at the end. A background save that failed raises here."""
        if self._saving is not None:
            self._saving.join()
            self._saving = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        if self._retention is not None:
            self._retention.join()
            self._retention = None


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
