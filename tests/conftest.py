"""Shared fixtures: a small tokenizer and a small prepared dataset built once per session,
tiny-model overrides, and a single-process world for in-process model and trainer tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import List

import pytest

REPO = Path(__file__).resolve().parents[1]
DEBUG_RECIPE = REPO / "recipes" / "debug-cpu.yaml"
SFT_RECIPE = REPO / "recipes" / "sft-debug-cpu.yaml"

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def stdlib_glob(package: str) -> str:
    """A glob of one standard-library package's source: real text, small."""
    return f"{sysconfig.get_paths()['stdlib']}/{package}/*.py"


SMALL_CORPUS = [stdlib_glob(p) for p in ("json", "email", "logging")]


@pytest.fixture(scope="session")
def small_tokenizer(tmp_path_factory) -> Path:
    """A 512-piece SentencePiece model trained on 1 MB of the standard library."""
    from data_pipeline.corpus import expand_inputs
    from data_pipeline.tokenizer import train_tokenizer
    from data_pipeline.config import TokenizerConfig

    out = tmp_path_factory.mktemp("tokenizer") / "spm.model"
    files = expand_inputs(["stdlib"])
    tok = train_tokenizer(files, TokenizerConfig(vocab_size=512, train_bytes=1_000_000), out)
    return tok.path


def prepare_small(out: Path, tokenizer: Path, seq_len: int = 64, samples_per_shard: int = 128,
                  inputs: List[str] = SMALL_CORPUS, name: str = "small",
                  holdout_fraction: float = 0.0) -> Path:
    """Shards of a few standard-library packages; returns the manifest path."""
    from data_pipeline.prepare import prepare
    from data_pipeline.config import PrepareConfig, TokenizerConfig

    prepare(PrepareConfig(inputs=list(inputs), output=str(out), name=name, seq_len=seq_len,
                          samples_per_shard=samples_per_shard, workers=2,
                          holdout_fraction=holdout_fraction,
                          tokenizer=TokenizerConfig(model=str(tokenizer))), log=lambda _: None)
    return out / "manifest.json"


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory, small_tokenizer) -> Path:
    """~2,700 sequences of 64 tokens in ~21 shards (manifest path)."""
    return prepare_small(tmp_path_factory.mktemp("small-dataset"), small_tokenizer)


@pytest.fixture(scope="session")
def small_heldout(tmp_path_factory, small_tokenizer) -> Path:
    """The held-out split (about 280 sequences of 64 tokens) of two small packages (manifest)."""
    out = tmp_path_factory.mktemp("small-heldout")
    prepare_small(out, small_tokenizer, inputs=[stdlib_glob(p) for p in ("json", "logging")],
                  holdout_fraction=0.3)
    return out / "holdout" / "manifest.json"


@pytest.fixture(scope="session")
def small_sft_dataset(tmp_path_factory, small_tokenizer) -> Path:
    """SFT shards of ~1,000 short pairs of real text (a line of a standard-library module as
    the prompt, the next as the response) in 64-token sequences, 10% of them held out under
    holdout/ (the training manifest's path)."""
    import glob
    import json

    from data_pipeline.config import PrepareConfig, TokenizerConfig
    from data_pipeline.prepare import prepare

    out = tmp_path_factory.mktemp("small-sft")
    pairs = []
    for path in sorted(glob.glob(stdlib_glob("json")))[:4]:
        lines = [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip()]
        pairs += [{"prompt": a[:80], "response": b[:80]} for a, b in zip(lines, lines[1:])]
    (out / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs[:1100]))
    prepare(PrepareConfig(inputs=[str(out / "pairs.jsonl")], output=str(out / "sft"),
                          name="small-sft", seq_len=64, samples_per_shard=128, sft=True,
                          holdout_fraction=0.1,
                          tokenizer=TokenizerConfig(model=str(small_tokenizer))),
            log=lambda _: None)
    return out / "sft" / "manifest.json"


