"""Faults the tests inject into real runs, kept out of the training path: with ``LLADA_FAULTS``
set, ``install`` wraps the built trainer's own methods; without it nothing here runs.

    LLADA_FAULTS="hang=RANK:STEP,save_delay=STEP:SECONDS"

``hang``: that rank hangs in the data phase of step STEP, on a fresh start only (a stuck
filesystem or a dead peer: the hang watchdog's tests). ``save_delay``: the background write of
step STEP's checkpoint (checkpoint.async_save) is held back SECONDS (a kill -9 while a checkpoint is
being written).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Dict, Tuple

ENV = "LLADA_FAULTS"
KINDS = ("hang", "save_delay")


def faults(env=os.environ) -> Dict[str, Tuple[int, float]]:
    """{kind: (first, second)} of ``LLADA_FAULTS``; a malformed entry is an error naming it."""
    found = {}
    for item in filter(None, (p.strip() for p in env.get(ENV, "").split(","))):
        kind, _, value = item.partition("=")
        first, _, second = value.partition(":")
        try:
            if kind not in KINDS:
                raise ValueError(kind)
            found[kind] = (int(first), float(second))
        except ValueError:
            raise ValueError(f"{ENV}: {item!r} is not one of hang=RANK:STEP, "
                             "save_delay=STEP:SECONDS") from None
    return found


def install(trainer, env=os.environ) -> None:
    """The faults ``LLADA_FAULTS`` names, wrapped around this trainer's methods."""
    wanted = faults(env)
    if "hang" in wanted:
        rank, step = wanted["hang"]
        if rank == trainer.world.rank and trainer.step == 0:
            _hang_at(trainer, int(step))
    if "save_delay" in wanted:
        step, seconds = wanted["save_delay"]
        _delay_save(trainer.checkpoints.checkpointer, step, seconds)


def _hang_at(trainer, step: int) -> None:
    real = trainer._next_batch

    def next_batch():
        if trainer.step + 1 == step:
            hang_forever(trainer.world.rank, step)
        return real()
    trainer._next_batch = next_batch


def hang_forever(rank: int, step: int) -> None:
    print(f"llada: {ENV}: rank {rank} hangs in step {step} at {time.time():.3f}",
          file=sys.stderr, flush=True)
    while True:
        time.sleep(3600)


def _delay_save(checkpointer, step: int, seconds: float) -> None:
    real = checkpointer._complete

    def complete(at, tmp, final, meta, sums, small, writer, captured):
        if captured is not None and at == step:  # in the background, before it writes
            time.sleep(seconds)
        return real(at, tmp, final, meta, sums, small, writer, captured)
    checkpointer._complete = complete
