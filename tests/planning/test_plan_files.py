"""plan_config on a generated thick-slice dataset: fingerprint, plan, explicit keys, plan.json and plan.yaml."""
import json

import pytest
import yaml

from segpipe.cli.plan import flatten, plan_config
from segpipe.config import read_yaml_with_extends
from segpipe.data.phantoms import PhantomSettings, write_phantom_dataset

THICK = PhantomSettings(num_cases=4, shape=(32, 32, 8), spacing_mm=(0.8, 0.8, 3.0), seed=5)


@pytest.fixture(scope="module")
def thick_root(tmp_path_factory):
    return write_phantom_dataset(tmp_path_factory.mktemp("thick") / "ds", THICK)


def base_config(root, tmp_path):
    config = read_yaml_with_extends("configs/base.yaml")
    config["data"].update(root=str(root), phantoms=None, preprocess_workers=1)
    config["output_dir"] = str(tmp_path / "runs")
    return config


def test_plan_files_for_a_thick_slice_dataset(thick_root, tmp_path):
    result = plan_config(base_config(thick_root, tmp_path), explicit={"data.root"}, out_dir=tmp_path / "plan",
                         device="cpu", memory_gib=2, progress=False)
    plan = result.plan
    # 0.8×0.8×3 mm: the z spacing is 3.75× the in-plane spacing: kernel 3×3×1 and no z pooling at stage 1
    assert plan.config["data.target_spacing_mm"] == pytest.approx([0.8, 0.8, 3.0])
    assert plan.config["model.kernel_sizes"][0] == [3, 3, 1]
    assert plan.config["model.strides"][1] == [2, 2, 1]
    meta = json.loads(result.json_path.read_text())
    assert meta["plan_version"] == 1 and meta["hardware"]["device"] == "cpu"
    assert all(c["reason"] for c in meta["choices"].values())
    text = result.yaml_path.read_text()
    assert "# planned: 0.800×0.800×3.000 mm" in text and "kernel 3×3×1" in text
    reloaded = yaml.safe_load(text)
    assert reloaded["model"]["kernel_sizes"][0] == [3, 3, 1]
    assert reloaded["data"]["root"] == str(thick_root)
    # every planned key is in the written config
    flat = flatten(reloaded)
    for key, value in plan.config.items():
        assert flat[key] == value, key


def test_explicit_keys_win_and_dependent_choices_follow(thick_root, tmp_path):
    config = base_config(thick_root, tmp_path)
    config["data"]["patch_size"] = [16, 16, 8]
    config["data"]["batch_size"] = 3
    result = plan_config(config, explicit={"data.root", "data.patch_size", "data.batch_size"},
                         out_dir=tmp_path / "plan", device="cpu", memory_gib=2, progress=False)
    assert result.config["data"]["patch_size"] == [16, 16, 8] and result.config["data"]["batch_size"] == 3
    # the topology divides the given patch: 16,16,8 -> 8,8,8 (x, y only) -> 4,4,4
    assert result.config["model"]["strides"] == [[1, 1, 1], [2, 2, 1], [2, 2, 2]]
    assert result.config["model"]["depth"] == 3
    assert "given" in result.plan.choices["patch_size"].reason


def test_an_explicit_key_inside_a_planned_section_keeps_the_users_section(thick_root, tmp_path):
    config = base_config(thick_root, tmp_path)
    config["loss"] = {"name": "tversky", "alpha": 0.7}
    result = plan_config(config, explicit={"data.root", "loss.name"}, out_dir=tmp_path / "plan",
                         device="cpu", memory_gib=2, progress=False)
    assert result.config["loss"] == {"name": "tversky", "alpha": 0.7}
    assert "loss" in result.plan.config  # planned, but not applied


def test_a_bundle_to_start_from_is_planned_like_the_source(thick_root, tmp_path):
    """train.init_from a bundle: its network (depth, width, strides, kernels) and normalisation are kept,
    the patch is rounded to what the source's down-sampling divides, explicit keys still win."""
    from inference_helpers import PATCH, PREPROCESSING, tiny_architecture, tiny_model

    from segpipe.export.bundle import write_bundle

    architecture = tiny_architecture(depth=3, deep_supervision=True)
    bundle = write_bundle(tiny_model(depth=3), tmp_path / "bundle", class_names=["bg", "a", "b"],
                          preprocessing=PREPROCESSING, patch_size=PATCH, architecture=architecture,
                          verify=False, openvino=False, segment=False)
    config = base_config(thick_root, tmp_path)
    config["train"]["init_from"] = str(bundle)
    result = plan_config(config, explicit={"data.root", "train.init_from"}, out_dir=tmp_path / "plan", device="cpu",
                         memory_gib=2, progress=False)
    planned = result.config
    # the thick-slice dataset alone plans 3×3×1 kernels and in-plane strides (test above); the source is isotropic
    assert planned["model"]["depth"] == 3 and planned["model"]["base_filters"] == 4
    assert planned["model"]["strides"] is None and planned["model"]["kernel_sizes"] is None
    assert planned["data"]["normalization"] == PREPROCESSING.normalization
    assert all(side % 4 == 0 for side in planned["data"]["patch_size"])  # depth 3: halved twice on every axis
    assert "plan_like_source" in result.plan.choices and str(bundle) in result.plan.choices["plan_like_source"].reason
    # a key the user gives wins over the source's
    config["model"]["base_filters"] = 8
    again = plan_config(config, explicit={"data.root", "train.init_from", "model.base_filters"},
                        out_dir=tmp_path / "plan2", device="cpu", memory_gib=2, progress=False)
    assert again.config["model"]["base_filters"] == 8 and again.config["model"]["depth"] == 3
    # the written plan trains: the config it wrote loads and checks
    from segpipe.config import load_config

    load_config(again.yaml_path)
