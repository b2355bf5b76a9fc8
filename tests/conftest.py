"""Shared fixtures: small generated datasets and tiny configs, so tests never need real data."""
from __future__ import annotations

import pytest

import segpipe  # noqa: F401  (sets TensorFlow's environment before any test imports it)
from segpipe.data.phantoms import PhantomSettings, write_phantom_dataset

TINY_PHANTOMS = PhantomSettings(num_cases=6, shape=(24, 24, 16), spacing_mm=(1.0, 1.0, 1.5), seed=3)


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory):
    """A tiny phantom dataset in MSD layout, shared by the whole session (read-only)."""
    return write_phantom_dataset(tmp_path_factory.mktemp("phantoms") / "ds", TINY_PHANTOMS)


@pytest.fixture
def tiny_overrides(phantom_root, tmp_path):
    """Dotted overrides that make any config a seconds-long run on the tiny phantoms."""
    return [
        f"data.root={phantom_root}",
        "data.phantoms=null",
        "data.patch_size=[16, 16, 16]",
        "data.batch_size=2",
        "data.val_fraction=0.34",
        "model.depth=2",
        "model.base_filters=4",
        "train.epochs=2",
        "train.steps_per_epoch=3",
        f"output_dir={tmp_path / 'runs'}",
    ]


@pytest.fixture(scope="session")
def crash_overrides(phantom_root, tmp_path_factory):
    """The run of the crash-safety and fault-injection tests: 4 epochs of 6 steps on the tiny phantoms,
    with the session's shared data cache."""
    from process_helpers import shared_cache_dir

    return [f"data.root={phantom_root}", "data.phantoms=null", "data.patch_size=[16, 16, 16]", "data.batch_size=2",
            "data.val_fraction=0.34", f"data.cache_dir={shared_cache_dir(tmp_path_factory)}", "model.depth=2",
            "model.base_filters=4", "train.epochs=4", "train.steps_per_epoch=6"]


@pytest.fixture(scope="session")
def uninterrupted_run(crash_overrides, tmp_path_factory):
    """That run trained once without interruption (in this process): its run directory."""
    import train

    out = tmp_path_factory.mktemp("uninterrupted")
    assert train.main(["--set", *crash_overrides, f"output_dir={out}", "name=straight"]) == 0
    return out / "straight"
