"""The bad-input corpus (issue 18): malformed datasets, configs, bundles and scans through the real commands.

Each row of ``ROWS`` states the input, the command (``train``, ``plan``, ``predict``, ``evaluate``:
``segpipe.cli.<command>.main(argv)``, the console scripts' entry points) and substrings of the one
error message. Every row must give

- a non-zero exit code, no traceback, and exactly one ``error:`` line, whose message (with its
  problem lines) says "Expected … Received: …" and contains the row's substrings (the file or key,
  what was expected, what was received);
- nothing written to the output folder (``OUT``: the run's ``output_dir``, ``predict.py --output``,
  ``evaluate.py --out``, ``segpipe-plan --out``). Rows marked ``fingerprint=True`` fail on the
  dataset's fingerprint (label values, patch size, channels): that one file, a complete record of
  the input files, may be in the dataset cache under ``output_dir``; nothing else.

The controls at the end run the same commands on the clean inputs the rows break, so a row fails
for the reason it states. Volumes are 12×10×8 voxels; the bundle holds a 2-filter, 1-stage U-Net.
docs/data.md ("What is checked") lists what the rows cover.
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import nibabel as nib
import numpy as np
import pytest
from inference_helpers import DELETE, edit_bundle_json

from segpipe.cli import evaluate as evaluate_cli
from segpipe.cli import plan as plan_cli
from segpipe.cli import predict as predict_cli
from segpipe.cli import train as train_cli

SHAPE = (12, 10, 8)
# Axes 0 and 1 both along x (a broken header): singular, yet every voxel size is 1 mm, so nibabel
# can store it (it cannot store an affine with a zero column: its qform needs a rotation).
SINGULAR = np.array([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
OUT = "out"
ERROR_LINE = re.compile(r"^(?:\S+(?: export)?: )?error: ")


# ---------------------------------------------------------------------------------------------- inputs


def _arrays(seed: int = 0, channels: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """A noisy image (X, Y, Z) or (X, Y, Z, C) float32 and its label map (X, Y, Z) uint8 with one box."""
    rng = np.random.default_rng(seed)
    label = np.zeros(SHAPE, np.uint8)
    label[2:7, 2:8, 2:6] = 1
    image = (label * 10.0 + rng.normal(50.0, 5.0, SHAPE)).astype(np.float32)
    return (np.stack([image] * channels, axis=-1) if channels > 1 else image), label


def _save(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array), np.eye(4) if affine is None else affine), str(path))
    return path


def _msd(tmp: Path, n: int = 3, *, images: dict | None = None, labels: dict | None = None, affines: dict | None = None,
         channels: int = 1, extra_training: list | None = None) -> Path:
    """An MSD dataset ``tmp/ds`` of ``n`` clean cases ``case_<i>``; ``images``/``labels``/``affines`` replace
    case i's."""
    root = tmp / "ds"
    entries = []
    for i in range(n):
        image, label = _arrays(i, channels)
        affine = (affines or {}).get(i)
        _save(root / "imagesTr" / f"case_{i}.nii.gz", (images or {}).get(i, image), affine)
        _save(root / "labelsTr" / f"case_{i}.nii.gz", (labels or {}).get(i, label), affine)
        entries.append({"image": f"./imagesTr/case_{i}.nii.gz", "label": f"./labelsTr/case_{i}.nii.gz"})
    meta = {"name": "bad", "modality": {str(c): f"mod{c}" for c in range(channels)},
            "labels": {"0": "background", "1": "organ"}, "training": entries + list(extra_training or [])}
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def _float_label(value: float) -> np.ndarray:
    label = _arrays(1)[1].astype(np.float32)
    label[3, 3, 3] = value
    return label


def _with_nan(image: np.ndarray) -> np.ndarray:
    image = image.copy()
    image[4, 4, 4] = np.nan
    return image


def _beyond_float32(image: np.ndarray) -> np.ndarray:
    """``image`` as float64 with two finite values that float32 reads as inf."""
    image = image.astype(np.float64)
    image[4, 4, 4], image[5, 5, 5] = 1e39, -1e39
    return image


def _size_claim(path: Path, shape: tuple[int, ...], dtype=np.float32) -> Path:
    """A .nii.gz of a few dozen bytes whose header claims ``shape`` (no voxel data)."""
    import gzip

    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header["vox_offset"] = 352
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(header.binaryblock + b"\0" * 4))
    return path


def _folders_with_twin(tmp: Path) -> Path:
    """An images/ + labels/ dataset of 3 cases with images/case_1.nii beside images/case_1.nii.gz."""
    for i in range(3):
        image, label = _arrays(i)
        _save(tmp / "ds" / "images" / f"case_{i}.nii.gz", image)
        _save(tmp / "ds" / "labels" / f"case_{i}.nii.gz", label)
    _save(tmp / "ds" / "images" / "case_1.nii", _arrays(1)[0])
    return tmp / "ds"


