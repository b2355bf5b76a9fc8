"""Dataset fingerprint: spacings, shapes, foreground intensities and class frequencies.

Computed once per dataset and written as JSON; the config takes defaults from it (target spacing,
patch size hint, CT normalisation statistics). The target spacing is the planner's rule,
:func:`segpipe.planning.rules.plan_target_spacing` (nnU-Net's), so a plain training run and a
planned one resample a dataset the same way. Spacings and shapes are given in RAS axis order, the
order preprocessing works in. Following nnU-Net, intensities are pooled from a random sample of
foreground voxels of every case (10,000 per case by default).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy import ndimage
from nibabel.orientations import io_orientation, ornt_transform

from segpipe.arrays import bounding_box, seed_from_text
from segpipe.data.layouts import Case, Dataset, read_case_image, read_case_label
from segpipe.data.preprocess import RAS_ORNT
from segpipe.io import read_json, write_json
from segpipe.parallel import parallel_map
from segpipe.planning.rules import ANISOTROPY_THRESHOLD, plan_target_spacing

# 2: per-case class positions (the mirroring rule); 3: target spacing by planning's rule (was a second rule here)
FINGERPRINT_VERSION = 3


def compute_fingerprint(
    dataset: Dataset,
    *,
    samples_per_case: int = 10_000,
    anisotropy_threshold: float = ANISOTROPY_THRESHOLD,
    patch_divisor: int = 8,
    max_patch_size: int = 128,
    workers: int = 1,
    progress: bool = False,
) -> dict[str, Any]:
    """Read every case once and summarise the dataset.

    Returns a JSON-ready dict with ``cases`` (per case: spacing, shape, cropped shape, class voxel
    counts), ``median_spacing_mm``, ``target_spacing_mm`` (:func:`segpipe.planning.rules.plan_target_spacing`),
    ``median_shape``, ``median_shape_at_target``, ``patch_size_hint``, ``intensity`` (one dict per
    channel: mean, std, min, max, median, percentile_00_5, percentile_99_5 of foreground voxels) and
    ``classes`` (voxel fraction and number of cases containing each class; the ignore label is no
    class: ``ignore_label`` holds its value, fraction and case count, or None). Per case also
    ``class_positions``: each foreground class's centroid as a fraction of the foreground's
    bounding box along each RAS axis (see :func:`class_positions`).
    """
    jobs = [(case, samples_per_case, dataset.ignore_label) for case in dataset.cases]
    per_case = parallel_map(_case_stats_job, jobs, workers=workers, progress=progress, desc="fingerprint")
    spacings = np.array([c["spacing_mm"] for c in per_case])
    cropped = np.array([c["cropped_shape"] for c in per_case])
    target = plan_target_spacing(spacings, cropped, anisotropy_threshold=anisotropy_threshold).value
    at_target = np.median(cropped * spacings / np.asarray(target), axis=0)

    channels = max(len(c["samples"]) for c in per_case)
    intensity = []
    for ch in range(channels):
        pooled = np.concatenate([np.asarray(c["samples"][ch], dtype=np.float64) for c in per_case if len(c["samples"]) > ch])
        intensity.append(_intensity_stats(pooled))

    totals: dict[int, int] = {}
    present: dict[int, int] = {}
    for c in per_case:
        for value, count in c["class_voxels"].items():
            totals[int(value)] = totals.get(int(value), 0) + count
            present[int(value)] = present.get(int(value), 0) + (count > 0)
    all_voxels = sum(totals.values()) or 1
    # the ignore label is no class: its own entry, so the planner never counts it as an output
    classes = {str(v): {"name": dataset.labels.get(v, f"class_{v}"), "voxel_fraction": totals.get(v, 0) / all_voxels,
                        "cases_present": present.get(v, 0)}
               for v in sorted((set(dataset.labels) | set(totals)) - {dataset.ignore_label})}
    ignore = None if dataset.ignore_label is None else {
        "value": dataset.ignore_label, "voxel_fraction": totals.get(dataset.ignore_label, 0) / all_voxels,
        "cases_present": present.get(dataset.ignore_label, 0)}
    return {
        "fingerprint_version": FINGERPRINT_VERSION,
        "key": dataset_key(dataset),
        "dataset": str(dataset.root),
        "num_cases": len(per_case),
        "channel_names": dataset.channel_names,
        "median_spacing_mm": np.median(spacings, axis=0).tolist(),
        "target_spacing_mm": list(target),
        "median_shape": np.median(cropped, axis=0).tolist(),
        "median_shape_at_target": at_target.tolist(),
        "patch_size_hint": suggest_patch_size(at_target, divisor=patch_divisor, max_size=max_patch_size),
        "intensity": intensity,
        "classes": classes,
        "ignore_label": ignore,
        "cases": {c["case_id"]: {k: c[k] for k in ("spacing_mm", "shape", "cropped_shape", "class_voxels", "class_positions")} for c in per_case},
    }


def load_or_compute_fingerprint(dataset: Dataset, path: str | os.PathLike, **kwargs: Any) -> dict[str, Any]:
    """The fingerprint at ``path`` if it was computed from the same files, else compute and write it."""
    path = Path(path)
    if path.is_file():
        try:
            stored = read_json(path)
        except ValueError:
            stored = {}
        if (stored.get("fingerprint_version") == FINGERPRINT_VERSION and stored.get("key") == dataset_key(dataset)
                and (stored.get("ignore_label") or {}).get("value") == dataset.ignore_label):
            return stored
    fingerprint = compute_fingerprint(dataset, **kwargs)
    write_json(path, fingerprint)
    return fingerprint


def dataset_key(dataset: Dataset) -> str:
    """Hex digest over every source file's path, size and modification time."""
    files = []
    for case in dataset.cases:
        for p in (*case.image_paths, case.label_path):
            if p is not None:
                st = Path(p).stat()
                files.append([str(Path(p).resolve()), st.st_size, st.st_mtime_ns])
    return hashlib.sha256(json.dumps(files).encode()).hexdigest()


