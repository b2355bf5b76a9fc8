"""Tests of segpipe.data, and tiny datasets written on the fly in each layout."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

LABELS = {0: "background", 1: "organ", 2: "lesion"}


def make_case(shape=(12, 10, 8), channels=1, seed=0) -> tuple[np.ndarray, np.ndarray]:
    """Image (X, Y, Z, C) float32 and label (X, Y, Z) uint8 with two boxes, zero margin around."""
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, np.uint8)
    x, y, z = shape
    label[2 : x // 2 + 1, 2 : y - 2, 2 : z - 2] = 1
    label[x // 2 + 1 : x - 2, 3 : y - 3, 3 : z - 3] = 2
    image = (label[..., None] * 10.0 + rng.normal(50, 5, shape + (channels,))).astype(np.float32)
    image[0] = 0  # a zero slab, so cropping to the non-zero box has something to do
    return image, label


def save(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array), np.eye(4) if affine is None else affine), str(path))
    return path


def make_dataset(root: Path, layout: str = "msd", *, num_cases: int = 3, shape=(12, 10, 8), channels: int = 1,
                 suffix: str = ".nii.gz", affine=None) -> Path:
    """Write a small dataset in ``layout``; returns ``root``."""
    root = Path(root)
    entries = []
    for i in range(num_cases):
        case = f"case_{i:03d}"
        image, label = make_case(shape, channels, seed=i)
        if layout == "msd":
            save(root / "imagesTr" / f"{case}{suffix}", image if channels > 1 else image[..., 0], affine)
            save(root / "labelsTr" / f"{case}{suffix}", label, affine)
            entries.append({"image": f"./imagesTr/{case}{suffix}", "label": f"./labelsTr/{case}{suffix}"})
        elif layout == "nnunet":
            for c in range(channels):
                save(root / "imagesTr" / f"{case}_{c:04d}{suffix}", image[..., c], affine)
            save(root / "labelsTr" / f"{case}{suffix}", label, affine)
        elif layout == "folders":
            save(root / "images" / f"{case}{suffix}", image if channels > 1 else image[..., 0], affine)
            save(root / "labels" / f"{case}{suffix}", label, affine)
        else:
            raise ValueError(layout)
    if layout == "msd":
        meta = {"name": "test", "modality": {str(c): f"mod{c}" for c in range(channels)},
                "labels": {str(k): v for k, v in LABELS.items()}, "training": entries}
        (root / "dataset.json").write_text(json.dumps(meta))
    elif layout == "nnunet":
        meta = {"channel_names": {str(c): f"mod{c}" for c in range(channels)},
                "labels": {v: k for k, v in LABELS.items()}, "numTraining": num_cases, "file_ending": suffix}
        (root / "dataset.json").write_text(json.dumps(meta))
    else:
        (root / "labels.json").write_text(json.dumps({str(k): v for k, v in LABELS.items()}))
    return root
