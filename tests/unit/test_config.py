
import pytest

from framework.config import ConfigError, load_config
from tests.conftest import DEBUG_RECIPE, REPO


def test_debug_recipe_loads_with_overrides():
    cfg = load_config(DEBUG_RECIPE, ["train.steps=7", "deepspeed.zero_stage=3"])
    assert cfg.train.steps == 7
    assert cfg.deepspeed.zero_stage == 3
    assert cfg.run.dir and cfg.model.num_layers == 4


@pytest.mark.parametrize("recipe", ["llada-1b.yaml", "llada-8b.yaml"])
def test_paper_recipes_load_once_data_is_named(recipe, tmp_path):
    with pytest.raises(ConfigError, match=r"data.datasets\[0\].manifest: required"):
        load_config(REPO / "recipes" / recipe)
    cfg = load_config(REPO / "recipes" / recipe,
                      [f"data.datasets=[{{manifest: {tmp_path}/m.json}}, "
                       f"{{manifest: {tmp_path}/n.json, weight: 3}}]"])
    assert cfg.optimizer.weight_decay == 0.1
    assert cfg.optimizer.lr == 4e-4 and cfg.schedule.final_lr == 1e-5
    assert cfg.data.seq_len == 4096 and cfg.objective.mask_id is None
    assert [d.weight for d in cfg.data.datasets] == [1.0, 3]


@pytest.mark.parametrize("override, key", [
    (["model.hidden_sze=64"], "model.hidden_sze"),
    (["model.hidden_size=wide"], "model.hidden_size"),
    (["model.num_attention_heads=3"], "model.num_attention_heads"),
    (["model.num_kv_heads=3"], "model.num_kv_heads"),
    (["objective.mask_id=5000"], "objective.mask_id"),
    (["train.global_batch_size=40"], "train.global_batch_size"),
    (["deepspeed.zero_stage=4"], "deepspeed.zero_stage"),
    (["run.device=tpu"], "run.device"),
    (["parallel.tp=3"], "parallel.tp"),
    (["data.datasets=[]"], "data.datasets"),
    (["data.datasets=[{manifest: m.json, weight: 0}]"], "data.datasets.weight"),
    (["data.datasets=[{manifest: m.json, shards_url: 'pipe:cat x'}]"], "data.datasets.shards_url"),
    (["data.datasets=[{path: m.json}]"], "path"),
    (["objective.t_sampling=sobol"], "objective.t_sampling"),
    (["data.seed=-1"], "data.seed"),
    (["objective.seed=-3"], "objective.seed"),
    (["nosuchsection.x=1"], "nosuchsection"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(DEBUG_RECIPE, override)
    assert key in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_recipe_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match="recipe not found: .*missing.yaml"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("name, text, needles", [
    ("bad.yaml", "train:\n  steps: 3\noptimizer:\n  learning_rate: 1.0\n",
     ["optimizer.learning_rate"]),  # an unknown key in the file
    ("r.yaml", "model:\n  num_layers: 2\n", ["train.steps", "required"]),
    ("broken.yaml", "train:\n  steps: 3\ntrain:\n  steps: 4\n", ["duplicate key"]),  # YAML
])
def test_a_bad_recipe_file_is_one_line_naming_file_and_key(tmp_path, name, text, needles):
    recipe = tmp_path / name
    recipe.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(recipe)
    assert "\n" not in str(err.value)
    for needle in [name, *needles]:
        assert needle in str(err.value)
