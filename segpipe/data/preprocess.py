"""Preprocessing of one case, and its exact inverse.

The forward steps, in order (nnU-Net's order: normalise before resampling):

1. reorient to RAS (nibabel's closest canonical axes: a transpose and flips, no interpolation);
2. crop to the bounding box of non-zero image voxels and labelled voxels (optional);
3. normalise each channel (``zscore``, ``zscore_nonzero``, ``ct`` or ``none``);
4. resample to the target spacing: images with spline interpolation (``image_order``), labels with
   nearest neighbour or one-hot linear interpolation.

Resampling maps voxel *edges* onto voxel edges (as ``skimage.transform.resize`` and
``scipy.ndimage.zoom(grid_mode=True)`` do): the new shape is ``round(shape * spacing / target)``
and the effective spacing, recorded in ``meta["spacing_mm"]``, is ``spacing * shape / new_shape``.
The same rule run backwards is the exact inverse, so :func:`restore_to_original` puts an upsampled
label map back onto the original grid voxel for voxel.

Everything the inverse needs is in the returned ``meta`` dict (JSON-ready): original shape, affine,
spacing and orientation, the RAS shape, the crop box, the target and effective spacing.
"""
from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
from nibabel.orientations import (
    aff2axcodes,
    apply_orientation,
    axcodes2ornt,
    inv_ornt_aff,
    io_orientation,
    ornt_transform,
)
from scipy import ndimage

from segpipe.arrays import bounding_box
from segpipe.errors import Received, SettingError, expected
from segpipe.io import affine_problem
from segpipe.data.layouts import Case, read_case_image, read_case_label
from segpipe.settings import Settings

NORMALIZATIONS = ("zscore", "zscore_nonzero", "ct", "none")
LABEL_INTERPOLATIONS = ("nearest", "onehot_linear")
ORIENTATION = "RAS"  # the orientation preprocessing produces (and bundles expect)
RAS_ORNT = axcodes2ornt(tuple(ORIENTATION))


def check_normalization(value: str | Sequence[str], *, key: str = "normalization") -> str | tuple[str, ...]:
    """One normalisation scheme, or a non-empty list with one per channel; returned as a str or a tuple.

    The one check of ``normalization`` (the config's ``data.normalization`` and
    :class:`PreprocessSettings` both call it).

    Raises
    ------
    SettingError
        An unknown scheme (naming ``key`` or ``key[i]`` and the closest scheme), or an empty list.

    Examples
    --------
    >>> check_normalization(["zscore", "ct"])
    ('zscore', 'ct')
    >>> check_normalization("zscor")
    Traceback (most recent call last):
    ...
    segpipe.errors.SettingError: Expected one of ['zscore', 'zscore_nonzero', 'ct', 'none']. \
Received: normalization='zscor'. Did you mean 'zscore'?
    """
    single = isinstance(value, str)
    schemes = [value] if single else list(value)
    if not schemes:
        raise SettingError(key, "a scheme or a list with one per channel", value)
    for i, scheme in enumerate(schemes):
        if scheme not in NORMALIZATIONS:
            close = difflib.get_close_matches(scheme, NORMALIZATIONS, n=1) if isinstance(scheme, str) else []
            raise SettingError(key if single else f"{key}[{i}]", f"one of {list(NORMALIZATIONS)}", scheme,
                               hint=f"Did you mean {close[0]!r}?" if close else None)
    return value if single else tuple(schemes)


