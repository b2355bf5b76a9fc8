"""The hippocampus recipe and its ablation script stay consistent with each other (no training here)."""
import dataclasses
import importlib.util
from pathlib import Path

import pytest

from segpipe.config import load_config

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "hippocampus_recipe.yaml"


def ablation():
    spec = importlib.util.spec_from_file_location("hippocampus_ablation",
                                                  ROOT / "benchmarks" / "hippocampus_ablation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sections(config):
    as_dict = dataclasses.asdict(config)
    return {key: as_dict[key] for key in ("data", "model", "loss", "inference")}


def test_the_combined_ablation_variant_is_the_recipe():
    module = ablation()
    _, overrides, _ = module.VARIANTS["mirror_x_patch"]
    assert sections(load_config(RECIPE, module.BASE + overrides)) == sections(load_config(RECIPE))


@pytest.mark.parametrize("name", list(ablation().VARIANTS))
def test_every_variant_is_a_valid_config_that_differs_from_the_starting_point(name):
    module = ablation()
    _, overrides, cost = module.VARIANTS[name]
    config = load_config(RECIPE, module.BASE + overrides)
    base = load_config(RECIPE, module.BASE)
    differs = sections(config) != sections(base) or config.train != base.train
    assert cost > 0 and differs == (name != "base")


def test_the_recipe_reads_the_fixed_split_and_keeps_test_time_mirroring_to_trained_axes():
    config = load_config(RECIPE)
    assert config.data.split_file == "configs/splits/hippocampus.json"
    assert config.data.augment["mirror"]["axes"] == list(config.inference.mirror_axes) == [0]
    assert config.train.distribute == "none"  # nothing device-specific: the same file runs on a GPU
