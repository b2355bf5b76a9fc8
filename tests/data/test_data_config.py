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
        (["data.check=fast"], "Expected one of ['full', 'headers', 'off']. Received: data.check='fast'"),
        (["data.layout=nnUnet"], "Expected one of ['auto', 'msd', 'nnunet', 'folders'] … Received: data.layout="),
        (["data.normalization=zscor"], "Expected one of ['zscore', 'zscore_nonzero', 'ct', 'none']. Received: data.normalization='zscor'. Did you mean 'zscore'?"),
        (["data.normalization=[zscore, ctt]"], "Expected one of … Received: data.normalization[1]="),
        (["data.normalization=3"], "Expected a string or a list of str. Received: data.normalization=3"),
        (["data.target_spacing_mm=[1, 1]"], "Expected 3 spacings … Received: data.target_spacing_mm="),
        (["data.target_spacing_mm=[1, 0, 1]"], "Expected > 0 … Received: data.target_spacing_mm="),
        (["data.image_order=7"], "Expected <= 5. Received: data.image_order=7"),
        (["data.label_interpolation=linear"], "Expected one of ['onehot_linear', 'nearest'] … Received: data.label_interpolation="),
        (["data.preprocess_workers=0"], "Expected >= 1 … Received: data.preprocess_workers="),
        (["data.folds=1"], "Expected >= 2. Received: data.folds=1"),
        (["data.fold=1"], "Expected 0 when data.folds is null … Received: data.fold="),
        (["data.folds=3", "data.fold=3"], "Expected a fold in 0..2 (data.folds=3). Received: data.fold=3"),
        (["data.validation=patch"], "Expected one of ['whole', 'patches']. Received: data.validation='patch'. Did you mean 'patches'?"),
        (["data.cache_dir=3"], "Expected a string. Received: data.cache_dir=3"),
        (["data.augment={rotaton: {p: 0.1}}"], "Expected a key of data.augment … Received: data.augment.rotaton={'p': 0.1}. Did you mean 'data.augment.rotation'?"),
        (["data.augment={rotation: {range: [1, 2]}}"], "Expected a key of data.augment.rotation … Received: data.augment.rotation.range=[1, 2]. Did you mean 'data.augment.rotation.range_deg'?"),
        (["data.augment={rotation: {p: 1.5}}"], "Expected a probability in [0, 1]. Received: data.augment.rotation.p=1.5"),
        (["data.augment={scaling: {range: [1.2, 0.8]}}"], "Expected [low, high] with 0 < low <= high. Received: data.augment.scaling.range=[1.2, 0.8]"),
        (["data.augment={noise: {variance: 0.1}}"], "Expected a list of numbers like [0.0, 0.1]. Received: data.augment.noise.variance=0.1"),
        (["data.augment={blur: {p: high}}"], "Expected a number like 0.2. Received: data.augment.blur.p='high'"),
        (["data.augment={mirror: true}"], "Expected a mapping like {p: 0.2, ...}. Received: data.augment.mirror=True"),
        (["data.augment={order: 1.5}"], "Expected an integer spline order in 0..5. Received: data.augment.order=1.5"),
        (["data.augment={order: 9}"], "Expected an integer spline order in 0..5. Received: data.augment.order=9"),
    ],
)
def test_data_errors_name_the_key(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, override)
    for part in message.split(" … "):
        assert part in str(info.value)