def suggest_patch_size(shape: Sequence[float], *, divisor: int = 8, max_size: int = 128) -> list[int]:
    """Median case shape rounded up to a multiple of ``divisor`` (the U-Net's total downsampling), capped."""
    cap = max(divisor, max_size // divisor * divisor)
    return [int(min(cap, max(divisor, math.ceil(s / divisor) * divisor))) for s in shape]


# ----------------------------------------------------------------------------------------------


def _case_stats_job(job: tuple) -> dict[str, Any]:
    case, samples, ignore_label = job
    return _case_stats(case, samples, ignore_label)


def _case_stats(case: Case, samples_per_case: int, ignore_label: int | None = None) -> dict[str, Any]:
    image = read_case_image(case)
    label = read_case_label(case)
    annotated = label if ignore_label is None else np.where(label == ignore_label, 0, label)
    # RAS axis order without moving data: permute the spacing and shape like the reorientation would.
    ornt = ornt_transform(io_orientation(image.affine), RAS_ORNT)
    order = np.argsort(ornt[:, 0])  # source axis of each RAS axis
    spacing = np.asarray(image.spacing_mm)[order]
    shape = np.asarray(image.array.shape[:3])[order]
    mask = np.any(image.array != 0, axis=-1) | (label > 0)
    box = bounding_box(mask)
    cropped = shape if box is None else np.array([s.stop - s.start for s in box])[order]
    rng = np.random.default_rng(seed_from_text(case.case_id))
    foreground = np.flatnonzero(annotated.reshape(-1) > 0)  # intensities of annotated foreground only
    if foreground.size > samples_per_case:
        foreground = rng.choice(foreground, samples_per_case, replace=False)
    flat = image.array.reshape(-1, image.array.shape[-1])
    values, counts = np.unique(label, return_counts=True)
    return {
        "case_id": case.case_id,
        "spacing_mm": spacing.tolist(),
        "shape": shape.tolist(),
        "cropped_shape": cropped.tolist(),
        "class_voxels": {int(v): int(n) for v, n in zip(values, counts)},
        "class_positions": class_positions(annotated, ornt),
        "samples": [flat[foreground, c].astype(np.float64).tolist() for c in range(flat.shape[1])],
    }


def class_positions(label: np.ndarray, ornt: np.ndarray) -> dict[int, list[float]]:
    """Each foreground class's centroid as a fraction (0..1) of the foreground's bounding box, per RAS axis.

    ``ornt`` maps the label's axes to RAS (nibabel orientation, as from ``ornt_transform``); a flipped
    axis gives 1 − the fraction, so positions of cases stored in different orientations compare.
    Empty for an all-background label map.

    Examples
    --------
    >>> label = np.zeros((10, 4, 4), np.uint8); label[0:2] = 1; label[8:10] = 2
    >>> class_positions(label, np.array([[0, 1], [1, 1], [2, 1]]))
    {1: [0.1, 0.5, 0.5], 2: [0.9, 0.5, 0.5]}
    """
    box = bounding_box(label > 0)
    if box is None:
        return {}
    crop = label[box]
    values = [int(v) for v in np.unique(crop) if v > 0]
    # the label map as its own weights: constant (= v) inside each class, so each class's centroid is
    # unweighted, without allocating a float64 array of ones the size of the box
    centroids = ndimage.center_of_mass(crop, crop, values)
    order = np.argsort(ornt[:, 0])  # source axis of each RAS axis
    positions = {}
    for value, centroid in zip(values, centroids):
        # voxel centres: a class filling the box sits at 0.5
        fraction = [(centroid[a] + 0.5) / crop.shape[a] for a in range(3)]
        positions[value] = [round(float(fraction[a] if ornt[a, 1] > 0 else 1 - fraction[a]), 4) for a in order]
    return positions


def _intensity_stats(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {k: float("nan") for k in ("mean", "std", "min", "max", "median", "percentile_00_5", "percentile_99_5")}
    p005, p50, p995 = np.percentile(values, [0.5, 50.0, 99.5])
    return {"mean": float(values.mean()), "std": float(values.std()), "min": float(values.min()),
            "max": float(values.max()), "median": float(p50), "percentile_00_5": float(p005),
            "percentile_99_5": float(p995)}
