"""Typed configuration: schema, YAML loader with `base:` inheritance and `--set` overrides."""

from config.loader import ConfigError, apply_override, config_differences, load_config, save_config, to_dict
from config.schema import (Config, DataConfig, FusionConfig, LanguageConfig, ModelConfig, ProjectorConfig,
                           StageConfig, TrainConfig, VisionConfig)

__all__ = ["Config", "ConfigError", "DataConfig", "FusionConfig", "LanguageConfig", "ModelConfig",
           "ProjectorConfig", "StageConfig", "TrainConfig", "VisionConfig", "apply_override", "config_differences", "load_config",
           "save_config", "to_dict"]
