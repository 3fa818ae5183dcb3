"""Each bad input of the CLI: exit code 2, one line naming the key or file, no traceback.

A few cases run ``llada`` as a process (the exit code and stderr a user sees); the rest call the
same ``main`` in this process, which is what that process runs, in a fraction of the time."""

import os
import subprocess

import pytest
import torch

from framework.launch.cli import main
from framework.config import ConfigError
from framework.parallel.world import check_sequence_parallel
from tests.conftest import DEBUG_RECIPE, quick_overrides, run_cli


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr[-2000:]
    err_lines = [line for line in proc.stderr.splitlines() if line.startswith("llada: error:")]
    assert len(err_lines) == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in err_lines[0], err_lines[0]


@pytest.fixture
def llada(capsys):
    """``llada ARGS`` in this process, as a CompletedProcess; the environment is restored after
    (a run fills in the rendezvous variables of its world of one)."""
    saved = dict(os.environ)

    def run(args):
        code = main([str(a) for a in args])
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out.out, out.err)
    yield run
    os.environ.clear()
    os.environ.update(saved)


def test_missing_recipe():
    assert_one_line_error(run_cli(["train", "recipes/no-such-recipe.yaml"]),
                          "recipe not found", "no-such-recipe.yaml")


@pytest.mark.parametrize("override, needles", [
    ("model.hiden_size=64", ["model.hiden_size", "hidden_size"]),  # mistyped key
    ("parallel.tp=3", ["parallel.tp", "3 does not divide"]),  # layout does not divide the model
    ("tracking.colour=blue", ["tracking.colour"]),  # unknown key
    ("train.steps=many", ["train.steps", "many"]),  # wrong value type
    ("train.global_batch_size=20", ["train.global_batch_size", "20"]),  # batch does not divide
    ("model.num_attention_heads=5", ["model.num_attention_heads", "5"]),  # heads vs hidden
    ("objective.mask_id=4096", ["objective.mask_id", "outside the vocabulary"]),
    ("preemption.signals=[KILL]", ["preemption.signals", "KILL"]),  # cannot be handled
    ("optimizer.lr=inf", ["optimizer.lr", "finite", "inf"]),  # would diverge steps later
    ("schedule.final_lr=nan", ["schedule.final_lr", "finite"]),
    ("eval.t_samples=0", ["eval.t_samples", "> 0"]),
    ("data.validation=[]", ["checkpoint.keep_best", "data.validation"]),  # with keep_best below
    ("data.validation=[{name: 'a b', manifest: x}]", ["data.validation.name", "'a b'"]),
    ("prepare.holdout=1", ["prepare"]),  # no such section
    ("data.shuffle_buffer=64", ["data.shuffle_buffer", "removed", "data.open_shards"]),
    ("data.open_shards=0", ["data.open_shards", "> 0"]),
])
def test_bad_override(llada, override, needles):
    extra = ["checkpoint.keep_best=true"] if override == "data.validation=[]" else []
    assert_one_line_error(llada(["train", DEBUG_RECIPE, override, *extra]), *needles)


def test_prepare_holdout_fraction_out_of_range(llada, tmp_path):
    proc = llada(["prepare", "stdlib", "-o", str(tmp_path), "--holdout-fraction", "1.5"])
    assert_one_line_error(proc, "prepare.holdout_fraction", "1.5")


@pytest.mark.parametrize("args, needles", [
    (["--parts", "3", "--part", "3"], ["prepare.part", "[0, 3)", "3"]),
    (["--merge", "--parts", "1"], ["prepare.parts", "--merge", "(>= 2)"]),
    (["--parts", "2", "--merge"], ["part 0 of 2 is missing", "--parts 2 --part 0"]),
])
def test_prepare_in_parts_bad_input(llada, tmp_path, small_tokenizer, args, needles):
    proc = llada(["prepare", "stdlib", "-o", str(tmp_path), "--tokenizer", small_tokenizer, *args])
    assert_one_line_error(proc, *needles)
    assert not (tmp_path / "manifest.json").exists()


@pytest.mark.parametrize("args, needles", [
    (["--array", "1"], ["--array", ">= 2"]),
    (["--array", "4", "--cpus-per-task", "0"], ["--cpus-per-task", ">= 1"]),
    (["--array", "4", "--time", "soon"], ["--time", "soon"]),
    (["--array", "4", "--tokenizer", "/no/such.model"], ["--tokenizer", "/no/such.model"]),
])
def test_slurm_prepare_bad_input_fails_before_any_job(llada, tmp_path, args, needles):
    argv = ["slurm", "prepare", "stdlib", "-o", str(tmp_path / "d"), "--time", "1:00:00", *args]
    assert_one_line_error(llada(argv), *needles)
    assert not (tmp_path / "d").exists()


def test_validate_of_a_directory_without_checkpoints(llada, tmp_path):
    assert_one_line_error(llada(["validate", str(tmp_path)]), str(tmp_path),
                          "no complete checkpoint")


