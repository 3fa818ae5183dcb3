"""Four gloo processes, tensor parallel 2 x data parallel 2: tensor-parallel peers receive the
same micro-batches (same masks), the two data-parallel ranks different ones."""

import os
import sys

import pytest
import torch
import torch.multiprocessing as mp

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def _worker(rank, world_size, port, manifest, out_dir):
    sys.path.insert(0, str(REPO))
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    from framework.config import ParallelConfig
    from framework.parallel.world import init_world, shutdown_world
    from tests.unit.data_helpers import take, make_loader

    world = init_world(ParallelConfig(tp=2), "cpu")
    loader = make_loader([manifest], dp_rank=world.dp_rank, dp_size=world.dp, workers=2, mb=4)
    torch.save({"dp_rank": world.dp_rank, "batches": take(loader, 8)},
               os.path.join(out_dir, f"rank{rank}.pt"))
    shutdown_world()


def test_tensor_parallel_peers_see_identical_batches(small_dataset, tmp_path):
    from framework.parallel.world import _free_port

    mp.spawn(_worker, args=(4, _free_port(), small_dataset, str(tmp_path)), nprocs=4, join=True)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(4)]
    by_dp = {}
    for g in got:
        by_dp.setdefault(g["dp_rank"], []).append(g["batches"])
    assert sorted(by_dp) == [0, 1] and all(len(v) == 2 for v in by_dp.values())
    for peers in by_dp.values():
        a, b = peers
        assert all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)
    first = [by_dp[r][0][0]["index"] for r in (0, 1)]
    assert not torch.equal(first[0], first[1])
