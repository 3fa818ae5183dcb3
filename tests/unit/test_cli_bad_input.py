"""Each bad input of the CLI: exit code 2, one line naming the key or file, no traceback."""

import pytest

from tests.conftest import DEBUG_RECIPE, quick_overrides, run_cli


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr[-2000:]
    err_lines = [line for line in proc.stderr.splitlines() if line.startswith("llada: error:")]
    assert len(err_lines) == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in err_lines[0], err_lines[0]


def test_missing_recipe():
    assert_one_line_error(run_cli(["train", "recipes/no-such-recipe.yaml"]),
                          "recipe not found", "no-such-recipe.yaml")


@pytest.mark.parametrize("override, needles", [
    ("model.hiden_size=64", ["model.hiden_size", "hidden_size"]),  # mistyped key
    ("tracking.colour=blue", ["tracking.colour"]),  # unknown key
    ("train.steps=many", ["train.steps", "many"]),  # wrong value type
    ("train.global_batch_size=20", ["train.global_batch_size", "20"]),  # batch does not divide
    ("model.num_attention_heads=5", ["model.num_attention_heads", "5"]),  # heads vs hidden
    ("objective.mask_id=4096", ["objective.mask_id", "outside the vocabulary"]),
])
def test_bad_override(override, needles):
    assert_one_line_error(run_cli(["train", str(DEBUG_RECIPE), override]), *needles)


def test_bad_key_inside_a_recipe_file(tmp_path):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("train:\n  stepz: 10\n")
    assert_one_line_error(run_cli(["train", str(recipe)]), "typo.yaml", "train.stepz")


def test_mask_id_that_the_dataset_does_not_have(tmp_path, small_dataset):
    proc = run_cli(["train", str(DEBUG_RECIPE), *quick_overrides(tmp_path, small_dataset, 2),
                    "objective.mask_id=5"])
    assert_one_line_error(proc, "objective.mask_id", "mask token at id 3")


def test_sequence_length_other_than_the_dataset(tmp_path, small_dataset):
    proc = run_cli(["train", str(DEBUG_RECIPE), *quick_overrides(tmp_path, small_dataset, 2),
                    "data.seq_len=128"])
    assert_one_line_error(proc, "data.seq_len", "64 tokens")


def test_missing_manifest(tmp_path):
    proc = run_cli(["train", str(DEBUG_RECIPE), f"run.dir={tmp_path}",
                    f"data.datasets=[{{manifest: {tmp_path}/none/manifest.json}}]"])
    assert_one_line_error(proc, "data.datasets[0].manifest", "not found", "llada prepare")


def test_first_run_prepare_glob_matching_nothing(tmp_path):
    proc = run_cli(["train", str(DEBUG_RECIPE), f"run.dir={tmp_path}",
                    f"data.datasets=[{{manifest: {tmp_path}/d/manifest.json, "
                    f"prepare_inputs: ['{tmp_path}/nothing-*.txt']}}]"])
    assert_one_line_error(proc, "prepare.inputs", "nothing-*.txt")


def test_prepare_glob_matching_nothing(tmp_path):
    proc = run_cli(["prepare", f"{tmp_path}/nothing-*.jsonl", "-o", str(tmp_path / "out")])
    assert_one_line_error(proc, "prepare.inputs", "nothing-*.jsonl")
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_prepare_with_a_tokenizer_lacking_the_mask_token(tmp_path):
    bogus = tmp_path / "bogus.model"
    bogus.write_bytes(b"not a model")
    (tmp_path / "a.txt").write_text("hello\n")
    proc = run_cli(["prepare", str(tmp_path / "a.txt"), "-o", str(tmp_path / "out"),
                    "--tokenizer", str(bogus)])
    assert_one_line_error(proc, "tokenizer.model", "bogus.model")
