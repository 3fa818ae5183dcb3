"""Each bad input of the CLI: exit code 2, one line naming the key or file, no traceback."""

import pytest

from tests.conftest import DEBUG_RECIPE, run_cli


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


def test_tokenizer_without_matching_mask_id(tmp_path, small_tokenizer):
    proc = run_cli(["train", str(DEBUG_RECIPE), f"run.dir={tmp_path}",
                    f"data.tokenizer_model={small_tokenizer}", "objective.mask_id=5"])
    assert_one_line_error(proc, "objective.mask_id", "<|mdm_mask|>")


def test_data_glob_matching_nothing(tmp_path):
    proc = run_cli(["train", str(DEBUG_RECIPE), f"run.dir={tmp_path}", "data.source=files",
                    f"data.paths=[{tmp_path}/nothing-*.txt]"])
    assert_one_line_error(proc, "data.paths", "nothing-*.txt")