def _train(tmp: Path, root: Path | str, *overrides: str) -> list[str]:
    """``train.py --no-plan`` on ``root`` with a tiny network, every output under ``tmp/out``."""
    return ["--no-plan", "--set", f"data.root={root}", "data.phantoms=null", f"output_dir={tmp / OUT}",
            "data.preprocess_workers=1", "model.depth=2", "model.base_filters=4", "data.patch_size=[8, 8, 8]",
            "train.epochs=1", "train.steps_per_epoch=1", "name=bad", *overrides]


def _train_config(tmp: Path, text: str) -> list[str]:
    """``train.py --config FILE`` for a config file holding ``text``."""
    path = tmp / "bad.yaml"
    path.write_text(text)
    return ["--no-plan", "--config", str(path), "--set", f"output_dir={tmp / OUT}"]


def _plan(tmp: Path, root: Path) -> list[str]:
    return [str(root), "--set", f"output_dir={tmp / OUT}", "data.preprocess_workers=1",
            "--out", str(tmp / OUT / "plan")]


# A bundle as write_bundle writes it, with only the Keras model (files may hold just "keras"), made
# once per module: hand-written bundle.json + a real 1-stage, 2-filter network.
BUNDLE_META = {
    "format": "segpipe-bundle", "format_version": 2,
    "classes": [{"value": 0, "name": "background"}, {"value": 1, "name": "organ"}],
    "input_channels": 1, "channel_names": ["t1"], "orientation": "RAS",
    "preprocessing": {"target_spacing_mm": [1.0, 1.0, 1.0], "normalization": "zscore", "crop_to_nonzero": True,
                      "image_order": 1, "label_interpolation": "onehot_linear", "intensity_stats": None},
    "patch_size": [8, 8, 8],
    "inference": {"overlap": 0.5, "mirror_axes": [], "batch_size": 2, "sigma_scale": 0.125,
                  "postprocess_largest_component": []},
    "files": {"keras": "model.weights.h5"}, "versions": {}, "activation_bytes_per_voxel": 100,
    "architecture": {"builder": "unet3d", "in_channels": 1, "num_classes": 2, "args": {"depth": 1, "base_filters": 2}},
}


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    from segpipe.inference.integrity import file_manifest
    from segpipe.models.architecture import build_network
    from segpipe.models.unet3d import probability_model

    folder = tmp_path_factory.mktemp("bundle") / "bundle"
    folder.mkdir()
    probability_model(build_network(BUNDLE_META["architecture"])).save_weights(folder / "model.weights.h5")
    (folder / "bundle.json").write_text(json.dumps({**BUNDLE_META, "manifest": file_manifest(folder)}))
    return folder


def _bundle_copy(tmp: Path, source: Path, edit: Callable[[Path], None] | None = None) -> Path:
    folder = tmp / "bundle"
    shutil.copytree(source, folder)
    if edit is not None:
        edit(folder)
    return folder


