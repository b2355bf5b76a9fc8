from pathlib import Path

import pytest
import yaml

from segpipe.config import ConfigError, load_config, read_yaml_with_extends, to_yaml


def write(path, text):
    path.write_text(text)
    return path


def test_extends_merges_mappings_and_child_wins(tmp_path):
    write(tmp_path / "base.yaml", "seed: 1\ntrain: {epochs: 5, learning_rate: 0.01}\nmodel: {depth: 3}\n")
    child = write(tmp_path / "child.yaml", "extends: base.yaml\ntrain: {epochs: 7}\n")
    config = load_config(child)
    assert config.train.epochs == 7
    assert config.train.learning_rate == 0.01  # kept from the parent
    assert config.model.depth == 3
    assert config.seed == 1
    assert config.name == "child"  # defaults to the file stem


def test_extends_chain_and_list(tmp_path):
    write(tmp_path / "a.yaml", "seed: 1\nmodel: {base_filters: 8}\n")
    write(tmp_path / "b.yaml", "extends: a.yaml\nseed: 2\n")
    sub = tmp_path / "sub"
    sub.mkdir()
    write(sub / "c.yaml", "model: {depth: 2}\n")
    top = write(sub / "top.yaml", "extends: [../b.yaml, c.yaml]\n")  # relative to the child
    config = load_config(top)
    assert (config.seed, config.model.base_filters, config.model.depth) == (2, 8, 2)


def test_loss_section_is_replaced_not_merged(tmp_path):
    write(tmp_path / "base.yaml", "loss: {name: dice, squared_pred: true}\n")
    child = write(tmp_path / "c.yaml", "extends: base.yaml\nloss: {name: tversky, alpha: 0.3}\n")
    assert load_config(child).loss == {"name": "tversky", "alpha": 0.3}


