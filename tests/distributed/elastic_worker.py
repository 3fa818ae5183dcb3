"""One process of the elastic-resume runs of test_elastic_resume.py, started by torchrun (or the
test process itself: a world of one): for each run in turn, build the trainer from its
overrides, train (``fit``; or, for a run with ``stop_after``, that many steps and a checkpoint)
and record every sample of every micro-batch it took: (step, global index, dataset, shard,
member, a hash of its mask). Rank 0 writes ``OUT/<run>.json`` with the records of every
data-parallel rank.

    python -m torch.distributed.run --nproc-per-node N -m tests.distributed.elastic_worker \
        OUT_DIR RUNS_JSON
"""

from __future__ import annotations

import gc
import hashlib
import json
import sys
from pathlib import Path

import torch.distributed as dist

from framework.config import load_config
from framework.training.factory import build_trainer
from framework.training.trainer import Trainer
from tests.conftest import DEBUG_RECIPE
from tests.distributed.layout_worker import reset_parallel_state

RECORDS: list = []


def _recording(real):
    def next_batch(self):
        batch = real(self)
        for index, source, mask in zip(batch.index, batch.source, batch.mask):
            digest = hashlib.blake2b(mask.numpy().tobytes(), digest_size=8).hexdigest()
            RECORDS.append([batch.step, int(index), *source.tolist(), digest])
        return batch
    return next_batch


def run(out: Path, name: str, spec: dict) -> None:
    """One run: ``spec`` = {"overrides": [...], "stop_after": steps or absent}."""
    cfg = load_config(DEBUG_RECIPE, spec["overrides"])
    reset_parallel_state(cfg)
    RECORDS.clear()
    real = Trainer._next_batch
    Trainer._next_batch = _recording(real)
    try:
        trainer = build_trainer(cfg)
        if "stop_after" in spec:
            for _ in range(spec["stop_after"]):
                trainer.train_step()
            trainer.save_checkpoint()
            trainer.checkpoints.wait()
            trainer.data.close()
        else:
            trainer.fit()
        world = trainer.world
        mine = list(RECORDS) if world.tp_rank == 0 and world.pp_rank == 0 else []
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
        if dist.get_rank() == 0:
            (out / f"{name}.json").write_text(json.dumps(sorted(r for part in every
                                                                for r in part)))
        trainer.engine.destroy()
    finally:
        Trainer._next_batch = real
    del trainer
    gc.collect()
    dist.barrier()


def main(out: str, runs: str) -> None:
    for name, spec in json.loads(runs).items():
        run(Path(out), name, spec)
    from framework.parallel.world import shutdown_world
    shutdown_world()


if __name__ == "__main__":
    main(*sys.argv[1:])