def _truncate_model(folder: Path) -> None:
    data = (folder / "model.weights.h5").read_bytes()
    (folder / "model.weights.h5").write_bytes(data[: len(data) // 2])


def _link_out(folder: Path) -> None:
    (folder / "model.weights.h5").unlink()
    (folder / "model.weights.h5").symlink_to("/etc/hostname")


def _predict(tmp: Path, bundle: Path, *inputs: Path) -> list[str]:
    return ["--model", str(bundle), "--input", *map(str, inputs), "--output", str(tmp / OUT), "--quiet"]


def _scan(tmp: Path, array: np.ndarray | None = None, affine: np.ndarray | None = None,
          name: str = "scan.nii.gz") -> Path:
    return _save(tmp / "scans" / name, _arrays(5)[0] if array is None else array, affine)


def _text_file(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _with_file(path: Path, text: str, result: list[str]) -> list[str]:
    _text_file(path, text)
    return result


# ---------------------------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Row:
    """One malformed input: what it is, the command it is given to, and what the message must say."""

    id: str
    input: str  # what is wrong, in words
    command: str  # train | plan | predict | evaluate
    make: Callable  # (tmp_path[, bundle_dir]) -> argv; writes the bad input under tmp_path
    contains: tuple[str, ...]  # substrings of the error message; {tmp} stands for tmp_path
    fingerprint: bool = False  # fails on the fingerprint: the dataset cache may hold fingerprint.json


def _row(id, input, command, make, *contains, fingerprint=False):
    return Row(id, input, command, make, tuple(contains), fingerprint)


ROWS = [
    # ---- datasets (train.py; data.check: headers unless the row says full)
    _row("label-nan", "a NaN inside a label map (data.check: full)", "train",
         lambda t: _train(t, _msd(t, labels={1: _float_label(np.nan)}), "data.check=full"),
         "[non-integer-label]", "labelsTr/case_1.nii.gz", "Expected integer label values", "nan"),
    _row("label-half", "a float label map with a 0.5 voxel (found while fingerprinting)", "train",
         lambda t: _train(t, _msd(t, labels={1: _float_label(0.5)})),
         "{tmp}/ds/labelsTr/case_1.nii.gz: Expected integer label values. Received: values=1 voxel(s) like 0.5"),
    _row("image-2d", "a 2-D image", "train",
         lambda t: _train(t, _msd(t, images={1: _arrays(1)[0][:, :, 0]})),
         "[dimensions]", "imagesTr/case_1.nii.gz",
         "Expected a 3-D image (X, Y, Z) or 4-D (X, Y, Z, C)", "shape (12, 10)"),
    _row("image-5d", "a 5-D image", "train",
         lambda t: _train(t, _msd(t, images={1: np.ones((*SHAPE, 2, 2), np.float32)})),
         "[dimensions]", "imagesTr/case_1.nii.gz", "shape (12, 10, 8, 2, 2)"),
    _row("image-empty-axis", "an image with a zero-size axis", "train",
         lambda t: _train(t, _msd(t, images={1: np.ones((12, 10, 0), np.float32)})),
         "[empty-axis]", "imagesTr/case_1.nii.gz", "Expected at least 1 voxel along every axis", "shape (12, 10, 0)"),
    _row("label-empty-axis", "a label map with a zero-size axis", "train",
         lambda t: _train(t, _msd(t, labels={1: np.zeros((12, 0, 8), np.uint8)})),
         "[empty-axis]", "labelsTr/case_1.nii.gz", "shape (12, 0, 8)"),
    _row("singular-affine", "an image (and label) whose affine is singular", "train",
         lambda t: _train(t, _msd(t, affines={1: SINGULAR})),
         "[bad-affine] imagesTr/case_1.nii.gz: Expected an invertible affine with finite "
         "entries (every voxel size > 0). "
         "Received: affine", "(singular: determinant 0,", "[bad-affine] labelsTr/case_1.nii.gz"),
    _row("dataset-json-invalid", "a dataset.json that is not JSON", "train",
         lambda t: _with_file(t / "ds" / "dataset.json", '{"labels": {"0": "bg"}, "training": [',
                              _train(t, t / "ds")),
         "{tmp}/ds/dataset.json: Expected valid JSON. Received: contents=invalid JSON"),
    _row("dataset-json-missing-files", "a dataset.json that names files that do not exist", "train",
         lambda t: _train(t, _msd(t, extra_training=[{"image": "./imagesTr/ghost.nii.gz",
                                                       "label": "./labelsTr/ghost.nii.gz"}])),
         "[missing-file] imagesTr/ghost.nii.gz: Expected an image file. Received: no such file",
         "[missing-label] labelsTr/ghost.nii.gz"),
    _row("channel-count", "a case with 1 channel where dataset.json declares 2", "train",
         lambda t: _train(t, _msd(t, channels=2, images={1: _arrays(1)[0]})),
         "[channel-count] imagesTr/case_1.nii.gz: Expected 2 channel(s) (declared channels ['mod0', 'mod1']). "
         "Received: 1 channel(s)"),
    _row("dataset-empty", "an empty dataset (no training cases)", "train",
         lambda t: _train(t, _msd(t, n=0)),
         "[no-cases] dataset.json: Expected at least one case (msd layout). Received: 0 "
         "cases: an empty 'training' list"),
    _row("dataset-empty-folders", "an empty images/ + labels/ dataset", "plan",
         lambda t: ((t / "ds" / "images").mkdir(parents=True), (t / "ds" / "labels").mkdir(), _plan(t, t / "ds"))[-1],
         "[no-cases] images: Expected at least one case (folders layout). Received: 0 cases: no NIfTI files"),
    _row("dataset-one-case", "a dataset of one case (no validation case)", "train",
         lambda t: _train(t, _msd(t, n=1)),
         "Expected at least 2 cases for a training and a validation case. Received: "
         "data.root={tmp}/ds with 1 case(s)."),
    _row("too-few-for-folds", "3 cases for data.folds: 5", "train",
         lambda t: [*_train(t, _msd(t), "data.folds=5"), "--fold", "0"],
         "Expected at least 5 cases for 5 folds (data.folds). Received: data.root={tmp}/ds with 3 case(s)."),
    _row("patch-larger-than-every-scan", "a patch size larger than every scan (32³ on 12×10×8)", "train",
         lambda t: _train(t, _msd(t), "data.patch_size=[32, 32, 32]"),
         "Expected a patch no larger than the largest case along at least one axis (largest case: [12, 10, 8] voxels",
         "Received: data.patch_size=[32, 32, 32].", "divides by the network's down-sampling: [12, 10, 8].",
         fingerprint=True),
    _row("undeclared-label", "a label value dataset.json does not declare (data.check: full)", "train",
         lambda t: _train(t, _msd(t, labels={2: np.full(SHAPE, 7, np.uint8)}), "data.check=full"),
         "[undeclared-label] labelsTr/case_2.nii.gz: Expected values among the declared classes [0, 1]. "
         "Received: values [7] (undeclared: [7])"),
    _row("undeclared-label-headers", "a label value dataset.json does not declare (found on the fingerprint)", "train",
         lambda t: _train(t, _msd(t, labels={2: np.full(SHAPE, 7, np.uint8)})),
         "[undeclared-label] labelsTr/case_2.nii.gz: Expected label values declared in dataset.json ([0, 1])",
         fingerprint=True),
    _row("shape-mismatch", "a label map whose shape differs from its image", "train",
         lambda t: _train(t, _msd(t, labels={0: np.zeros((12, 10, 9), np.uint8)})),
         "[shape-mismatch] labelsTr/case_0.nii.gz: Expected the image shape (12, 10, 8). Received: shape (12, 10, 9)"),
    _row("label-4d", "a 4-D label map", "train",
         lambda t: _train(t, _msd(t, labels={0: np.zeros((*SHAPE, 2), np.uint8)})),
         "[dimensions] labelsTr/case_0.nii.gz: Expected a 3-D label map (X, Y, Z). Received: shape (12, 10, 8, 2)"),
    _row("image-not-nifti", "an image file that is not NIfTI (text in a .nii.gz)", "train",
         lambda t: (_msd(t), _text_file(t / "ds" / "imagesTr" / "case_2.nii.gz", "not an image"),
                    _train(t, t / "ds"))[-1],
         "[unreadable] imagesTr/case_2.nii.gz: Expected a readable NIfTI image."),
    _row("image-nan", "NaN intensities (data.check: full)", "train",
         lambda t: _train(t, _msd(t, images={0: _with_nan(_arrays(0)[0])}), "data.check=full"),
         "[non-finite] imagesTr/case_0.nii.gz: Expected finite intensities. Received: 1 NaN/inf voxels"),
    _row("image-float32-overflow", "finite float64 intensities beyond float32's range (data.check: full)", "train",
         lambda t: _train(t, _msd(t, images={0: _beyond_float32(_arrays(0)[0])}), "data.check=full"),
         "[non-finite] imagesTr/case_0.nii.gz: Expected finite intensities. Received: 2 NaN/inf voxels as float32 "
         "(2 finite float64 value(s) beyond float32's range"),
    _row("image-float32-overflow-headers", "finite float64 intensities beyond float32's range (found on reading)",
         "train", lambda t: _train(t, _msd(t, images={0: _beyond_float32(_arrays(0)[0])})),
         "{tmp}/ds/imagesTr/case_0.nii.gz: Expected values within float32's range (|x| <= 3.4e+38). "
         "Received: values=2 finite float64 voxel(s) beyond it (largest |x| 1e+39)."),
    _row("image-size-claim", "a 56-byte .nii.gz whose header claims 1000×1000×100 float32 (381 MiB)", "train",
         lambda t: (_msd(t), _size_claim(t / "ds" / "imagesTr" / "case_1.nii.gz", (1000, 1000, 100)),
                    _train(t, t / "ds"))[-1],
         "[size-claim] imagesTr/case_1.nii.gz: Expected a gzip file that can hold the voxels its header claims",
         "Received: shape (1000, 1000, 100) float32: 100000000 voxels, 381.5 MiB (400000000 bytes) (file: "),
    _row("dataset-nii-twins", "images/case_1.nii beside images/case_1.nii.gz", "plan",
         lambda t: _plan(t, _folders_with_twin(t)),
         "{tmp}/ds: Expected one file per case name (NAME.nii or NAME.nii.gz, not both). "
         "Received: files=images/case_1.nii and images/case_1.nii.gz."),
    _row("nnunet-regions", "an nnU-Net dataset.json with region labels but no regions_class_order", "train",
         lambda t: _with_file(t / "ds" / "dataset.json", json.dumps(
             {"channel_names": {"0": "t1"}, "labels": {"background": 0, "whole": [1, 2]}, "file_ending": ".nii.gz"}),
             _train(t, t / "ds")),
         "{tmp}/ds/dataset.json: Expected one label value in 1..255 per region (1: ['whole']), written where the "
         "region is predicted. Received: regions_class_order=None."),
    _row("root-missing", "a data.root that does not exist", "train",
         lambda t: _train(t, t / "nowhere"),
         "Received: data.root={tmp}/nowhere (no such folder, neither found)."),
    _row("root-is-file", "a data.root that is a file", "train",
         lambda t: _train(t, _text_file(t / "ds.txt", "x")),
         "Received: data.root={tmp}/ds.txt (a file, not a folder, neither found)."),
    _row("split-file-unknown-case", "a data.split_file naming a case the dataset lacks", "train",
         lambda t: _with_file(t / "split.json", json.dumps({"train": ["case_0", "case_1"], "val": ["ghost"]}),
                              _train(t, _msd(t), f"data.split_file={t / 'split.json'}")),
         "Expected split cases that are in the dataset. Received: split=1 unknown case id(s): ['ghost']."),
    _row("plan-image-2d", "a 2-D image, planned", "plan",
         lambda t: _plan(t, _msd(t, images={1: _arrays(1)[0][:, :, 0]})),
         "[dimensions] imagesTr/case_1.nii.gz: Expected a 3-D image (X, Y, Z) or 4-D (X, Y, Z, "
         "C). Received: shape (12, 10)"),
    # ---- configs (train.py)
    _row("config-unknown-key", "an unknown config key", "train",
         lambda t: _train(t, "unused", "train.epoch=3"),
         "Received: train.epoch=3. Did you mean 'train.epochs'?", "Expected a key of train ("),
    _row("config-wrong-type", "a config value of the wrong type", "train",
         lambda t: _train(t, "unused", "train.epochs=three"),
         "Expected an integer. Received: train.epochs='three'."),
    _row("config-out-of-range", "a config value out of range", "train",
         lambda t: _train(t, "unused", "data.val_fraction=1.5"),
         "Expected <= 1. Received: data.val_fraction=1.5."),
    _row("config-choice", "a value that is not one of the choices", "train",
         lambda t: _train(t, "unused", "model.norm=bach"),
         "Expected one of ['batch', 'instance', 'none']. Received: model.norm='bach'. Did you mean 'batch'?"),
    _row("config-patch-divisor", "a patch the network cannot halve", "train",
         lambda t: _train(t, "unused", "model.depth=4", "data.patch_size=[12, 12, 12]"),
         "Received: data.patch_size=[12, 12, 12]. Nearest valid: [16, 16, 16]"),
    _row("config-not-yaml", "a config file that is not YAML", "train",
         lambda t: _train_config(t, "train: [1, 2\n"),
         "{tmp}/bad.yaml: Expected valid YAML. Received: contents=invalid YAML"),
    _row("config-not-mapping", "a config file that is a list", "train",
         lambda t: _train_config(t, "- train\n- data\n"),
         "{tmp}/bad.yaml: Expected a mapping of config sections at the top level. Received: contents=a list."),
    _row("config-missing-parent", "a config that extends a missing file", "train",
         lambda t: _train_config(t, "extends: nowhere.yaml\n"),
         "{tmp}/bad.yaml: Expected an existing config file. Received: extends='{tmp}/nowhere.yaml'."),
    _row("config-normalization-channels", "one normalization per channel, with the wrong count", "train",
         lambda t: _train(t, _msd(t), "data.normalization=[zscore, none]"),
         "Expected one scheme, or one per channel (1 in {tmp}/ds). Received: data.normalization=['zscore', 'none'].",
         fingerprint=True),
    # ---- bundles (predict.py --model)
    _row("bundle-missing", "a bundle folder that does not exist", "predict",
         lambda t, b: _predict(t, t / "nowhere", _scan(t)),
         "Expected a bundle folder. Received: bundle={tmp}/nowhere (no such folder)."),
    _row("bundle-json-invalid", "a bundle.json that is not JSON", "predict",
         lambda t, b: _predict(t, _bundle_copy(t, b, lambda f: (f / "bundle.json").write_text("{")), _scan(t)),
         "{tmp}/bundle/bundle.json: Expected valid JSON. Received: contents=invalid JSON"),
    _row("bundle-newer-version", "a bundle of a newer format version", "predict",
         lambda t, b: _predict(t, _bundle_copy(t, b, edit_bundle_json(format_version=3)), _scan(t)),
         "{tmp}/bundle/bundle.json: Expected format version 2. Received: format_version=3. Written by a newer segpipe"),
    _row("bundle-missing-key", "a bundle.json without patch_size", "predict",
         lambda t, b: _predict(t, _bundle_copy(t, b, edit_bundle_json(patch_size=DELETE)), _scan(t)),
         "{tmp}/bundle/bundle.json: Expected 3 integers from 1 to 1024, at most 16777216 voxels in all. "
         "Received: patch_size=<missing>."),
    _row("bundle-absurd-patch", "a bundle.json claiming a 100000³ patch", "predict",
         lambda t, b: _predict(t, _bundle_copy(t, b, edit_bundle_json(patch_size=[100000] * 3)), _scan(t)),
         "{tmp}/bundle/bundle.json: Expected 3 integers from 1 to 1024, at most 16777216 voxels in all. "
         "Received: patch_size=[100000, 100000, 100000]."),
    _row("bundle-absurd-spacing", "a bundle.json with a target spacing of 10⁻⁶ mm", "predict",
         lambda t, b: _predict(t, _bundle_copy(t, b, edit_bundle_json(
             preprocessing={**BUNDLE_META["preprocessing"], "target_spacing_mm": [1e-6, 1e-6, 1e-6]})), _scan(t)),
         "{tmp}/bundle/bundle.json: Expected 3 voxel sizes from 0.001 to 1000.0 mm (or null). "
         "Received: preprocessing.target_spacing_mm=[1e-06, 1e-06, 1e-06]."),
    _row("bundle-fine-spacing-huge-grid",
         "a bundle whose 0.001 mm target spacing would resample a scan to 10¹² voxels", "predict",
         lambda t, b: _predict(t, _bundle_copy(t, b, edit_bundle_json(
             preprocessing={**BUNDLE_META["preprocessing"], "target_spacing_mm": [0.001, 0.001, 0.001]})), _scan(t)),
         "{tmp}/scans/scan.nii.gz: Expected a scan of at most 1073741824 voxels at the bundle's target spacing "
         "[0.001, 0.001, 0.001] mm. Received: --input=shape (12, 10, 8) at [1.0, 1.0, 1.0] "
         "mm -> about 9.6e+11 voxels."),
    _row("bundle-keras-file-renamed", "a bundle.json naming model.h5 as the Keras file", "predict",
         lambda t, b: _predict(t, _bundle_copy(t, b, edit_bundle_json(files={"keras": "model.h5"})), _scan(t)),
         "Expected 'model.weights.h5' (the one file name of the keras format). Received: files.keras='model.h5'."),
    _row("bundle-symlink-out", "a bundle whose weights file is a link out of the bundle", "predict",
         lambda t, b: _predict(t, _bundle_copy(t, b, _link_out), _scan(t)),
         "Expected no symbolic link in the folder (a link can point outside it). "
         "Received: files={tmp}/bundle/model.weights.h5 -> /etc/hostname."),
    _row("bundle-savedmodel-untrusted", "--format savedmodel without --trust-bundle", "predict",
         lambda t, b: [*_predict(t, b, _scan(t)), "--format", "savedmodel"],
         "Expected a format that cannot run code (keras, onnx, openvino, auto) for a bundle not marked as trusted. "
         "Received: format='savedmodel'. A savedmodel model is a program"),
    _row("bundle-listed-file-missing", "a bundle.json listing a model file that is not there", "predict",
         lambda t, b: _predict(t, _bundle_copy(t, b, edit_bundle_json(files={"keras": "model.weights.h5",
                                                                             "onnx": "model.onnx"})), _scan(t)),
         "Expected every model file bundle.json lists, in its manifest. "
         "Received: files.onnx=model.onnx (model.onnx is not in the manifest; incomplete bundle?)."),
    _row("bundle-model-truncated", "a bundle whose model file is truncated", "predict",
         lambda t, b: _predict(t, _bundle_copy(t, b, _truncate_model), _scan(t)),
         "{tmp}/bundle/bundle.json: Expected ",
         " bytes. Received: manifest.model.weights.h5={tmp}/bundle/model.weights.h5 ("),
    _row("bundle-bad-inference", "a bundle.json with an overlap out of range", "predict",
         lambda t, b: _predict(t, _bundle_copy(t, b, edit_bundle_json(inference={"overlap": 1.5})), _scan(t)),
         "{tmp}/bundle/bundle.json: Expected a number in [0, 0.95]. Received: inference.overlap=1.5."),
    # ---- prediction inputs (predict.py --input), checked before the network is loaded
    _row("scan-not-nifti", "a predict input that is not NIfTI", "predict",
         lambda t, b: _predict(t, b, _text_file(t / "scans" / "notes.txt", "hello")),
         "[unreadable] {tmp}/scans/notes.txt: Expected a readable NIfTI image. Received: "),
    _row("scan-2d", "a 2-D scan", "predict",
         lambda t, b: _predict(t, b, _scan(t, _arrays(5)[0][:, :, 0])),
         "[dimensions] {tmp}/scans/scan.nii.gz: Expected a 3-D image (X, Y, Z) or 4-D (X, Y, Z, "
         "C). Received: shape (12, 10)"),
    _row("scan-5d", "a 5-D scan", "predict",
         lambda t, b: _predict(t, b, _scan(t, np.ones((*SHAPE, 2, 2), np.float32))),
         "[dimensions] {tmp}/scans/scan.nii.gz:", "shape (12, 10, 8, 2, 2)"),
    _row("scan-empty-axis", "a scan with a zero-size axis", "predict",
         lambda t, b: _predict(t, b, _scan(t, np.ones((0, 10, 8), np.float32))),
         "[empty-axis] {tmp}/scans/scan.nii.gz: Expected at least 1 voxel along every axis. Received: shape (0,"),
    _row("scan-singular-affine", "a scan whose affine is singular", "predict",
         lambda t, b: _predict(t, b, _scan(t, affine=SINGULAR)),
         "[bad-affine] {tmp}/scans/scan.nii.gz: Expected an invertible affine with finite entries", "(singular: "),
    _row("scan-nan", "a scan with NaN intensities", "predict",
         lambda t, b: _predict(t, b, _scan(t, _with_nan(_arrays(5)[0]))),
         "[non-finite] {tmp}/scans/scan.nii.gz: Expected finite intensities. Received: 1 NaN/inf voxels"),
    _row("scan-float32-overflow", "a float64 scan with values beyond float32's range", "predict",
         lambda t, b: _predict(t, b, _scan(t, _beyond_float32(_arrays(5)[0]))),
         "[non-finite] {tmp}/scans/scan.nii.gz: Expected finite intensities. Received: 2 NaN/inf voxels as float32"),
    _row("scan-size-claim", "a scan whose header claims 10^10 voxels", "predict",
         lambda t, b: _predict(t, b, _size_claim(t / "scans" / "scan.nii.gz", (2000, 2000, 2500), np.int16)),
         "[size-claim] {tmp}/scans/scan.nii.gz: Expected at most 2147483648 voxels",
         "Received: shape (2000, 2000, 2500) int16: 10000000000 voxels, 18.6 GiB (20000000000 bytes)"),
    _row("scan-channels", "a 2-channel scan for a 1-channel bundle", "predict",
         lambda t, b: _predict(t, b, _scan(t, _arrays(5, channels=2)[0])),
         "[channel-count] {tmp}/scans/scan.nii.gz: Expected 1 channel(s) ['t1'] (the model's input). "
         "Received: 2 channel(s) in scan.nii.gz"),
    _row("scan-missing", "a predict input that does not exist", "predict",
         lambda t, b: _predict(t, b, t / "scans" / "nothing.nii.gz"),
         "Expected a NIfTI file or a folder of them. Received: input={tmp}/scans/nothing.nii.gz "
         "(no such file or folder)."),
    _row("scan-folder-empty", "a predict input folder without NIfTI files", "predict",
         lambda t, b: (_text_file(t / "scans" / "notes.txt", "x"), _predict(t, b, t / "scans"))[-1],
         "Expected NIfTI files (.nii, .nii.gz). Received: input={tmp}/scans (has none)."),
    # ---- evaluation inputs (evaluate.py, folder mode)
    _row("evaluate-no-ref", "references that do not exist", "evaluate",
         lambda t: (_scan(t), ["--pred", str(t / "scans"), "--ref", str(t / "refs"), "--out", str(t / OUT)])[-1],
         "Expected a folder of NIfTI label maps. Received: ref_dir={tmp}/refs (no such folder)."),
    _row("evaluate-dataset-json", "a --dataset-json that is not JSON", "evaluate",
         lambda t: (_scan(t), _text_file(t / "meta" / "dataset.json", "{"),
                    ["--pred", str(t / "scans"), "--ref", str(t / "scans"), "--dataset-json",
                     str(t / "meta" / "dataset.json"),
                     "--out", str(t / OUT)])[-1],
         "{tmp}/meta/dataset.json: Expected valid JSON. Received: contents=invalid JSON"),
]
MAINS = {"train": train_cli.main, "plan": plan_cli.main, "predict": predict_cli.main, "evaluate": evaluate_cli.main}


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()} if folder.exists() else {}


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_a_bad_input_is_one_clear_error_and_writes_nothing(row, tmp_path, capsys, request):
    args = (tmp_path, request.getfixturevalue("bundle_dir")) if row.command == "predict" else (tmp_path,)
    argv = row.make(*args)
    out = tmp_path / OUT
    before = _files(out)
    capsys.readouterr()
    code = MAINS[row.command](argv)
    err = capsys.readouterr().err
    assert code != 0, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if ERROR_LINE.match(line)]
    assert len(lines) == 1, err
    message = err[err.index(lines[0]):]
    assert re.search(r"Expected .+?\. Received: ", message), message
    for text in row.contains:
        assert text.format(tmp=tmp_path) in message, f"{text.format(tmp=tmp_path)!r} not in:\n{message}"
    written = {k: v for k, v in _files(out).items() if before.get(k) != v}
    if row.fingerprint:
        written = {k: v for k, v in written.items() if not re.fullmatch(r"\.cache/[^/]+/fingerprint\.json", k)}
    assert not written, f"written to {out}: {sorted(written)}"


def test_the_table_covers_every_kind_of_input_and_the_issue_list():
    assert len(ROWS) >= 25 and len({r.id for r in ROWS}) == len(ROWS)
    assert {r.command for r in ROWS} == set(MAINS)
    ids = {r.id for r in ROWS}
    for named in ("label-nan", "label-half", "image-2d", "image-5d", "image-empty-axis", "singular-affine",
                  "dataset-json-invalid", "dataset-json-missing-files", "channel-count", "dataset-empty",
                  "bundle-model-truncated", "patch-larger-than-every-scan", "config-unknown-key", "config-wrong-type",
                  "config-out-of-range", "scan-not-nifti"):
        assert named in ids


# ---------------------------------------------------------------------------------------------- controls


def test_control_the_clean_dataset_passes_the_checks_the_rows_fail(tmp_path):
    """The clean dataset of the dataset rows, with their settings, prepares (checks, fingerprint, cache, split)."""
    from segpipe.config import load_config
    from segpipe.data.pipeline import prepare_data

    argv = _train(tmp_path, _msd(tmp_path), "data.check=full")
    config = load_config(None, argv[argv.index("--set") + 1:])
    prepared = prepare_data(config, progress=False)
    assert sorted(prepared.cases) == ["case_0", "case_1", "case_2"]
    assert len(prepared.split["train"]) == 2 and len(prepared.split["val"]) == 1


def test_control_the_bundle_segments_a_clean_scan(tmp_path, bundle_dir, capsys):
    """The bundle and scan of the predict rows work: one label map with the scan's shape and affine."""
    scan = _scan(tmp_path, affine=np.diag([1.0, 1.2, 0.9, 1.0]))
    assert predict_cli.main(_predict(tmp_path, bundle_dir, scan)) == 0, capsys.readouterr().err
    result = nib.load(str(tmp_path / OUT / "scan.nii.gz"))
    assert result.shape == SHAPE and np.allclose(result.affine, np.diag([1.0, 1.2, 0.9, 1.0]))


# ---------------------------------------------------------------------------------------------- full disk, read-only


def test_a_full_disk_while_writing_predictions_names_the_file_and_keeps_complete_ones(tmp_path, bundle_dir, capsys,
                                                                                     monkeypatch):
    import errno

    import segpipe.io

    scans = [_scan(tmp_path, name="a.nii.gz"), _scan(tmp_path, name="b.nii.gz")]
    out = tmp_path / OUT
    assert predict_cli.main(_predict(tmp_path, bundle_dir, scans[1])) == 0  # an earlier b.nii.gz, complete
    earlier = (out / "b.nii.gz").read_bytes()
    real_save = nib.save

    def full_on_b(image, path):
        if Path(path).name.startswith(".b."):  # the temporary file of b.nii.gz
            Path(path).write_bytes(b"half a label map")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(image, path)

    monkeypatch.setattr(segpipe.io.nifti.nib, "save", full_on_b)
    capsys.readouterr()
    assert predict_cli.main([*_predict(tmp_path, bundle_dir, *scans), "--overwrite"]) == 1  # b.nii.gz exists
    err = capsys.readouterr().err
    assert err.startswith(f"predict.py: error: Expected free space and a writable folder for this file. "
                          f"Received: path={out / 'b.nii.gz'} (No space left on device). Nothing was half-written"), err
    assert "Traceback" not in err
    assert nib.load(str(out / "a.nii.gz")).shape == SHAPE  # written before the disk filled up: complete
    assert (out / "b.nii.gz").read_bytes() == earlier  # the earlier prediction is unchanged
    assert sorted(p.name for p in out.iterdir()) == ["a.nii.gz", "b.nii.gz"]  # no temporary left behind


def test_a_read_only_output_folder_is_one_error_and_nothing_is_written(tmp_path, bundle_dir, capsys, monkeypatch):
    import errno

    import segpipe.io

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(segpipe.io.durable, "tempfile", SimpleNamespace(mkstemp=read_only))  # io.durable only
    assert predict_cli.main(_predict(tmp_path, bundle_dir, _scan(tmp_path))) == 1
    err = capsys.readouterr().err
    assert f"Received: path={tmp_path / OUT / 'scan.nii.gz'} (Read-only file system)." in err and "Traceback" not in err
    assert not _files(tmp_path / OUT)


def test_a_full_disk_while_writing_the_evaluation_is_one_error_naming_the_folder(tmp_path, capsys, monkeypatch):
    import errno
    import os

    import segpipe.io

    label = np.zeros((8, 8, 8), np.uint8)
    label[2:6, 2:6, 2:6] = 1
    _scan(tmp_path, label)  # a label map as prediction and as its own reference: the evaluation itself succeeds
    real_replace = os.replace

    def full(src, dst):
        if str(dst).startswith(str(tmp_path / OUT)):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(segpipe.io.durable.os, "replace", full)
    code = evaluate_cli.main(["--pred", str(tmp_path / "scans"), "--ref", str(tmp_path / "scans"),
                              "--out", str(tmp_path / OUT)])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert f"Received: path={tmp_path / OUT} (No space left on device)" in err
    assert not [p for p in (tmp_path / OUT).rglob("*") if p.is_file()]  # nothing half-written