def test_cyclic_extends_is_an_error(tmp_path):
    write(tmp_path / "a.yaml", "extends: b.yaml\n")
    write(tmp_path / "b.yaml", "extends: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        read_yaml_with_extends(tmp_path / "a.yaml")


def test_dotted_overrides_parse_yaml_values():
    config = load_config(None, ["train.epochs=3", "loss.name=tversky", "data.patch_size=[16, 16, 16]", "name=x"])
    assert config.train.epochs == 3
    assert config.loss["name"] == "tversky"
    assert config.data.patch_size == [16, 16, 16]
    assert config.name == "x"


@pytest.mark.parametrize(
    "override, message",
    [
        (["train.epoch=3"], "Expected a key of train … Received: train.epoch=3. Did you mean 'train.epochs'?"),
        (["trian.epochs=3"], "Expected a key of the top level … Received: trian={'epochs': 3}. Did you mean 'train'?"),
        (["train.epochs=-1"], "Expected >= 1. Received: train.epochs=-1"),
        (["train.epochs=2.5"], "Expected an integer. Received: train.epochs=2.5"),
        (["train.learning_rate=abc"], "Expected a number. Received: train.learning_rate='abc'"),
        (["model.norm=bach"],
         "Expected one of ['batch', 'instance', 'none']. Received: model.norm='bach'. Did you mean 'batch'?"),
        (["model.deep_supervision=1"], "Expected true or false. Received: model.deep_supervision=1"),
        (["data.val_fraction=1.5"], "Expected <= 1. Received: data.val_fraction=1.5"),
        (["data.patch_size=[30, 32, 32]"], "Nearest valid: [32, 32, 32]"),
        (["data.patch_size=[32, 32]"], "Expected 3 sizes … Received: data.patch_size="),
        (["loss=dice"], "Expected a mapping … Received: loss="),
        (["train.epochs"], "Expected an override of the form key.sub=value. Received: --set='train.epochs'"),
    ],
)
def test_errors_name_key_expected_and_received(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, override)
    for part in message.split(" … "):
        assert part in str(info.value)


def test_unknown_key_in_file_is_reported(tmp_path):
    path = write(tmp_path / "x.yaml", "model:\n  filters: 8\n")
    with pytest.raises(ConfigError,
                       match=r"Expected a key of model \(.*\)\. Received: model\.filters=8\. Did you "
                             r"mean 'model\.max_filters'\?"):
        load_config(path)


def test_resolved_config_round_trips_through_yaml(tmp_path):
    config = load_config(None, ["train.epochs=3", "data.phantoms={num_cases: 4}"])
    path = write(tmp_path / "resolved.yaml", to_yaml(config))
    again = load_config(path)
    assert again.to_dict() == config.to_dict()
    assert yaml.safe_load(path.read_text())["data"]["phantoms"]["num_cases"] == 4


def test_shipped_configs_load():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "configs"
    paths = sorted(root.rglob("*.yaml"))
    assert paths, "no configs shipped"
    for path in paths:
        if path.name == "hippocampus.yaml":  # its dataset folder comes from the command line
            with pytest.raises(ConfigError,
                               match=r"^Expected the dataset folder, which this config leaves to the command line\. "
                                     r"Received: data\.root=null\. Add --set data\.root=PATH"):
                load_config(path)
            config = load_config(path, ["data.root=/somewhere/Task04_Hippocampus"])
            assert config.data.root == "/somewhere/Task04_Hippocampus" and config.data.phantoms is None
        else:
            load_config(path)


def test_inference_section_defaults_and_overrides():
    config = load_config(None, [])
    assert (config.inference.overlap, config.inference.mirror_axes, config.inference.batch_size,
            config.inference.postprocess_largest_component) == (0.5, (0, 1, 2), 2, ())
    config = load_config(None, ["inference.overlap=0.25", "inference.mirror_axes=[]",
                                "inference.postprocess_largest_component=[1]"])
    assert (config.inference.overlap, config.inference.mirror_axes,
            config.inference.postprocess_largest_component) == (0.25, (), (1,))
    base = load_config(Path(__file__).resolve().parent.parent / "configs" / "base.yaml")
    assert base.inference == load_config(None, []).inference  # base.yaml lists the defaults
    assert (base.train.export_bundle, base.train.export_onnx, base.experiment) == (True, False, None)


@pytest.mark.parametrize(
    "override, message",
    [
        (["inference.overlap=0.96"], "Expected a number in [0, 0.95]. Received: inference.overlap=0.96"),
        (["inference.overlap=-0.1"], "Expected a number in [0, 0.95]. Received: inference.overlap=-0.1"),
        (["inference.mirror_axes=[0, 3]"],
         "Expected distinct spatial axes out of [0, 1, 2] ([] = no mirroring). Received: inference.mirror_axes=[0, 3]"),
        (["inference.mirror_axes=[1, 1]"],
         "Expected distinct spatial axes out of [0, 1, 2] ([] = no mirroring). Received: inference.mirror_axes=[1, 1]"),
        (["inference.mirror_axes=2"], "Expected a list of int. Received: inference.mirror_axes=2"),
        (["inference.batch_size=0"], "Expected an integer >= 1. Received: inference.batch_size=0"),
        (["inference.postprocess_largest_component=[0]"],
         "Expected distinct label values in 1..255. Received: inference.postprocess_largest_component=[0]"),
        (["inference.postprocess_largest_component=[2, 2]"],
         "Expected distinct label values in 1..255. Received: inference.postprocess_largest_component=[2, 2]"),
        (["inference.overlaps=0.5"],
         "Expected a key of inference … Received: inference.overlaps=0.5. Did you mean 'inference.overlap'?"),
        (["train.export_bundle=yes please"], "Expected true or false … Received: train.export_bundle="),
        (["train.export_onnx=true", "train.export_bundle=false"],
         "Expected true when train.export_onnx is true (model.onnx is part of the bundle). Received: "
         "train.export_bundle=False"),
        (["experiment=a/b"], "Expected a folder name … Received: experiment="),
        (["name=.."], "Expected a folder name … Received: name="),
    ],
)
def test_inference_export_and_experiment_errors(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, override)
    for part in message.split(" … "):
        assert part in str(info.value)


def test_inference_config_feeds_the_bundle_settings():
    from segpipe.config import check_inference_classes
    from segpipe.inference.settings import InferenceSettings

    config = load_config(None, ["inference.overlap=0.25", "inference.mirror_axes=[2, 0]", "inference.batch_size=4",
                                "inference.postprocess_largest_component=[1]"])
    settings = config.inference
    assert settings == InferenceSettings(overlap=0.25, mirror_axes=(0, 2), batch_size=4,
                                         postprocess_largest_component=(1,))
    assert load_config(None, []).inference == InferenceSettings()
    check_inference_classes(config.inference, 2)
    with pytest.raises(ConfigError,
                       match=r"Expected foreground label values of the model's classes \(1..2\). Received: "
                             r"inference.postprocess_largest_component=\[1, 3\]"):
        check_inference_classes(load_config(None, ["inference.postprocess_largest_component=[1, 3]"]).inference, 3)


# ---------------------------------------------------------------- settings that check themselves


def test_a_config_built_in_python_is_checked_like_one_read_from_yaml():
    from segpipe.config import Config, DataConfig, ModelConfig, TrainConfig
    from segpipe.errors import SettingError

    # each section checks itself when made, naming the key relative to the section
    with pytest.raises(SettingError, match=r"^Expected >= 1\. Received: epochs=0\.$"):
        TrainConfig(epochs=0)
    with pytest.raises(SettingError, match=r"^Expected 3 sizes \[x, y, z\]\. Received: patch_size=\[16, 16\]\.$"):
        DataConfig(patch_size=[16, 16])
    with pytest.raises(SettingError, match=r"Received: normalization='zscor'\. Did you mean 'zscore'\?$"):
        DataConfig(normalization="zscor")
    with pytest.raises(SettingError,
                       match=r"^Expected a probability in \[0, 1\]\. Received: augment\.rotation\.p=2\.$"):
        DataConfig(augment={"rotation": {"p": 2}})
    with pytest.raises(SettingError, match=r"Received: blocks_per_stage=\[1, 2\]\."):
        ModelConfig(depth=2, blocks_per_stage=[1, 2])  # resenc_unet only
    # the config checks what involves several sections, as load_config does
    with pytest.raises(ConfigError, match=r"Received: data\.patch_size=\[30, 32, 32\]\. Nearest valid: \[32, 32, 32\]"):
        Config(data=DataConfig(patch_size=[30, 32, 32]), model=ModelConfig(depth=4))
    with pytest.raises(ConfigError, match=r"Received: model\.norm='instance'\."):
        Config(model=ModelConfig(norm="instance"), train=TrainConfig(sync_batch_norm=True))
    # a section given as a mapping is read with the section's path in the message
    with pytest.raises(ConfigError, match=r"^Expected an integer\. Received: data\.batch_size='2'\.$"):
        Config(data={"batch_size": "2"})
    assert Config(data={"batch_size": 4}).data == DataConfig(batch_size=4)
    # values are normalised as when read: an int for a float field becomes a float
    assert (TrainConfig(learning_rate=1).learning_rate == 1.0
            and isinstance(TrainConfig(learning_rate=1).learning_rate, float))


def test_every_settings_class_reads_a_mapping_the_same_way():
    """One convention: ``Cls.from_dict(data, *, where=None, prefix="")``, errors naming where and prefix + key."""
    from segpipe.config import Config, DataConfig, ModelConfig, PhantomConfig, TrainConfig
    from segpipe.data.augment import AugmentSettings
    from segpipe.data.preprocess import PreprocessSettings
    from segpipe.inference.settings import InferenceSettings

    bad = {Config: {"seed": "x"}, DataConfig: {"batch_size": 0}, ModelConfig: {"depth": 9},
           PhantomConfig: {"num_cases": 1}, TrainConfig: {"epochs": 0}, AugmentSettings: {"order": 9},
           PreprocessSettings: {"image_order": 9}, InferenceSettings: {"overlap": 0.99}}
    for cls, data in bad.items():
        with pytest.raises(ValueError) as info:
            cls.from_dict(data, where="run/file.yaml", prefix="section.")
        key = next(iter(data))
        assert str(info.value).startswith("run/file.yaml: Expected "), (cls, str(info.value))
        assert f"Received: section.{key}=" in str(info.value), (cls, str(info.value))
        assert cls.from_dict({}) == cls()