@dataclass(frozen=True)
class PreprocessSettings(Settings):
    """Every setting that changes the preprocessed arrays (and therefore the cache key).

    Read from a file with ``PreprocessSettings.from_dict(data, where=path, prefix="preprocessing.")``
    (:mod:`segpipe.settings`): unknown keys, types and the checks below name the file and the key.

    Attributes
    ----------
    target_spacing_mm
        voxel size after resampling, in RAS axis order. ``None`` keeps each
        case's own spacing (no resampling). The config default is the fingerprint's median.
    normalization
        one scheme for all channels or one per channel: ``"zscore"`` (per case,
        all voxels; the default, right for MRI), ``"zscore_nonzero"`` (statistics over non-zero
        voxels, zero outside; skull-stripped MRI), ``"ct"`` (clip to the dataset's foreground
        0.5/99.5 percentiles, z-score with the dataset's foreground mean/std; needs
        ``intensity_stats``), ``"none"``.
    crop_to_nonzero
        crop to the bounding box of non-zero image voxels (and labelled voxels).
    image_order
        spline order for image resampling (3 cubic, 1 linear). Defaults to 3.
    label_interpolation
        ``"onehot_linear"`` (each class linearly, then argmax; smoother, the
        nnU-Net default) or ``"nearest"``.
    intensity_stats
        per channel ``{"mean", "std", "percentile_00_5", "percentile_99_5"}`` of
        foreground voxels over the dataset (the fingerprint's ``intensity`` entries); ``ct`` only.
    """

    SECTION = "preprocessing settings"  # names them in an unknown key's message when read without a key path

    target_spacing_mm: tuple[float, float, float] | None = None
    normalization: str | tuple[str, ...] = "zscore"
    crop_to_nonzero: bool = True
    image_order: int = 3
    label_interpolation: str = "onehot_linear"
    intensity_stats: tuple[dict[str, float], ...] | None = None

    def __post_init__(self) -> None:
        normalization = check_normalization(self.normalization)
        schemes = (normalization,) if isinstance(normalization, str) else normalization
        if "ct" in schemes and not self.intensity_stats:
            raise SettingError("intensity_stats", "dataset statistics (from the fingerprint) for normalization='ct'",
                               self.intensity_stats)
        if self.label_interpolation not in LABEL_INTERPOLATIONS:
            raise SettingError("label_interpolation", f"one of {LABEL_INTERPOLATIONS}", self.label_interpolation)
        if self.image_order not in range(6):
            raise SettingError("image_order", "an integer in 0..5", self.image_order)
        if self.target_spacing_mm is not None:
            try:
                spacing = tuple(float(s) for s in self.target_spacing_mm)
            except (TypeError, ValueError):
                spacing = ()
            if len(spacing) != 3 or min(spacing) <= 0:
                raise SettingError("target_spacing_mm", "3 positive numbers", self.target_spacing_mm)
            object.__setattr__(self, "target_spacing_mm", spacing)
        object.__setattr__(self, "normalization", normalization)
        if self.intensity_stats is not None:
            object.__setattr__(self, "intensity_stats", tuple(dict(s) for s in self.intensity_stats))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings (the part of the cache key that comes from the config)."""
        return asdict(self)


@dataclass
class PreprocessedCase:
    """A preprocessed case: image (X, Y, Z, C) float32, label (X, Y, Z) uint8 or ``None``, and meta."""

    image: np.ndarray
    label: np.ndarray | None
    meta: dict[str, Any]


def preprocess_case(case: Case, settings: PreprocessSettings | None = None, **kwargs: Any) -> PreprocessedCase:
    """Read a case from disk and preprocess it.

    Settings are given as a :class:`PreprocessSettings` or as its fields as keyword arguments
    (``preprocess_case(case, target_spacing_mm=(1, 1, 1), normalization="zscore")``).
    """
    settings = _settings(settings, kwargs)
    image = read_case_image(case)
    label = read_case_label(case) if case.label_path is not None else None
    result = preprocess_volume(image.array, image.affine, label, settings, where=str(case.image_paths[0]))
    result.meta["case_id"] = case.case_id
    return result


def preprocess_volume(
    image: np.ndarray,
    affine: np.ndarray,
    label: np.ndarray | None = None,
    settings: PreprocessSettings | None = None,
    *,
    where: str | None = None,
    **kwargs: Any,
) -> PreprocessedCase:
    """Preprocess arrays already in memory: image (X, Y, Z) or (X, Y, Z, C), optional label (X, Y, Z).

    This is what inference runs on a new image (without label) before prediction. ``where`` (the
    image file) is named by the errors: an empty axis, NaN/inf intensities, a singular affine.
    """
    settings = _settings(settings, kwargs)
    image, label = _checked_arrays(image, label, where)
    affine = np.asarray(affine, dtype=np.float64)
    problem = affine_problem(affine)
    if problem is not None:  # reorientation and resampling need voxel sizes > 0
        raise ValueError(expected("an invertible affine with finite entries (every voxel size > 0)", key="affine",
                                  received=Received(problem), where=where))
    original_shape = image.shape[:3]

    # 1. Reorient to RAS: only axis permutations and flips, so no voxel value changes.
    ornt = ornt_transform(io_orientation(affine), RAS_ORNT)
    image = apply_orientation(image, ornt)
    label = apply_orientation(label, ornt) if label is not None else None
    ras_affine = affine @ inv_ornt_aff(ornt, original_shape)
    ras_shape = image.shape[:3]

    # 2. Crop to the non-zero bounding box (labelled voxels always kept).
    nonzero = np.any(image != 0, axis=-1)
    crop = bounding_box(nonzero | (label > 0) if label is not None else nonzero)
    if not settings.crop_to_nonzero or crop is None:
        crop = tuple(slice(0, n) for n in ras_shape)
    image, nonzero = image[crop], nonzero[crop]
    label = label[crop] if label is not None else None
    cropped_affine = ras_affine.copy()
    cropped_affine[:3, 3] = ras_affine[:3, :3] @ [s.start for s in crop] + ras_affine[:3, 3]
    cropped_shape = image.shape[:3]

    # 3. Normalise each channel.
    image, norm_meta = _normalize(image, nonzero, settings)

    # 4. Resample to the target spacing.
    spacing = np.linalg.norm(cropped_affine[:3, :3], axis=0)
    shape = target_shape(cropped_shape, spacing, settings.target_spacing_mm)
    if shape != cropped_shape:
        image = resample(image, shape, order=settings.image_order)
        if label is not None:
            label = (resample(label, shape, order=0) if settings.label_interpolation == "nearest"
                     else resample_labels_onehot(label, shape))
    factors = np.asarray(cropped_shape, float) / np.asarray(shape, float)

    meta = {
        "original_shape": list(original_shape),
        "original_affine": affine.tolist(),
        "original_spacing_mm": np.linalg.norm(affine[:3, :3], axis=0).tolist(),
        "original_orientation": "".join(aff2axcodes(affine)),
        "ras_shape": list(ras_shape),
        "crop_box": [[int(s.start), int(s.stop)] for s in crop],
        "cropped_shape": list(cropped_shape),
        "target_spacing_mm": list(settings.target_spacing_mm) if settings.target_spacing_mm else None,
        "shape": list(shape),
        "spacing_mm": (spacing * factors).tolist(),
        "affine": (cropped_affine @ _grid_map(factors)).tolist(),
        "channels": int(image.shape[-1]),
        "normalization": norm_meta,
    }
    image = np.ascontiguousarray(image, dtype=np.float32)
    if label is not None:
        label = np.ascontiguousarray(label, dtype=np.uint8)
    return PreprocessedCase(image=image, label=label, meta=meta)


def _checked_arrays(image: np.ndarray, label: np.ndarray | None,
                    where: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """The image as float32 (X, Y, Z, C) and the label, or a ValueError naming what is wrong (and ``where``)."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 3:
        image = image[..., None]
    if image.ndim != 4:
        raise ValueError(expected("an image of shape (X, Y, Z) or (X, Y, Z, C)", key="image.shape", received=image.shape,
                                  where=where))
    if image.size == 0:
        raise ValueError(expected("an image with at least 1 voxel along every axis", key="image.shape",
                                  received=image.shape, where=where))
    finite = np.isfinite(image)
    if not finite.all():
        raise ValueError(expected("finite intensities", key="image",
                                  received=Received(f"{image.size - int(finite.sum())} NaN/inf voxel(s)"), where=where))
    if label is not None and label.shape != image.shape[:3]:
        raise ValueError(expected(f"a label of the image's shape {image.shape[:3]}", key="label.shape", received=label.shape))
    if label is not None and label.size and (label.min() < 0 or label.max() > 255):
        raise ValueError(expected("label values in 0..255 (stored as uint8)", key="label",
                                  received=Received(f"values {label.min()}..{label.max()}")))
    return image, label


