"""Recipes into a ``Config``: a recipe YAML merged over the schema (schema.py), dotted overrides
from the command line, ``model.from_hf`` filled from a Hugging Face config.json, every float
finite; and a config back to plain data. Every error is one ``ConfigError`` naming the key or
file."""

from __future__ import annotations

import math
from pathlib import Path
from typing import List

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data_pipeline.errors import DataConfigError
from framework.config.schema import Config, ConfigError


def _one_line(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None)
    msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return f"{key}: {msg}" if key else msg


# config keys that are Python keywords: (section, key); the dataclass field is key + "_"
_KEYWORD_KEYS = (("init", "from"),)


def _keyword_keys(cfg, to_field: bool):
    """Rename keyword keys between the YAML spelling (``init.from``) and the field's."""
    for section, key in _KEYWORD_KEYS:
        src, dst = (key, key + "_") if to_field else (key + "_", key)
        sec = cfg.get(section)
        if sec is not None and src in sec:
            sec[dst] = sec.pop(src)
    return cfg


# keys earlier versions read, and what took their place: one line naming both, not "not in schema"
REMOVED_KEYS = {
    "data.shuffle_buffer": "removed: a reader now holds data.open_shards whole shards and draws "
                           "from all of them (README, Data); delete the key",
}


def _refuse_removed(recipe_cfg, path: Path, overrides: List[str]) -> None:
    given = {item.split("=", 1)[0].strip().lstrip("+~") for item in overrides}
    for key, why in REMOVED_KEYS.items():
        if OmegaConf.select(recipe_cfg, key, default=None) is not None:
            raise ConfigError(f"{path}: {key}: {why}")
        if key in given:
            raise ConfigError(f"override {key}: {why}")


def load_config(recipe: str | Path, overrides: List[str] = (), need_data: bool = True) -> Config:
    """Merge the recipe YAML, then ``key=value`` overrides, over the schema and validate.
    ``need_data=False`` (``llada plan``): unset dataset keys are tolerated."""
    path = Path(recipe)
    if not path.is_file():
        raise ConfigError(f"recipe not found: {path}")
    schema = OmegaConf.structured(Config)
    try:
        recipe_cfg = OmegaConf.load(path)
    except Exception as e:  # YAML syntax errors carry multi-line context
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())[:300]}") from None
    if recipe_cfg is None or not OmegaConf.is_dict(recipe_cfg):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
    _refuse_removed(recipe_cfg, path, overrides)
    try:
        merged = OmegaConf.merge(schema, _keyword_keys(recipe_cfg, to_field=True))
    except OmegaConfBaseException as e:
        raise ConfigError(f"{path}: {_one_line(e)}") from None
    try:
        merged = OmegaConf.merge(
            merged, _keyword_keys(OmegaConf.from_dotlist(list(overrides)), to_field=True))
    except OmegaConfBaseException as e:
        raise ConfigError(f"override: {_one_line(e)}") from None
    _model_from_hf(merged, recipe_cfg, overrides)
    if not need_data:
        for key in OmegaConf.missing_keys(merged):
            if key.startswith("data."):
                OmegaConf.update(merged, key, "(not read by llada plan)")
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        raise ConfigError(f"{path}: {missing[0]}: required but not set")
    _check_finite(_keyword_keys(OmegaConf.to_container(merged), to_field=False))
    try:
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        if isinstance(e.__cause__, (ConfigError, DataConfigError)):  # a component's own check
            raise ConfigError(str(e.__cause__)) from None
        raise ConfigError(f"{path}: {_one_line(e)}") from None
    except DataConfigError as e:
        raise ConfigError(str(e)) from None


def _model_from_hf(merged, recipe_cfg, overrides: List[str]) -> None:
    """``model.from_hf: DIR``: the model section's keys from DIR/config.json (a Hugging Face
    Llama/Qwen2/Qwen3). A key the recipe or an override also sets must say the same."""
    directory = OmegaConf.select(merged, "model.from_hf", default=None)
    if directory is None:
        return
    from framework.hf_config import HFFormatError, model_fields, read_config_json

    try:
        fields = model_fields(read_config_json(Path(directory)), f"{directory}/config.json")
    except HFFormatError as e:
        raise ConfigError(f"model.from_hf: {e}") from None
    given = OmegaConf.merge(OmegaConf.create({"model": recipe_cfg.get("model") or {}}),
                            OmegaConf.from_dotlist(list(overrides)))
    for key, value in fields.items():
        mine = OmegaConf.select(given, f"model.{key}", default=None)
        if mine is not None:
            mine = OmegaConf.to_container(mine) if OmegaConf.is_config(mine) else mine
            # a section (rope_scaling): the keys given must agree
            theirs = {k: value.get(k) for k in mine} if isinstance(value, dict) and \
                isinstance(mine, dict) else value
            if key == "head_dim" and value is None:  # the default, spelled out here
                theirs = fields["hidden_size"] // fields["num_attention_heads"]
            if mine != theirs:
                raise ConfigError(f"model.{key}: {mine} here, but model.from_hf={directory} says "
                                  f"{value} (delete the key: from_hf gives it)")
        OmegaConf.update(merged, f"model.{key}", value, merge=isinstance(value, dict))


def from_data(cls, *parts, key: str):
    """A component's config from plain data (a checkpoint's saved section, then changes), merged
    over its schema and checked; anything wrong is one ConfigError, prefixed with ``key``."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), *parts))
    except OmegaConfBaseException as e:
        if isinstance(e.__cause__, (ConfigError, DataConfigError)):  # the class's own check
            raise ConfigError(str(e.__cause__)) from None
        raise ConfigError(f"{key}: {_one_line(e)}") from None


def _check_finite(tree, key: str = "") -> None:
    """Every float of the config is a number: ``inf`` or ``nan`` (which YAML and OmegaConf accept
    as floats) would pass most range checks and surface steps later as a diverged run."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            _check_finite(v, f"{key}.{k}" if key else str(k))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            _check_finite(v, f"{key}[{i}]")
    elif isinstance(tree, float) and not math.isfinite(tree):
        raise ConfigError(f"{key}: must be a finite number, got {tree}")


def to_dict(cfg: Config) -> dict:
    """The resolved config as plain data, keys spelled as in recipes."""
    return _keyword_keys(OmegaConf.to_container(OmegaConf.structured(cfg)), to_field=False)


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg)))
