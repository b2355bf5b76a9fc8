"""The run configuration: typed sections (:mod:`.schema`) read from YAML with ``extends:`` and
dotted overrides, then validated (:mod:`.loading`)."""
from segpipe.config.loading import (
    apply_overrides,
    check_folder_name,
    check_inference_classes,
    check_patch_size,
    from_dict,
    load_config,
    merge,
    read_yaml_with_extends,
    to_yaml,
    validate,
    validate_augment,
    validate_data,
)
from segpipe.config.schema import Config, ConfigError, DataConfig, ModelConfig, PhantomConfig, TrainConfig

__all__ = ["Config", "ConfigError", "DataConfig", "ModelConfig", "PhantomConfig", "TrainConfig",
           "apply_overrides", "check_folder_name", "check_inference_classes", "check_patch_size", "from_dict",
           "load_config", "merge", "read_yaml_with_extends", "to_yaml", "validate", "validate_augment", "validate_data"]