def restore_to_original(
    array: np.ndarray, meta: dict[str, Any], *, order: int, fill_value: float | Sequence[float] = 0.0
) -> np.ndarray:
    """Map an array on the preprocessed grid back onto the original image grid.

    The inverse of :func:`preprocess_volume`: resample back to the cropped shape, pad the crop box
    with ``fill_value``, undo the reorientation. With ``order=0`` a label map that went through a
    nearest-neighbour upsampling (or no resampling) comes back exactly; downsampling loses what it
    loses.

    Parameters
    ----------
    array
        (X, Y, Z) label map or (X, Y, Z, C) probabilities on the preprocessed grid
        (``meta["shape"]``).
    meta
        the case's preprocessing meta.
    order
        0 (nearest) for label maps, 1 (linear) for probabilities.
    fill_value
        value outside the crop box; one per channel for (X, Y, Z, C) arrays, e.g.
        ``[1, 0, 0]`` for probabilities (outside the non-zero box is background).

    Returns
    -------
    np.ndarray
        The array with shape ``meta["original_shape"]`` (+ channels), dtype kept.
    """
    array = np.asarray(array)
    if tuple(array.shape[:3]) != tuple(meta["shape"]) or array.ndim not in (3, 4):
        raise ValueError(expected(f"an array of shape {tuple(meta['shape'])} (+ channels), the preprocessed grid",
                                  key="array.shape", received=array.shape))
    array = resample(array, tuple(meta["cropped_shape"]), order=order)
    out = np.empty(tuple(meta["ras_shape"]) + array.shape[3:], dtype=array.dtype)
    out[...] = np.asarray(fill_value, dtype=array.dtype) if array.ndim == 4 else fill_value
    out[tuple(slice(lo, hi) for lo, hi in meta["crop_box"])] = array
    original_affine = np.asarray(meta["original_affine"], dtype=np.float64)
    back = ornt_transform(RAS_ORNT, io_orientation(original_affine))
    return np.ascontiguousarray(apply_orientation(out, back))


