"""Spatial primitives of patch sampling and augmentation: cutting a patch out of a (memory-mapped)
volume, and resampling a volume at arbitrary voxel coordinates."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage


def extract_patch(array: np.ndarray, lower: Sequence[int], size: Sequence[int], *, fill: float = 0) -> np.ndarray:
    """Copy ``array[lower : lower + size]`` over the first three axes, padding outside with ``fill``.

    Only the overlapping part is read, which keeps memory-mapped volumes cheap.
    """
    lower, size = np.asarray(lower, int), np.asarray(size, int)
    out = np.full(tuple(size) + array.shape[3:], fill, dtype=array.dtype)
    src_lo = np.maximum(lower, 0)
    src_hi = np.minimum(lower + size, array.shape[:3])
    if np.any(src_hi <= src_lo):
        return out
    dst_lo = src_lo - lower
    dst = tuple(slice(a, a + n) for a, n in zip(dst_lo, src_hi - src_lo))
    out[dst] = array[tuple(slice(a, b) for a, b in zip(src_lo, src_hi))]
    return out


def warp(
    image: np.ndarray, label: np.ndarray | None, coords: np.ndarray, *, order: int, fill: float = 0.0
) -> tuple[np.ndarray, np.ndarray | None]:
    """Sample ``image`` (X, Y, Z, C) and ``label`` (X, Y, Z) at ``coords`` (3, ...) voxel positions.

    Only the bounding box of ``coords`` (plus a spline margin) is read, so ``image`` and ``label``
    may be memory-mapped volumes; positions outside the volume get ``fill`` (image) and 0 (label).
    The image is interpolated with spline ``order``, the label with nearest neighbour.
    """
    margin = order + 1
    lo = np.floor(coords.reshape(3, -1).min(axis=1)).astype(int) - margin
    hi = np.ceil(coords.reshape(3, -1).max(axis=1)).astype(int) + margin + 1
    local = coords - lo.reshape(3, 1, 1, 1).astype(coords.dtype)
    region = extract_patch(image, lo, hi - lo, fill=fill)
    out_image = np.empty(coords.shape[1:] + image.shape[3:], dtype=np.float32)
    for c in range(image.shape[3]):
        out_image[..., c] = ndimage.map_coordinates(
            region[..., c].astype(np.float32, copy=False), local, order=order, mode="nearest", prefilter=order > 1)
    out_label = None
    if label is not None:
        region_label = extract_patch(label, lo, hi - lo, fill=0)
        out_label = ndimage.map_coordinates(region_label, local, order=0, mode="nearest", output=region_label.dtype)
    return out_image, out_label
