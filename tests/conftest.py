"""Shared fixtures: a small tokenizer trained once per session, tiny-model overrides, and a
single-process world for in-process model and trainer tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest

REPO = Path(__file__).resolve().parents[1]
DEBUG_RECIPE = REPO / "recipes" / "debug-cpu.yaml"

os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="session")
def small_tokenizer(tmp_path_factory) -> Path:
    """A 512-piece SentencePiece model trained on 1 MB of the standard library."""
    from data_pipeline.tokenizer import train_tokenizer
    from framework.config import DataConfig

    out = tmp_path_factory.mktemp("tokenizer")
    tok = train_tokenizer(DataConfig(tokenizer_vocab_size=512, tokenizer_train_bytes=1_000_000), out)
    return tok.path


def quick_overrides(run_dir: Path, tokenizer: Path, steps: int = 30) -> List[str]:
    """The debug recipe's model on shorter sequences, smaller batches and a small ready-made
    tokenizer: a few dozen steps in seconds."""
    return [
        f"run.dir={run_dir}", f"data.tokenizer_model={tokenizer}", f"train.steps={steps}",
        "data.seq_len=64", "train.micro_batch_size=8", "train.global_batch_size=16",
        "optimizer.lr=3e-3", "schedule.warmup_steps=5", "tracking.log_interval=10",
    ]


_RENDEZVOUS = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}


def run_cli(args: List[str], timeout: int = 600, nproc: int = 0) -> subprocess.CompletedProcess:
    """``llada ...`` in a fresh process; with nproc, under torchrun with that many processes."""
    # the rendezvous variables of an in-process test world must not leak into the child
    env = {k: v for k, v in os.environ.items() if k not in _RENDEZVOUS}
    env = {**env, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1" if nproc else
           os.environ.get("OMP_NUM_THREADS", "2")}
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", "-m", "framework.cli", *args]
    else:
        cmd = [sys.executable, "-m", "framework.cli", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def world():
    """A single-process gloo world with megatron's parallel state (tp = pp = 1)."""
    from framework.config import ParallelConfig
    from framework.parallel import init_world, shutdown_world

    saved = dict(os.environ)
    w = init_world(ParallelConfig(), "cpu")
    yield w
    shutdown_world()
    os.environ.clear()
    os.environ.update(saved)