def target_shape(
    shape: Sequence[int], spacing_mm: Sequence[float], target_spacing_mm: Sequence[float] | None
) -> tuple[int, int, int]:
    """Shape after resampling: ``round(shape * spacing / target)``, at least 1; unchanged without target."""
    if target_spacing_mm is None:
        return tuple(int(s) for s in shape)
    new = np.round(np.asarray(shape) * np.asarray(spacing_mm) / np.asarray(target_spacing_mm, float))
    return tuple(int(max(1, n)) for n in new)


def resample(array: np.ndarray, shape: Sequence[int], *, order: int) -> np.ndarray:
    """Resample the first three axes of ``array`` to ``shape``, mapping voxel edges onto voxel edges.

    Output voxel ``j`` samples input coordinate ``(j + 0.5) * n_in / n_out - 0.5``; trailing axes
    (channels) are resampled one by one. The dtype is kept (labels with ``order=0`` stay labels).
    """
    shape = tuple(int(s) for s in shape)
    if tuple(array.shape[:3]) == shape:
        return array
    factors = np.asarray(array.shape[:3], float) / np.asarray(shape, float)
    if array.ndim > 3:
        out = np.empty(shape + array.shape[3:], dtype=array.dtype)
        for index in np.ndindex(*array.shape[3:]):
            out[(...,) + index] = resample(array[(...,) + index], shape, order=order)
        return out
    # mode="nearest": edge voxels extend half a voxel outwards, so upsampled borders copy them.
    return ndimage.affine_transform(
        array, factors, offset=0.5 * factors - 0.5, output_shape=shape, order=order, mode="nearest",
        prefilter=order > 1,
    )


def resample_labels_onehot(label: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Resample a label map by interpolating each class's mask linearly and taking the argmax."""
    best = np.full(tuple(shape), -1.0, dtype=np.float32)
    out = np.zeros(tuple(shape), dtype=label.dtype)
    for value in np.unique(label):  # absent classes cannot win; skip them
        score = resample((label == value).astype(np.float32), shape, order=1)
        wins = score > best
        out[wins], best[wins] = value, score[wins]
    return out


# ----------------------------------------------------------------------------------------------


def _settings(settings: PreprocessSettings | None, kwargs: dict[str, Any]) -> PreprocessSettings:
    if settings is not None and kwargs:
        raise TypeError(expected("either `settings` or keyword settings, not both", key="settings",
                                 received=Received(f"settings and {sorted(kwargs)}")))
    return settings if settings is not None else PreprocessSettings(**kwargs)


def _grid_map(factors: np.ndarray) -> np.ndarray:
    """Voxel-to-voxel affine of :func:`resample`: new index ``j`` -> old index ``(j + 0.5) f - 0.5``."""
    m = np.eye(4)
    m[:3, :3] = np.diag(factors)
    m[:3, 3] = 0.5 * factors - 0.5
    return m


def _normalize(image: np.ndarray, nonzero: np.ndarray, settings: PreprocessSettings) -> tuple[np.ndarray, list[dict]]:
    channels = image.shape[-1]
    schemes = settings.normalization
    if isinstance(schemes, str):
        schemes = (schemes,) * channels
    if len(schemes) != channels:
        raise ValueError(expected(f"one normalization per channel ({channels})", key="normalization", received=list(schemes)))
    out = np.empty(image.shape, dtype=np.float32)
    record = []
    for c, scheme in enumerate(schemes):
        x = image[..., c].astype(np.float32)
        entry: dict[str, Any] = {"scheme": scheme}
        if scheme == "zscore":
            mean, std = float(x.mean()), float(x.std())
            x = (x - mean) / max(std, 1e-8)
        elif scheme == "zscore_nonzero":
            values = x[nonzero]
            mean = float(values.mean()) if values.size else 0.0
            std = float(values.std()) if values.size else 1.0
            x = np.where(nonzero, (x - mean) / max(std, 1e-8), 0.0)
        elif scheme == "ct":
            stats = settings.intensity_stats[c] if len(settings.intensity_stats) > c else None
            if stats is None:
                raise ValueError(expected(f"statistics for channel {c} (normalization='ct')", key="intensity_stats",
                                          received=Received(f"{len(settings.intensity_stats)} channel(s) of stats")))
            lo, hi = stats["percentile_00_5"], stats["percentile_99_5"]
            mean, std = float(stats["mean"]), float(stats["std"])
            x = (np.clip(x, lo, hi) - mean) / max(std, 1e-8)
            entry.update(clip=[lo, hi])
        else:
            mean, std = 0.0, 1.0
        entry.update(mean=mean, std=std)
        out[..., c] = x
        record.append(entry)
    return out, record