def test_unreadable_job_deadline(llada, monkeypatch):
    monkeypatch.setenv("LLADA_DEADLINE", "tomorrow")
    assert_one_line_error(llada(["train", DEBUG_RECIPE]), "LLADA_DEADLINE", "tomorrow")


def test_zero2_with_pipeline_parallelism():
    proc = run_cli(["train", str(DEBUG_RECIPE), "parallel.pp=2", "deepspeed.zero_stage=2"])
    assert_one_line_error(proc, "deepspeed.zero_stage", "ZeRO-2", "parallel.pp=2")


def test_layout_that_does_not_divide_the_world(llada, tmp_path, small_dataset):
    proc = llada(["train", DEBUG_RECIPE, *quick_overrides(tmp_path, small_dataset, 2),
                  "parallel.tp=2"])
    assert_one_line_error(proc, "parallel.tp", "does not divide the world size 1")


def test_sequence_parallelism_needs_tensor_parallelism_and_cuda(llada):
    proc = llada(["train", DEBUG_RECIPE, "parallel.sequence_parallel=true"])
    assert_one_line_error(proc, "parallel.sequence_parallel", "parallel.tp > 1")
    with pytest.raises(ConfigError, match="parallel.sequence_parallel: needs CUDA"):
        check_sequence_parallel(torch.device("cpu"))


def test_bad_key_inside_a_recipe_file(tmp_path):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("train:\n  stepz: 10\n")
    assert_one_line_error(run_cli(["train", str(recipe)]), "typo.yaml", "train.stepz")


def test_mask_id_that_the_dataset_does_not_have(tmp_path, small_dataset):
    proc = run_cli(["train", str(DEBUG_RECIPE), *quick_overrides(tmp_path, small_dataset, 2),
                    "objective.mask_id=5"])
    assert_one_line_error(proc, "objective.mask_id", "mask token at id 3")


def test_sequence_length_other_than_the_dataset(llada, tmp_path, small_dataset):
    proc = llada(["train", str(DEBUG_RECIPE), *quick_overrides(tmp_path, small_dataset, 2),
                  "data.seq_len=128"])
    assert_one_line_error(proc, "data.seq_len", "64 tokens")


def test_missing_manifest(llada, tmp_path):
    proc = llada(["train", str(DEBUG_RECIPE), f"run.dir={tmp_path}",
                  f"data.datasets=[{{manifest: {tmp_path}/none/manifest.json}}]"])
    assert_one_line_error(proc, "data.datasets[0].manifest", "not found", "llada prepare")


def test_first_run_prepare_glob_matching_nothing(llada, tmp_path):
    proc = llada(["train", str(DEBUG_RECIPE), f"run.dir={tmp_path}",
                  f"data.datasets=[{{manifest: {tmp_path}/d/manifest.json, "
                  f"prepare_inputs: ['{tmp_path}/nothing-*.txt']}}]"])
    assert_one_line_error(proc, "prepare.inputs", "nothing-*.txt")


def test_prepare_glob_matching_nothing(llada, tmp_path):
    proc = llada(["prepare", f"{tmp_path}/nothing-*.jsonl", "-o", str(tmp_path / "out")])
    assert_one_line_error(proc, "prepare.inputs", "nothing-*.jsonl")
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_prepare_with_a_tokenizer_lacking_the_mask_token(llada, tmp_path):
    bogus = tmp_path / "bogus.model"
    bogus.write_bytes(b"not a model")
    (tmp_path / "a.txt").write_text("hello\n")
    proc = llada(["prepare", str(tmp_path / "a.txt"), "-o", str(tmp_path / "out"),
                  "--tokenizer", str(bogus)])
    assert_one_line_error(proc, "tokenizer.model", "bogus.model")


def test_tracking_uri_of_an_unknown_scheme(llada, tmp_path, small_dataset):
    proc = llada(["train", str(DEBUG_RECIPE), *quick_overrides(tmp_path, small_dataset, 2),
                  "tracking.enabled=true", "tracking.uri=htp://127.0.0.1:5000"])
    assert_one_line_error(proc, "tracking.uri", "htp://127.0.0.1:5000")
    assert not (tmp_path / "summary.json").exists()


def test_tracking_sync_of_a_directory_without_tracking_state(llada, tmp_path):
    assert_one_line_error(llada(["tracking", "sync", str(tmp_path)]), str(tmp_path),
                          "no tracking state")


def test_a_manifest_that_is_json_but_not_a_manifest(llada, tmp_path):
    manifest = tmp_path / "d" / "manifest.json"
    manifest.parent.mkdir()
    manifest.write_text("[1, 2, 3]\n")
    proc = llada(["train", str(DEBUG_RECIPE), f"run.dir={tmp_path}",
                  f"data.datasets=[{{manifest: {manifest}}}]"])
    assert_one_line_error(proc, "data.datasets[0].manifest", str(manifest), "not a valid manifest")
