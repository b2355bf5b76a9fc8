"""Metrics on label maps with an ignore label or regions (nnU-Net v2's conventions, :mod:`segpipe.data.labels`).

* Ignored voxels (the reference holds the ignore label) count nowhere: :func:`mask_ignored` sets
  them to background in both maps, so they are no TP, FP or FN of any class or region (as nnU-Net's
  evaluation, which scores only where the reference is not the ignore label). Surface distances are
  then measured on the masked maps.
* A region is scored on its binary maps: a voxel is in region r where its label is one of the
  region's values, in the prediction and in the reference (:func:`region_case_metrics`); lesion-wise
  metrics work per region the same way (:func:`region_lesion_metrics`, BraTS 2023's scoring).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

import numpy as np

from segpipe.metrics.lesions import case_lesion_metrics
from segpipe.metrics.overlap import case_metrics

__all__ = ["mask_ignored", "region_mask", "region_case_metrics", "region_lesion_metrics", "Region"]


class Region(Protocol):
    """What a region is to the metrics: a name and its label values (:class:`segpipe.data.labels.Region`;
    metrics sit below the data layer, so they take any object with these two attributes)."""

    name: str
    values: tuple[int, ...]


def mask_ignored(pred: np.ndarray, ref: np.ndarray, ignore_label: int | None) -> tuple[np.ndarray, np.ndarray]:
    """``(pred, ref)`` with background (0) in both wherever ``ref`` holds ``ignore_label``.

    Examples
    --------
    >>> p, r = mask_ignored(np.array([1, 1, 2]), np.array([1, 3, 2]), 3)
    >>> p.tolist(), r.tolist()
    ([1, 0, 2], [1, 0, 2])
    """
    if ignore_label is None:
        return pred, ref
    ignored = np.asarray(ref) == ignore_label
    return (np.where(ignored, 0, pred).astype(np.asarray(pred).dtype),
            np.where(ignored, 0, ref).astype(np.asarray(ref).dtype))


def region_mask(labels: np.ndarray, region: Region) -> np.ndarray:
    """The uint8 mask (1 inside) of ``region`` in a label map."""
    return np.isin(labels, region.values).astype(np.uint8)


def region_case_metrics(pred: np.ndarray, ref: np.ndarray, regions: Iterable[Region], *,
                        spacing_mm=(1.0, 1.0, 1.0), tolerance_mm: float | Mapping[str, float] = 1.0
                        ) -> dict[str, dict[str, Any]]:
    """Every metric of :func:`segpipe.metrics.case_metrics` per region, keyed by region name.

    ``tolerance_mm``: the NSD tolerance, one for all regions or per region name.

    Examples
    --------
    >>> from segpipe.data.labels import Region
    >>> regions = [Region("whole", (1, 2)), Region("core", (2,))]
    >>> m = region_case_metrics(np.array([[[0, 1, 2, 2]]]), np.array([[[1, 1, 2, 0]]]), regions)
    >>> round(m["whole"]["dice"], 4), round(m["core"]["dice"], 4)
    (0.6667, 0.6667)
    """
    out = {}
    for region in regions:
        tol = tolerance_mm.get(region.name, 1.0) if isinstance(tolerance_mm, Mapping) else tolerance_mm
        out[region.name] = case_metrics(region_mask(pred, region), region_mask(ref, region), labels=[1],
                                        spacing_mm=spacing_mm, tolerance_mm=tol)[1]
    return out


def region_lesion_metrics(pred: np.ndarray, ref: np.ndarray, regions: Iterable[Region], *,
                          spacing_mm=(1.0, 1.0, 1.0), min_size_mm3: float = 0.0, dilation_vox: int = 0
                          ) -> dict[str, dict[str, Any]]:
    """Lesion-wise metrics (:func:`segpipe.metrics.lesions.case_lesion_metrics`) per region name."""
    return {region.name: case_lesion_metrics(region_mask(pred, region), region_mask(ref, region), labels=[1],
                                             spacing_mm=spacing_mm, min_size_mm3=min_size_mm3,
                                             dilation_vox=dilation_vox)[1]
            for region in regions}
