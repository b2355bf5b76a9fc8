"""Shared by test_export.py, test_predict.py and test_bad_inputs.py: a tiny model, a hand-made run directory,
scans, edited bundles."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from segpipe.config import load_config, to_yaml
from segpipe.data.preprocess import PreprocessSettings
from segpipe.io import write_json, write_nifti, write_text

PATCH = [16, 16, 16]
# What issue 5's training writes to RUN_DIR/preprocessing.json: the resolved settings as a dict.
PREPROCESSING = PreprocessSettings(target_spacing_mm=(1.0, 1.0, 1.5), normalization="zscore", image_order=1)

# A non-RAS (P, S, L), anisotropic, translated affine.
NON_RAS_AFFINE = np.array([[0, 0, -1.8, 30.0], [-0.9, 0, 0, 12.0], [0, 1.3, 0, -7.0], [0, 0, 0, 1]])


def tiny_architecture(*, depth: int = 3, deep_supervision: bool = True, num_classes: int = 3) -> dict[str, Any]:
    """The builder arguments of :func:`tiny_model` (what a bundle records to rebuild it)."""
    return {"builder": "unet3d", "in_channels": 1, "num_classes": num_classes,
            "args": {"depth": depth, "base_filters": 4, "deep_supervision": deep_supervision}}


def tiny_model(*, depth: int = 3, deep_supervision: bool = True, seed: int = 0, num_classes: int = 3):
    """An untrained 4-filter U-Net with fixed weights (agreement between paths is what is tested)."""
    import keras

    from segpipe.models.architecture import build_network

    keras.utils.set_random_seed(seed)
    model = build_network(tiny_architecture(depth=depth, deep_supervision=deep_supervision, num_classes=num_classes))
    # Non-trivial batch-norm statistics, so a bundle that lost them would show.
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            rng = np.random.default_rng(len(layer.name))
            layer.moving_mean.assign(rng.normal(0, 0.1, layer.moving_mean.shape))
            layer.moving_variance.assign(rng.uniform(0.5, 1.5, layer.moving_variance.shape))
    return model


def make_run_dir(root: Path, model, phantom_root: Path, *, depth: int = 3, overrides: tuple[str, ...] = ()) -> Path:
    """A finished-looking run directory: config.yaml, preprocessing.json and the three checkpoints."""
    from segpipe.training.checkpoints import save_checkpoint

    run_dir = Path(root) / "runs" / "hand"
    config = load_config(None, [
        f"data.root={phantom_root}", "data.phantoms=null", f"data.patch_size={PATCH}",
        f"model.depth={depth}", "model.base_filters=4", "model.deep_supervision=true", "name=hand", *overrides,
    ])
    write_text(run_dir / "config.yaml", to_yaml(config))
    write_json(run_dir / "preprocessing.json", dataclasses.asdict(PREPROCESSING))
    (run_dir / "checkpoints").mkdir(parents=True)
    model.save(run_dir / "checkpoints" / "best.keras")
    model.save(run_dir / "model.keras")
    save_checkpoint(run_dir / "checkpoints" / "last", model, {"epoch": 1})
    write_json(run_dir / "status.json", {"status": "finished"})
    return run_dir


def phantom_scan(shape=(20, 14, 12), seed: int = 0) -> np.ndarray:
    """An MRI-like scan: a bright off-centre ellipsoid on a noisy background, zero margin on one side."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"), -1)
    inside = (((grid - [0.2, -0.1, 0.1]) / [0.5, 0.6, 0.55]) ** 2).sum(-1) < 1
    image = 100 + 200 * inside + 10 * rng.standard_normal(shape)
    image[:2] = 0  # something for crop_to_nonzero to cut
    return image.astype(np.float32)


def write_scan(path: Path, image: np.ndarray, affine: np.ndarray) -> Path:
    write_nifti(path, image, affine)
    return path


DELETE = object()  # edit_bundle_json(key=DELETE) removes the key


def edit_bundle_json(**changes: Any) -> Callable[[Path], None]:
    """A function that rewrites a bundle folder's bundle.json with ``changes`` (value DELETE: remove the key)."""
    def edit(bundle: Path) -> None:
        meta = json.loads((bundle / "bundle.json").read_text())
        for key, value in changes.items():
            if value is DELETE:
                del meta[key]
            else:
                meta[key] = value
        (bundle / "bundle.json").write_text(json.dumps(meta))
    return edit


def rewrite_manifest(bundle: Path) -> None:
    """Record the bundle's files as they are now in its manifest: what a sender who edits a file and
    ``bundle.json`` together would do (the manifest is no signature)."""
    from segpipe.inference.integrity import file_manifest

    meta = json.loads((bundle / "bundle.json").read_text())
    meta["manifest"] = file_manifest(bundle)
    (bundle / "bundle.json").write_text(json.dumps(meta))
