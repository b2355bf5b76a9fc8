"""Segment raw NIfTI scans: preprocessing, sliding window, back to the scan's own grid, label map.

Per scan (:func:`segment_volume`):

1. :func:`segpipe.data.preprocess.preprocess_volume` with the training preprocessing (reorient to
   RAS, crop to non-zero, normalise, resample to the target spacing);
2. :func:`segpipe.inference.sliding_window.sliding_window_predict` (Gaussian-weighted windows of the patch
   size, mirroring test-time augmentation);
3. :func:`segpipe.data.preprocess.restore_to_original` of the *probabilities* (linear
   interpolation; outside the crop box is background), so resampling never blurs a label map;
4. argmax, then optionally :func:`segpipe.inference.postprocess.keep_largest_component` per class.

Memory, when probabilities are not asked for (:func:`segment_preprocessed`): the sliding window
blends per output slab, and each finished slab is mapped back to the cropped grid row by row
(:func:`labels_from_slabs`: linear along axis 0 from the two nearest rows, then per row and class
in-plane, then argmax), so only a few rows of probabilities exist at a time and the labels are those
of the probability path (to float rounding). No array of every class at full size exists. Peak RSS
per input voxel is measured in tests/test_predict.py and docs/inference.md.

The label map has exactly the scan's shape and affine and dtype uint8. :func:`predict_files` does
this for files or folders using only a bundle (:mod:`segpipe.inference.bundle`); ``predict.py`` is its CLI.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from segpipe.data.labels import regions_to_labels
from segpipe.data.layouts import Case, read_case_image
from segpipe.data.preprocess import PreprocessSettings, preprocess_volume, resample, restore_to_original
from segpipe.errors import Received, expected
from segpipe.inference.bundle import Bundle, read_bundle
from segpipe.inference.outputs import (
    check_output,
    checked_probability_format,
    output_files,
    write_probabilities,
)
from segpipe.inference.postprocess import apply_largest_component_steps
from segpipe.inference.runtimes import load_predictor
from segpipe.inference.settings import InferenceSettings
from segpipe.inference.sliding_window import (
    PredictFn,
    iter_blended_slabs,
    sliding_window_labels,
    sliding_window_predict,
)
from segpipe.io import (
    NIFTI_SUFFIXES,
    remove_orphaned_temporaries,
    strip_nifti_suffix,
    write_nifti,
)

_CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass
class Segmentation:
    """A segmented scan on its own grid: labels (X, Y, Z) uint8, optional probabilities (X, Y, Z, C)."""

    labels: np.ndarray
    probabilities: np.ndarray | None
    affine: np.ndarray


def segment_volume(
    predict_fn: PredictFn,
    image: np.ndarray,
    affine: np.ndarray,
    *,
    preprocessing: PreprocessSettings,
    patch_size: Sequence[int],
    settings: InferenceSettings = InferenceSettings(),
    return_probabilities: bool = False,
    progress: bool = False,
    regions_class_order: Sequence[int] | None = None,
) -> Segmentation:
    """Segment one scan given as arrays: image (X, Y, Z) or (X, Y, Z, Cin) and its affine.

    Parameters
    ----------
    predict_fn
        float32 batch (B, *patch_size, Cin) -> probabilities (B, *patch_size, C);
        e.g. :func:`segpipe.inference.sliding_window.keras_predict_fn` or
        :func:`segpipe.inference.runtimes.load_predictor`.
    image
        the raw scan, in its own orientation and spacing.
    affine
        its voxel-to-world affine.
    preprocessing
        the training preprocessing.
    patch_size
        the sliding window (the training patch size).
    settings
        the one :class:`InferenceSettings`: overlap, mirroring, windows per call, Gaussian σ
        (see :func:`segpipe.inference.sliding_window.sliding_window_predict`) and the label values
        that keep only their largest component.
    return_probabilities
        also return the probabilities on the scan's grid.
    progress
        progress bar over the windows.
    regions_class_order
        for a region network (one sigmoid per region, a region bundle's
        ``regions_class_order``): the label value of each region (see :func:`segment_preprocessed`).

    Returns
    -------
    Segmentation
        A :class:`Segmentation` whose arrays have the scan's spatial shape.
    """
    case = preprocess_volume(image, affine, None, preprocessing)
    return segment_preprocessed(predict_fn, case.image, case.meta, patch_size=patch_size, settings=settings,
                                return_probabilities=return_probabilities, progress=progress,
                                regions_class_order=regions_class_order)


def segment_preprocessed(
    predict_fn: PredictFn,
    image: np.ndarray,
    meta: dict[str, Any],
    *,
    patch_size: Sequence[int],
    settings: InferenceSettings = InferenceSettings(),
    return_probabilities: bool = False,
    progress: bool = False,
    regions_class_order: Sequence[int] | None = None,
) -> Segmentation:
    """Steps 2-4 of :func:`segment_volume` for an image already preprocessed (e.g. a cached training case).

    Parameters
    ----------
    predict_fn
        float32 batch (B, *patch_size, Cin) -> probabilities (B, *patch_size, C).
    image
        the preprocessed image (X, Y, Z, Cin) the network sees.
    meta
        its preprocessing record (``PreprocessedCase.meta`` / the cache's ``meta.json``), which
        maps it back to the original grid.
    patch_size, settings, return_probabilities, progress
        see :func:`segment_volume`.
    regions_class_order
        for a region network (one sigmoid per region): the label value of each
        region; the region probabilities are mapped back (outside the crop box: in no region) and
        turned into labels by :func:`segpipe.data.labels.regions_to_labels` (never the argmax
        paths, which hold only class labels).

    Returns
    -------
    Segmentation
        A :class:`Segmentation` on the original grid, with the original affine.
    """
    window = dict(settings=settings, progress=progress)
    probabilities = None
    if regions_class_order is not None:
        regions = sliding_window_predict(predict_fn, image, patch_size, **window).astype(np.float32, copy=False)
        probabilities = restore_to_original(regions, meta, order=1,
                                            fill_value=np.zeros(regions.shape[-1], np.float32))
        labels = regions_to_labels(probabilities, regions_class_order)
        probabilities = probabilities if return_probabilities else None
    elif return_probabilities:
        probabilities = restore_probabilities(sliding_window_predict(predict_fn, image, patch_size, **window), meta)
        labels = np.argmax(probabilities, axis=-1).astype(np.uint8)
    elif tuple(meta["shape"]) == tuple(meta["cropped_shape"]):  # no resampling: labels slab by slab, exact
        labels = restore_to_original(sliding_window_labels(predict_fn, image, patch_size, **window), meta, order=0)
    else:
        labels = labels_from_slabs(iter_blended_slabs(predict_fn, image, patch_size, **window), meta)
    if settings.postprocess_largest_component or settings.postprocess_largest_foreground:
        labels = apply_largest_component_steps(labels, largest_foreground=settings.postprocess_largest_foreground,
                                               classes=settings.postprocess_largest_component)
    affine = np.asarray(meta["original_affine"], dtype=np.float64)
    return Segmentation(labels, probabilities, affine)


def restore_probabilities(probabilities: np.ndarray, meta: dict[str, Any]) -> np.ndarray:
    """Probabilities (X, Y, Z, C) on the preprocessed grid mapped back onto the original grid.

    :func:`segpipe.data.preprocess.restore_to_original` with linear interpolation: the
    probabilities, not the labels, are resampled, so class borders fall between voxels of the grid
    the network saw; outside the crop box is certain background.
    """
    num_classes = probabilities.shape[-1]
    background = np.eye(num_classes, dtype=np.float32)[0]
    return restore_to_original(probabilities.astype(np.float32, copy=False), meta, order=1, fill_value=background)


def labels_from_slabs(slabs: Iterable[tuple[slice, np.ndarray]], meta: dict[str, Any]) -> np.ndarray:
    """``argmax(restore_probabilities(probabilities, meta))`` from probabilities that arrive slab by slab.

    ``slabs`` are ``(rows, probabilities)`` covering axis 0 of the preprocessed grid in order (as
    :func:`segpipe.inference.sliding_window.iter_blended_slabs` yields them). Linear resampling is separable,
    so each row of the cropped grid is interpolated along axis 0 from its two nearest input rows
    (edge-aligned, edges extended, as :func:`segpipe.data.preprocess.resample`) and then in-plane
    per class with ``resample`` itself; rows no later output row needs are dropped at once.
    Outside the crop box is background; ties go to the lower class, as ``np.argmax``.

    Returns
    -------
    np.ndarray
        The uint8 label map on the original grid.
    """
    n_in, n_out = int(meta["shape"][0]), int(meta["cropped_shape"][0])
    plane = (1, *(int(s) for s in meta["cropped_shape"][1:]))
    coords = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0, n_in - 1.0)
    lower = np.floor(coords).astype(int)
    upper = np.minimum(lower + 1, n_in - 1)
    fraction = coords - lower
    labels = np.zeros(tuple(int(s) for s in meta["cropped_shape"]), dtype=np.uint8)
    rows: dict[int, np.ndarray] = {}
    j = 0
    for block, slab in slabs:
        for k in range(slab.shape[0]):
            rows[block.start + k] = slab[k]
        while j < n_out and upper[j] < block.stop:
            row = (1.0 - fraction[j]) * rows[lower[j]].astype(np.float64) + fraction[j] * rows[upper[j]]
            best = None
            for c in range(row.shape[-1]):
                score = resample(row[None, ..., c].astype(np.float32), plane, order=1)[0]
                if best is None:
                    best = score
                    continue
                wins = score > best
                labels[j][wins] = c
                best = np.where(wins, score, best)
            j += 1
        for i in [i for i in rows if j < n_out and i < lower[j]]:
            del rows[i]
    if j != n_out:
        raise ValueError(expected(f"slabs covering {n_in} rows of the preprocessed grid", key="rows",
                                  received=max(rows, default=-1) + 1))
    return restore_to_original(labels, {**meta, "shape": meta["cropped_shape"]}, order=0)


def segment_case(
    bundle: Bundle, predict_fn: PredictFn, case: Case, *, settings: InferenceSettings | None = None,
    return_probabilities: bool = False, progress: bool = False,
) -> Segmentation:
    """Read a case's image file(s) and segment it with a bundle's preprocessing and settings."""
    volume = read_case_image(case)
    if volume.array.shape[-1] != bundle.input_channels:
        raise ValueError(expected(
            f"{bundle.input_channels} input channel(s) {list(bundle.channel_names)}", key="channels",
            received=volume.array.shape[-1], where=", ".join(str(p) for p in case.image_paths)))
    return segment_volume(
        predict_fn, volume.array, volume.affine, preprocessing=bundle.preprocessing, patch_size=bundle.patch_size,
        settings=settings or bundle.inference, return_probabilities=return_probabilities, progress=progress,
        regions_class_order=bundle.regions_class_order,
    )


MAX_RESAMPLED_VOXELS = 2**30  # a scan resampled to the bundle's spacing: ~10⁹ voxels (1024³) at most


def check_resampled_sizes(cases: Sequence[Case], preprocessing: PreprocessSettings, *,
                          max_voxels: int = MAX_RESAMPLED_VOXELS) -> None:
    """Refuse a scan whose grid at the bundle's target spacing would exceed ``max_voxels``, from headers alone.

    A fine target spacing in a received bundle, or a scan with a huge field of view, would otherwise
    allocate the resampled volume before anything fails.

    Raises
    ------
    ValueError
        Naming the scan, its shape and spacing, and the resampled voxel count.
    """
    import nibabel as nib

    if preprocessing.target_spacing_mm is None:
        return
    target = np.asarray(preprocessing.target_spacing_mm, dtype=np.float64)
    for case in cases:
        header = nib.load(str(case.image_paths[0])).header
        shape = np.asarray(header.get_data_shape()[:3], dtype=np.float64)
        spacing = np.abs(np.asarray(header.get_zooms()[:3], dtype=np.float64))
        # the scan's volume over a target voxel's: independent of the axis order reorientation picks
        voxels = float(np.prod(shape)) * float(np.prod(spacing)) / float(np.prod(target))
        if voxels > max_voxels:
            raise ValueError(expected(
                f"a scan of at most {max_voxels} voxels at the bundle's target spacing {target.tolist()} mm",
                key="--input", where=str(case.image_paths[0]),
                received=Received(f"shape {tuple(int(v) for v in shape)} at {[round(float(z), 4) for z in spacing]} mm "
                                  f"-> about {voxels:.3g} voxels")))


def find_cases(inputs: str | os.PathLike | Sequence[str | os.PathLike], input_channels: int = 1) -> list[Case]:
    """The scans to segment from files and/or folders of NIfTI files.

    Each file is one case named after the file, except that with ``input_channels`` > 1 files named
    ``CASE_0000.nii.gz``, ``CASE_0001.nii.gz``, ... (nnU-Net's convention) form one case ``CASE``
    when exactly channels 0..C-1 are present; a single 4-D file per case works too. With one
    channel, ``CASE_0000.nii.gz`` is also named ``CASE``.
    """
    paths: list[Path] = []
    for item in [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs):
        item = Path(item)
        if item.is_dir():
            paths += sorted(p for p in item.iterdir() if p.name.endswith(NIFTI_SUFFIXES) and not p.name.startswith("."))
        elif item.is_file():
            paths.append(item)
        else:
            raise FileNotFoundError(expected("a NIfTI file or a folder of them", key="input",
                                             received=Received(f"{item} (no such file or folder)")))
    if not paths:
        shown = inputs if isinstance(inputs, (str, os.PathLike)) else ", ".join(str(i) for i in inputs)
        raise FileNotFoundError(expected("NIfTI files (.nii, .nii.gz)", key="input",
                                         received=Received(f"{shown} (has none)")))

    groups: dict[str, dict[int, Path]] = {}
    singles: list[Path] = []
    for path in paths:
        match = _CHANNEL_FILE.match(strip_nifti_suffix(path.name))
        if match:
            groups.setdefault(match["case"], {})[int(match["channel"])] = path
        else:
            singles.append(path)
    cases = [Case(strip_nifti_suffix(p.name), (p,), None) for p in singles]
    for case_id, channels in groups.items():
        if sorted(channels) == list(range(input_channels)):
            cases.append(Case(case_id, tuple(channels[c] for c in range(input_channels)), None))
        else:  # not a channel set after all (e.g. "scan_2024.nii.gz"): one case per file
            cases += [Case(strip_nifti_suffix(p.name), (p,), None) for p in channels.values()]
    ids = [c.case_id for c in cases]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ValueError(expected("one input file per case name (not x.nii and x.nii.gz)", key="input",
                                  received=Received(f"several files for {duplicates}")))
    return sorted(cases, key=lambda c: c.case_id)


def predict_files(
    bundle: Bundle | str | os.PathLike,
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    *,
    format: str = "keras",
    overlap: float | None = None,
    mirror_axes: Sequence[int] | None = None,
    batch_size: int | None = None,
    postprocess_largest_component: Sequence[int] | None = None,
    save_probabilities: bool | str = False,
    probabilities_dtype: str = "float16",
    progress: bool = True,
    trust_bundle: bool = False,
    overwrite: bool = False,
) -> list[Path]:
    """Segment NIfTI files with a bundle; write ``OUTPUT/CASE.nii.gz`` (and the probabilities).

    Parameters
    ----------
    bundle
        a bundle folder or a :class:`segpipe.inference.bundle.Bundle`.
    inputs
        a NIfTI file, a folder of them, or a list of either (see :func:`find_cases`).
    output_dir
        where label maps go; must not be a folder holding an input scan or a dataset's
        reference label maps (:func:`segpipe.inference.outputs.check_output`).
    format
        a runtime (``"keras"``, ``"savedmodel"``, ``"onnx"``, ``"openvino"``,
        ``"openvino-bf16"``) or ``"auto"``, the fastest that the bundle holds and this machine
        has (see :mod:`segpipe.inference.runtimes`).
    overlap, mirror_axes, batch_size, postprocess_largest_component
        override the bundle's
        inference settings (``None`` keeps them).
    save_probabilities
        also write the per-class probabilities (X, Y, Z, C) on the scan's grid
        (an ensemble's: the members' average; a region bundle's: one channel per region), as ``"nifti"``
        (or True): ``CASE_probabilities.nii.gz``, or ``"npz"``: ``CASE_probabilities.npz``
        (:func:`segpipe.inference.outputs.write_probabilities`).
    probabilities_dtype
        ``"float16"`` (half the size; ~1e-3 resolution) or ``"float32"``.
    progress
        progress bars over cases and windows.
    trust_bundle
        allow a format that can run code (``savedmodel``); only for a bundle from a
        source you trust (docs/deployment.md, "Trust").
    overwrite
        replace label maps (and probabilities) that exist already; without it they are refused.

    Returns
    -------
    list[Path]
        The label map files written, in case order.

    Raises
    ------
    FileExistsError
        an output file exists and ``overwrite`` is off (checked before any scan is
        segmented, so nothing is written).
    ValueError
        the output folder holds an input scan or reference label maps (even with ``overwrite``).
    """
    from tqdm import tqdm

    probabilities_format = checked_probability_format(save_probabilities, probabilities_dtype)
    bundle = bundle if isinstance(bundle, Bundle) else read_bundle(bundle)
    cases = find_cases(inputs, bundle.input_channels)
    output_dir = Path(output_dir)
    check_output(cases, output_dir, overwrite=overwrite, save_probabilities=probabilities_format)
    settings = bundle.inference.replace(overlap=overlap, mirror_axes=mirror_axes, batch_size=batch_size,
                                        postprocess_largest_component=postprocess_largest_component,
                                        # an explicit list replaces the bundle's post-processing as a whole
                                        postprocess_largest_foreground=None if postprocess_largest_component is None
                                        else False)
    settings.check_classes(bundle.num_classes)
    check_resampled_sizes(cases, bundle.preprocessing)
    predict_fn = load_predictor(bundle, format, trust_bundle=trust_bundle)

    remove_orphaned_temporaries(output_dir)  # of an earlier run killed while writing a label map
    written = []
    for case in tqdm(cases, desc="Segmenting", unit="scan", disable=not progress):
        result = segment_case(bundle, predict_fn, case, settings=settings,
                              return_probabilities=probabilities_format is not None, progress=progress)
        path, *probability_path = output_files(case, output_dir, save_probabilities=probabilities_format)
        write_nifti(path, result.labels, result.affine)
        if probability_path:
            write_probabilities(probability_path[0], result.probabilities, result.affine,
                                class_names=bundle.output_names, dtype=probabilities_dtype)
        written.append(path)
    return written
