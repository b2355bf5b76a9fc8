"""The ``data`` section of the config: defaults in base.yaml, errors naming the key."""
import dataclasses
from pathlib import Path

import pytest

from segpipe.config import ConfigError, DataConfig, load_config
from segpipe.data.augment import AugmentSettings

BASE = Path(__file__).resolve().parents[2] / "configs" / "base.yaml"


def test_base_yaml_lists_every_data_key_with_its_default():
    from_file, defaults = load_config(BASE).data, DataConfig()
    for f in dataclasses.fields(DataConfig):
        if f.name != "augment":
            assert getattr(from_file, f.name) == getattr(defaults, f.name), f.name
    assert AugmentSettings.from_dict(from_file.augment) == AugmentSettings()
    assert set(from_file.augment) == {f.name for f in dataclasses.fields(AugmentSettings)}


def test_data_values_are_typed():
    data = load_config(None, ["data.normalization=[zscore, ct]", "data.folds=5", "data.fold=4", "data.check=off",
                              "data.target_spacing_mm=[1, 1, 2]", "data.augment={rotation: {p: 0.5}}"]).data
    assert data.normalization == ["zscore", "ct"] and (data.folds, data.fold) == (5, 4)
    assert data.check == "off"  # YAML reads a bare `off` as false; mapped back to the option
    assert data.target_spacing_mm == [1.0, 1.0, 2.0]
    assert AugmentSettings.from_dict(data.augment).rotation.p == 0.5


@pytest.mark.parametrize(
    "override, message",
    [
        (["data.check=fast"], "data.check: expected one of ['full', 'headers', 'off']. Received: 'fast'"),
        (["data.layout=nnUnet"], "data.layout: expected one of ['auto', 'msd', 'nnunet', 'folders']"),
        (["data.normalization=zscor"], "data.normalization: expected one of ['zscore', 'zscore_nonzero', 'ct', 'none']. Received: 'zscor'. Did you mean 'zscore'?"),
        (["data.normalization=[zscore, ctt]"], "data.normalization[1]: expected one of"),
        (["data.normalization=3"], "data.normalization: expected a string or a list of str. Received: 3"),
        (["data.target_spacing_mm=[1, 1]"], "data.target_spacing_mm: expected 3 spacings"),
        (["data.target_spacing_mm=[1, 0, 1]"], "data.target_spacing_mm: expected > 0"),
        (["data.image_order=7"], "data.image_order: expected <= 5. Received: 7"),
        (["data.label_interpolation=linear"], "data.label_interpolation: expected one of ['onehot_linear', 'nearest']"),
        (["data.preprocess_workers=0"], "data.preprocess_workers: expected >= 1"),
        (["data.folds=1"], "data.folds: expected >= 2. Received: 1"),
        (["data.fold=1"], "data.fold: expected 0 when data.folds is null"),
        (["data.folds=3", "data.fold=3"], "data.fold: expected a fold in 0..2 (data.folds=3). Received: 3"),
        (["data.validation=patch"], "data.validation: expected one of ['whole', 'patches']. Received: 'patch'. Did you mean 'patches'?"),
        (["data.cache_dir=3"], "data.cache_dir: expected a string. Received: 3"),
        (["data.augment={rotaton: {p: 0.1}}"], "Unknown config key 'data.augment.rotaton'. Did you mean 'data.augment.rotation'?"),
        (["data.augment={rotation: {range: [1, 2]}}"], "Unknown config key 'data.augment.rotation.range'. Did you mean 'data.augment.rotation.range_deg'?"),
        (["data.augment={rotation: {p: 1.5}}"], "data.augment.rotation.p: Invalid value for `rotation.p`. Expected a probability in [0, 1]. Received: p=1.5"),
        (["data.augment={scaling: {range: [1.2, 0.8]}}"], "data.augment.scaling.range: Invalid value for `scaling.range`. Expected [low, high]"),
        (["data.augment={noise: {variance: 0.1}}"], "data.augment.noise.variance: expected a list of numbers like [0.0, 0.1]. Received: 0.1"),
        (["data.augment={blur: {p: high}}"], "data.augment.blur.p: expected a number like 0.2. Received: 'high'"),
        (["data.augment={mirror: true}"], "data.augment.mirror: expected a mapping like {p: 0.2, ...}. Received: True"),
        (["data.augment={order: 1.5}"], "data.augment.order: expected an integer spline order in 0..5. Received: 1.5"),
        (["data.augment={order: 9}"], "data.augment.order: Invalid value for `order`. Expected an integer in 0..5"),
    ],
)
def test_data_errors_name_the_key(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, override)
    assert message in str(info.value)
