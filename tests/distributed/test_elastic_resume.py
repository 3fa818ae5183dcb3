"""A run survives a change of GPU count and ZeRO stage: checkpoints saved under one layout resume
under others and continue the uninterrupted run, with the same samples in the same steps, the
same masks and the same losses (within 1e-5, fp32; only summation order differs).

The data: a mixture of the small dataset and a dataset of 3 shards (fewer shards than the
readers of most runs here: a shard serves several). The uninterrupted run: DP2 x 2 DataLoader
workers, ZeRO-1, 2N steps, a checkpoint at N. Its step-N checkpoint resumes as DP1 x 1 worker,
DP4 x 1 and TP2 x DP2 x 1. Sources of other ZeRO stages (N steps and a checkpoint): ZeRO-3 DP2
resumes as ZeRO-1 DP1 (with 8 workers: 8 readers of the 3-shard dataset) and as ZeRO-3 DP4;
ZeRO-0 TP2 as ZeRO-2 DP2. Runs of one world size share one torchrun launch
(elastic_worker.py); the DP1 ones run in this process."""

import json

import pytest

from data_pipeline.shards import load_manifest
from tests.conftest import prepare_small, run_cli, stdlib_glob
from tests.distributed import elastic_worker
from tests.distributed.layout_worker import MODEL

pytestmark = pytest.mark.slow

N = 3  # steps before the checkpoint, and after it


@pytest.fixture(scope="module")
def three_shards(tmp_path_factory, small_tokenizer):
    out = tmp_path_factory.mktemp("three-shards")
    path = prepare_small(out, small_tokenizer, samples_per_shard=160, name="three",
                         inputs=[stdlib_glob("json")])
    assert len(load_manifest(path).shards) == 3
    return path


def overrides(run_dir, small, three, *extra):
    return [f"run.dir={run_dir}", f"train.steps={2 * N}", "train.micro_batch_size=4",
            "train.global_batch_size=16", "data.seq_len=64", "optimizer.lr=1e-3",
            "schedule.warmup_steps=2", "objective.variable_length_prob=0.3",
            f"data.datasets=[{{manifest: {small}, weight: 0.7}}, "
            f"{{manifest: {three}, weight: 0.3}}]", "data.open_shards=2",
            "data.validation=[]", "tracking.enabled=false", "tracking.log_interval=1",
            "checkpoint.save_final=false", *MODEL, *extra]


@pytest.fixture(scope="module")
def runs(world, tmp_path_factory, small_dataset, three_shards):
    """{run: (its samples, its losses by step)}: the sources and the uninterrupted run in a
    2-process launch, the 4-process resumes in another, the one-process resumes here."""
    out = tmp_path_factory.mktemp("elastic")

    def spec(name, *extra, stop_after=None):
        s = {"overrides": overrides(out / name, small_dataset, three_shards, *extra)}
        return {name: s if stop_after is None else {**s, "stop_after": stop_after}}

    def resume(source):
        return f"checkpoint.resume={out / source / 'checkpoints' / f'step_{N:08d}'}"

    two = {**spec("whole", "data.num_workers=2", "deepspeed.zero_stage=1",
                  f"checkpoint.interval={N}"),
           **spec("zero3-dp2", "data.num_workers=1", "deepspeed.zero_stage=3", stop_after=N),
           **spec("zero0-tp2", "parallel.tp=2", "deepspeed.zero_stage=0", stop_after=N)}
    two.update(spec("zero0-tp2-as-zero2-dp2", "data.num_workers=1", "deepspeed.zero_stage=2",
                    resume("zero0-tp2")))
    four = {**spec("dp4", "data.num_workers=1", "deepspeed.zero_stage=1", resume("whole")),
            **spec("tp2xdp2", "parallel.tp=2", "data.num_workers=1", "deepspeed.zero_stage=1",
                   resume("whole")),
            **spec("zero3-dp2-as-zero3-dp4", "data.num_workers=1", "deepspeed.zero_stage=3",
                   resume("zero3-dp2"))}
    for nproc, launch in ((2, two), (4, four)):
        proc = run_cli([], nproc=nproc, timeout=900, module="tests.distributed.elastic_worker",
                       module_args=[str(out), json.dumps(launch)])
        assert proc.returncode == 0, proc.stderr[-4000:]
    one = {**spec("dp1", "data.num_workers=1", "deepspeed.zero_stage=1", resume("whole")),
           **spec("zero3-dp2-as-zero1-dp1", "data.num_workers=8", "deepspeed.zero_stage=1",
                  resume("zero3-dp2"))}
    for name, s in one.items():
        elastic_worker.run(out, name, s)

    def losses(name):
        path = out / name / "metrics.jsonl"
        if not path.exists():
            return {}
        return {r["step"]: r["train/loss"] for r in map(json.loads, path.read_text().splitlines())
                if "train/loss" in r}

    return {name: (json.loads((out / f"{name}.json").read_text()), losses(name))
            for name in [*two, *four, *one]}


def by_step(records, steps):
    return {s: sorted(r for r in records if r[0] == s) for s in steps}


RESUMED = {"dp1": "whole", "dp4": "whole", "tp2xdp2": "whole",
           "zero3-dp2-as-zero1-dp1": "zero3-dp2", "zero3-dp2-as-zero3-dp4": "zero3-dp2",
           "zero0-tp2-as-zero2-dp2": "zero0-tp2"}


def test_the_uninterrupted_run_reads_the_mixture(runs):
    samples, losses = runs["whole"]
    assert sorted(losses) == list(range(1, 2 * N + 1))
    assert sorted({r[0] for r in samples}) == list(range(2 * N))  # step indices 0..2N-1
    assert len(samples) == 2 * N * 16 and len({r[1] for r in samples}) == 2 * N * 16
    assert {r[2] for r in samples} == {0, 1}  # both datasets
    for source in ("zero3-dp2", "zero0-tp2"):  # the first N steps of every source: the same
        assert by_step(runs[source][0], range(N)) == by_step(samples, range(N)), source


@pytest.mark.parametrize("name", list(RESUMED))
def test_a_resume_under_another_layout_continues_the_uninterrupted_run(runs, name):
    samples, losses = runs[name]
    whole_samples, whole_losses = runs["whole"]
    later = range(N, 2 * N)  # the indices of steps N+1..2N
    assert by_step(samples, later) == by_step(whole_samples, later), name
    assert sorted(losses) == list(range(N + 1, 2 * N + 1)), name
    for step, loss in losses.items():
        assert abs(loss - whole_losses[step]) <= 1e-5 * abs(whole_losses[step]), \
            f"{name}: step {step} loss {loss} vs {whole_losses[step]}"
