"""The hippocampus recipe and its ablation's variants (``configs/hippocampus_ablation.json``, which
``benchmarks/hippocampus_ablation.py`` runs) stay consistent with each other (no training here)."""
import dataclasses
import json
from pathlib import Path

import pytest

from segpipe.config import load_config

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "hippocampus_recipe.yaml"
ABLATION = json.loads((ROOT / "configs" / "hippocampus_ablation.json").read_text(encoding="utf-8"))
BASE, VARIANTS = ABLATION["base"], ABLATION["variants"]


def sections(config):
    as_dict = dataclasses.asdict(config)
    return {key: as_dict[key] for key in ("data", "model", "loss", "inference")}


def test_the_combined_ablation_variant_is_the_recipe():
    overrides = VARIANTS["mirror_x_patch"]["overrides"]
    assert sections(load_config(RECIPE, BASE + overrides)) == sections(load_config(RECIPE))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_variant_is_a_valid_config_that_differs_from_the_starting_point(name):
    overrides, cost = VARIANTS[name]["overrides"], VARIANTS[name]["cost"]
    config = load_config(RECIPE, BASE + overrides)
    base = load_config(RECIPE, BASE)
    differs = sections(config) != sections(base) or config.train != base.train
    assert cost > 0 and differs == (name != "base")


def test_the_recipe_reads_the_fixed_split_and_keeps_test_time_mirroring_to_trained_axes():
    config = load_config(RECIPE)
    assert config.data.split_file == "configs/splits/hippocampus.json"
    assert config.data.augment["mirror"]["axes"] == list(config.inference.mirror_axes) == [0]
    assert config.train.distribute == "none"  # nothing device-specific: the same file runs on a GPU
