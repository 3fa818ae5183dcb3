"""Typed configuration: one small dataclass per component (schema.py), a recipe YAML merged over
the schema with dotted overrides from the command line (recipe.py); everything is imported from
here.

Every component receives only its own sub-config. The data pipeline owns the configs of its
components (``data``, ``objective``: data_pipeline/config.py); the framework's are in schema.py,
and ``Config`` composes both. Every check raises an error whose message names the offending key
(``ConfigError``), so the CLI can print one line and exit 2.
"""

from framework.config.recipe import REMOVED_KEYS, from_data, load_config, to_dict, to_yaml
from framework.config.schema import (CheckpointConfig, Config, ConfigError, DeepSpeedConfig,
                                     EvalConfig, InitConfig, ModelConfig, OptimizerConfig,
                                     ParallelConfig, PreemptionConfig, ROPE_SCALING,
                                     RopeScalingConfig, RunConfig, ScheduleConfig, TrackingConfig,
                                     TrainConfig, check_model_split, check_world,
                                     data_parallel_size)

__all__ = [
    "REMOVED_KEYS", "from_data", "load_config", "to_dict", "to_yaml", "CheckpointConfig", "Config",
    "ConfigError", "DeepSpeedConfig", "EvalConfig", "InitConfig", "ModelConfig", "OptimizerConfig",
    "ParallelConfig", "PreemptionConfig", "ROPE_SCALING", "RopeScalingConfig", "RunConfig",
    "ScheduleConfig", "TrackingConfig", "TrainConfig", "check_model_split", "check_world",
    "data_parallel_size",
]