def validation_overrides(manifest: Path, sequences: int = 24, t_samples: int = 4) -> List[str]:
    """Evaluate a held-out set ``small`` (the tests name their own eval.interval & co)."""
    return [f"data.validation=[{{name: small, manifest: {manifest}}}]",
            f"eval.sequences={sequences}", f"eval.t_samples={t_samples}"]


def quick_overrides(run_dir: Path, manifest: Path, steps: int = 30) -> List[str]:
    """The debug recipe's model on shorter sequences, smaller batches and a small ready-made
    dataset: a few dozen steps in seconds."""
    return [
        f"run.dir={run_dir}", f"data.datasets=[{{manifest: {manifest}}}]", f"train.steps={steps}",
        "data.seq_len=64", "train.micro_batch_size=8",
        "train.global_batch_size=16", "optimizer.lr=3e-3", "schedule.warmup_steps=5",
        "tracking.log_interval=10",
        # MLflow's store costs seconds per run; the tests of tracking turn it on (mlflow_server)
        "tracking.enabled=false",
        "checkpoint.save_final=false",  # the debug recipe's final save: where a test wants it
        "data.validation=[]",  # the debug recipe's held-out set: where a test wants one
    ]


_RENDEZVOUS = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}


def cli_command(args: List[str], nproc: int = 0, module: str = "framework",
                module_args: List[str] = ()) -> tuple:
    """(argv, env) of ``llada ...`` (or ``python -m module``) in a fresh process; with nproc,
    under torchrun with that many processes."""
    # the rendezvous variables of an in-process test world must not leak into the child
    env = {k: v for k, v in os.environ.items() if k not in _RENDEZVOUS}
    env = {**env, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1" if nproc else
           os.environ.get("OMP_NUM_THREADS", "2")}
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", "-m", module, *module_args, *args]
    else:
        cmd = [sys.executable, "-m", module, *module_args, *args]
    return cmd, env


def run_cli(args: List[str], timeout: int = 600, nproc: int = 0, module: str = "framework",
            module_args: List[str] = ()) -> subprocess.CompletedProcess:
    cmd, env = cli_command(args, nproc, module, module_args)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def world():
    """A single-process gloo world with megatron's parallel state (tp = pp = 1)."""
    from framework.config import ParallelConfig
    from framework.parallel.world import init_world, shutdown_world

    saved = dict(os.environ)
    w = init_world(ParallelConfig(), "cpu")
    yield w
    shutdown_world()
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(autouse=True)
def _close_test_loaders():
    """The loaders a test made with tests/unit/data_helpers.make_loader stop their workers."""
    yield
    helpers = sys.modules.get("tests.unit.data_helpers")
    if helpers is not None:
        helpers.close_loaders()


_MLFLOW_SERVER = None


def pytest_collection_finish(session):
    """When a collected test needs the MLflow server, it starts now, in the background (that
    takes seconds): the tests that use it find it up."""
    global _MLFLOW_SERVER
    from tests.integration.mlflow_server import MlflowServer

    if any("mlflow_server" in getattr(item, "fixturenames", ()) for item in session.items):
        _MLFLOW_SERVER = MlflowServer(Path(tempfile.mkdtemp(prefix="llada-mlflow-server-")))
        _MLFLOW_SERVER.launch()


def pytest_sessionfinish(session):
    if _MLFLOW_SERVER is not None:
        _MLFLOW_SERVER.stop()
        shutil.rmtree(_MLFLOW_SERVER.root, ignore_errors=True)


@pytest.fixture(scope="session")
def mlflow_server():
    """A real `mlflow server` (SQLite backend) on 127.0.0.1 for the whole session, launched when
    the session starts; a test that stops it starts it again before it ends."""
    _MLFLOW_SERVER.wait()
    return _MLFLOW_SERVER


def tracking_overrides(server, experiment: str) -> List[str]:
    """Track to the test server, in an experiment of the test's own."""
    return ["tracking.enabled=true", f"tracking.uri={server.uri}",
            f"tracking.experiment={experiment}"]
