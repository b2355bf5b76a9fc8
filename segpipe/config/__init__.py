"""The run configuration: the stages' settings aggregated into one :class:`Config` (:mod:`.schema`),
read from YAML with ``extends:`` and dotted overrides (:mod:`.loading`).

The config sits above the stages whose settings it holds (``data``, ``inference``) and below the
ones that run a config (``runs``, ``training``, ``evaluation``, ``cli``): nothing in ``data`` or
``inference`` imports it (docs/architecture.md).
"""
from segpipe.config.loading import (
    apply_overrides,
    check_inference_classes,
    load_config,
    merge,
    read_yaml_with_extends,
    to_yaml,
    validate,
)
from segpipe.config.schema import (
    Config,
    ConfigError,
    DataConfig,
    ModelConfig,
    PhantomConfig,
    TrainConfig,
    check_folder_name,
    check_patch_size,
    model_divisor,
)

__all__ = ["Config", "ConfigError", "DataConfig", "ModelConfig", "PhantomConfig", "TrainConfig",
           "apply_overrides", "check_folder_name", "check_inference_classes", "check_patch_size", "model_divisor",
           "load_config", "merge", "read_yaml_with_extends", "to_yaml", "validate"]
