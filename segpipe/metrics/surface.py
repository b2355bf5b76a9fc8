"""Surface distances between two binary masks, and the metrics reduced from them.

One expensive primitive, :func:`surface_distances`, computes the directed distances (in mm) from
every surface voxel of one mask to the nearest surface voxel of the other, in both directions.
Cheap reducers turn them into the Hausdorff distance, its 95th-percentile variant, the average
symmetric surface distance and the normalised surface Dice, each with an explicit rule for empty
masks:

=====================  ============  =================  ==========
masks                  hd/hd95/assd  nsd                source
=====================  ============  =================  ==========
both empty             0.0           1.0                nothing to find, nothing found
exactly one empty      NaN           0.0                no surface to measure against
both non-empty         distance      fraction in [0,1]
=====================  ============  =================  ==========

Definitions (all distances Euclidean, in mm, using the voxel spacing):

- surface of a mask: its voxels with at least one 6-neighbour outside the mask; the image border
  counts as outside, so a non-empty mask always has a surface;
- ``hd``: the largest directed distance over both directions;
- ``hd95``: the larger of the two directed 95th percentiles (NumPy's default, linearly
  interpolated percentile), as MONAI, MetricsReloaded and DeepMind's surface-distance do; MedPy and
  seg-metrics instead take the percentile of both directions pooled, which is never larger;
- ``assd``: the mean of all directed distances of both directions pooled together, so each
  surface voxel weighs the same (MedPy averages the two directed means instead);
- ``nsd``: (surface voxels of pred within ``tolerance_mm`` of ref's surface + surface voxels of
  ref within ``tolerance_mm`` of pred's surface) / (surface voxels of both); voxel-counted, not
  surfel-area-weighted as in DeepMind's implementation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage, spatial

from segpipe.arrays import bounding_box
from segpipe.errors import Received, expected

__all__ = [
    "SurfaceDistances",
    "surface_voxels",
    "surface_distances",
    "hausdorff_distance",
    "percentile_hausdorff_distance",
    "average_symmetric_surface_distance",
    "normalized_surface_dice",
    "surface_metrics",
]

# "auto" uses the distance transform while the box has at most this many voxels per surface voxel
# (both surfaces counted). Measured crossover on spheres: ~6 (r = 8 voxels); at r = 50 the tree is
# 3.4x faster, at r = 80 4.6x.
_EDT_BOX_VOXELS_PER_SURFACE_VOXEL = 6


@dataclass(frozen=True)
class SurfaceDistances:
    """Directed surface distances between a predicted and a reference mask, in mm.

    Attributes
    ----------
    pred_to_ref_mm : np.ndarray
        1-D float array: for each surface voxel of the prediction, the distance to the nearest
        surface voxel of the reference. Empty if the prediction is empty.
    ref_to_pred_mm : np.ndarray
        1-D float array: for each surface voxel of the reference, the distance to the nearest
        surface voxel of the prediction. Empty if the reference is empty.
    pred_surface_size : int
        Number of surface voxels of the prediction (also set when the reference is empty and no
        distance exists).
    ref_surface_size : int
        Number of surface voxels of the reference.
    """

    pred_to_ref_mm: np.ndarray
    ref_to_pred_mm: np.ndarray
    pred_surface_size: int
    ref_surface_size: int

    @property
    def pred_empty(self) -> bool:
        return self.pred_surface_size == 0

    @property
    def ref_empty(self) -> bool:
        return self.ref_surface_size == 0

    @classmethod
    def empty(cls, *, pred_surface_size: int = 0, ref_surface_size: int = 0) -> SurfaceDistances:
        """Distances for a pair with at least one empty mask (no distance can be measured)."""
        none = np.zeros(0, dtype=np.float64)
        return cls(none, none, int(pred_surface_size), int(ref_surface_size))


def surface_voxels(mask: np.ndarray) -> np.ndarray:
    """Boolean map of the surface of a binary mask.

    A voxel is on the surface if it is in the mask and at least one of its 6 face neighbours is
    not; voxels on the image border count as having a neighbour outside.

    Parameters
    ----------
    mask : np.ndarray
        Boolean array (any number of dimensions; 3-D for volumes).

    Returns
    -------
    surface : np.ndarray
        Boolean array of the same shape.

    Examples
    --------
    >>> mask = np.zeros((5, 5, 5), bool); mask[1:4, 1:4, 1:4] = True
    >>> int(surface_voxels(mask).sum())  # 27 voxels, only the centre one is interior
    26
    """
    mask = _as_bool(mask, "mask")
    # Connectivity 1: face neighbours only (6 in 3-D). border_value=0: beyond the array is outside.
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def surface_distances(
    pred: np.ndarray,
    ref: np.ndarray,
    *,
    spacing_mm: Sequence[float] = (1.0, 1.0, 1.0),
    method: str = "auto",
) -> SurfaceDistances:
    """Directed distances between the surfaces of two binary masks, in mm.

    Only the bounding box of the union of both masks (plus one voxel) is processed: every surface
    voxel lies inside it, and Euclidean distances between points inside the box do not depend on
    what lies outside, so the crop is exact and much cheaper than the full volume.

    Two exact ways to find the nearest surface voxel are available. ``"edt"`` runs
    ``scipy.ndimage.distance_transform_edt(~surface, sampling=spacing_mm)`` over the box and reads
    it at the other surface; its cost grows with the box volume. ``"kdtree"`` queries a
    ``scipy.spatial.KDTree`` of one surface's voxel centres (in mm) with the other's; its cost
    grows with the number of surface voxels. ``"auto"`` picks the cheaper one: the EDT for compact
    structures, the tree for large organs (volume grows faster than surface) and for masks spread
    over the image by scattered false positives (the box becomes the whole image).

    Parameters
    ----------
    pred, ref : np.ndarray
        Boolean masks of the same shape (the prediction and the reference).
    spacing_mm : sequence of float, optional
        Voxel size along each array axis in mm. Defaults to 1 mm isotropic.
    method : {"auto", "edt", "kdtree"}, optional
        How to find nearest surface voxels; all give the same distances (up to rounding).
        Defaults to ``"auto"``.

    Returns
    -------
    distances : SurfaceDistances
        The directed distances in both directions, in the C order of the surface voxels, and the
        surface sizes. When either mask is empty, both distance arrays are empty.

    Examples
    --------
    >>> ref = np.zeros((10, 10, 10), bool); ref[2:6, 2:6, 2:6] = True
    >>> pred = np.roll(ref, 2, axis=0)
    >>> float(surface_distances(pred, ref, spacing_mm=(0.5, 1.0, 1.0)).pred_to_ref_mm.max())
    1.0
    """
    pred = _as_bool(pred, "pred")
    ref = _as_bool(ref, "ref")
    if pred.shape != ref.shape:
        raise ValueError(expected(f"pred of the same shape as ref {ref.shape}", key="pred.shape", received=pred.shape))
    spacing_mm = _check_spacing(spacing_mm, pred.ndim)
    if method not in ("auto", "edt", "kdtree"):
        raise ValueError(expected("one of ['auto', 'edt', 'kdtree']", key="method", received=method))
    box = bounding_box(pred | ref, margin=1)
    if box is None:
        return SurfaceDistances.empty()
    pred_surface = surface_voxels(pred[box])
    ref_surface = surface_voxels(ref[box])
    n_pred, n_ref = int(pred_surface.sum()), int(ref_surface.sum())
    if n_pred == 0 or n_ref == 0:
        return SurfaceDistances.empty(pred_surface_size=n_pred, ref_surface_size=n_ref)
    if method == "auto":
        # The two EDTs cost ~0.2 us per box voxel, the two trees ~1 us per surface voxel.
        small_box = pred_surface.size <= _EDT_BOX_VOXELS_PER_SURFACE_VOXEL * (n_pred + n_ref)
        method = "edt" if small_box else "kdtree"
    if method == "edt":
        # The EDT gives, at every voxel, the distance to the nearest zero: the other surface.
        dist_to_ref = ndimage.distance_transform_edt(~ref_surface, sampling=spacing_mm)
        dist_to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=spacing_mm)
        pred_to_ref, ref_to_pred = dist_to_ref[pred_surface], dist_to_pred[ref_surface]
    else:
        # Voxel centres in mm; argwhere lists them in the same C order as boolean indexing.
        pred_points = np.argwhere(pred_surface) * np.asarray(spacing_mm)
        ref_points = np.argwhere(ref_surface) * np.asarray(spacing_mm)
        # Voxels on both surfaces are at distance 0: only query the others (often most of them
        # coincide in a good segmentation).
        pred_to_ref = _nearest_distances(pred_points, ref_points, ~ref_surface[pred_surface])
        ref_to_pred = _nearest_distances(ref_points, pred_points, ~pred_surface[ref_surface])
    return SurfaceDistances(
        pred_to_ref_mm=np.asarray(pred_to_ref, dtype=np.float64),
        ref_to_pred_mm=np.asarray(ref_to_pred, dtype=np.float64),
        pred_surface_size=n_pred,
        ref_surface_size=n_ref,
    )


def hausdorff_distance(distances: SurfaceDistances) -> float:
    """Hausdorff distance: the largest directed surface distance over both directions, in mm.

    Parameters
    ----------
    distances : SurfaceDistances
        Output of :func:`surface_distances`.

    Returns
    -------
    hd : float
        0.0 if both masks are empty, NaN if exactly one is.

    Examples
    --------
    >>> d = SurfaceDistances(np.array([0.0, 2.0]), np.array([1.0]), 2, 1)
    >>> hausdorff_distance(d)
    2.0
    """
    return percentile_hausdorff_distance(distances, percentile=100.0)


def percentile_hausdorff_distance(
    distances: SurfaceDistances, *, percentile: float = 95.0
) -> float:
    """Robust Hausdorff distance: the larger of the two directed percentiles, in mm.

    Formula::

        hd_p = max(percentile(pred_to_ref_mm, p), percentile(ref_to_pred_mm, p))

    with NumPy's default (linear interpolation) percentile. Tools that take the percentile of
    both directions pooled together (MedPy, seg-metrics) give a value that is never larger.

    Parameters
    ----------
    distances : SurfaceDistances
        Output of :func:`surface_distances`.
    percentile : float, optional
        Percentile in [0, 100]. Defaults to 95 (HD95); 100 gives the Hausdorff distance.

    Returns
    -------
    hd_p : float
        0.0 if both masks are empty, NaN if exactly one is.

    Examples
    --------
    >>> d = SurfaceDistances(np.arange(101.0), np.zeros(3), 101, 3)
    >>> percentile_hausdorff_distance(d, percentile=95)
    95.0
    """
    if not 0.0 <= percentile <= 100.0:
        raise ValueError(expected("a number in [0, 100]", key="percentile", received=percentile))
    empty = _empty_value(distances, both=0.0, one=float("nan"))
    if empty is not None:
        return empty
    return float(
        max(
            np.percentile(distances.pred_to_ref_mm, percentile),
            np.percentile(distances.ref_to_pred_mm, percentile),
        )
    )


def average_symmetric_surface_distance(distances: SurfaceDistances) -> float:
    """Average symmetric surface distance: the mean of both directions' distances pooled, in mm.

    Formula::

        assd = (sum(pred_to_ref_mm) + sum(ref_to_pred_mm)) / (n_pred_surface + n_ref_surface)

    Parameters
    ----------
    distances : SurfaceDistances
        Output of :func:`surface_distances`.

    Returns
    -------
    assd : float
        0.0 if both masks are empty, NaN if exactly one is.

    Examples
    --------
    >>> d = SurfaceDistances(np.array([0.0, 3.0]), np.array([0.0]), 2, 1)
    >>> average_symmetric_surface_distance(d)
    1.0
    """
    empty = _empty_value(distances, both=0.0, one=float("nan"))
    if empty is not None:
        return empty
    total = distances.pred_to_ref_mm.sum() + distances.ref_to_pred_mm.sum()
    return float(total / (distances.pred_to_ref_mm.size + distances.ref_to_pred_mm.size))


def normalized_surface_dice(distances: SurfaceDistances, *, tolerance_mm: float = 1.0) -> float:
    """Normalised surface Dice: the fraction of both surfaces within ``tolerance_mm`` of the other.

    Formula::

        nsd = (#(pred_to_ref_mm <= tau) + #(ref_to_pred_mm <= tau))
              / (n_pred_surface + n_ref_surface)

    Voxels count equally (no surfel-area weighting).

    Parameters
    ----------
    distances : SurfaceDistances
        Output of :func:`surface_distances`.
    tolerance_mm : float, optional
        Tolerance tau in mm, >= 0. Defaults to 1 mm.

    Returns
    -------
    nsd : float
        In [0, 1]; 1.0 if both masks are empty, 0.0 if exactly one is.

    Examples
    --------
    >>> d = SurfaceDistances(np.array([0.0, 3.0]), np.array([0.5, 1.0]), 2, 2)
    >>> normalized_surface_dice(d, tolerance_mm=1.0)
    0.75
    """
    tolerance_mm = float(tolerance_mm)
    if not tolerance_mm >= 0.0:
        raise ValueError(expected("a number >= 0", key="tolerance_mm", received=tolerance_mm))
    empty = _empty_value(distances, both=1.0, one=0.0)
    if empty is not None:
        return empty
    within = np.count_nonzero(distances.pred_to_ref_mm <= tolerance_mm) + np.count_nonzero(
        distances.ref_to_pred_mm <= tolerance_mm
    )
    return float(within / (distances.pred_to_ref_mm.size + distances.ref_to_pred_mm.size))


def surface_metrics(distances: SurfaceDistances, *, tolerance_mm: float = 1.0) -> dict[str, float]:
    """All surface metrics of one mask pair: ``hd``, ``hd95``, ``assd`` and ``nsd``.

    Parameters
    ----------
    distances : SurfaceDistances
        Output of :func:`surface_distances`.
    tolerance_mm : float, optional
        Tolerance of the normalised surface Dice in mm. Defaults to 1 mm.

    Returns
    -------
    metrics : dict of str to float

    Examples
    --------
    >>> surface_metrics(SurfaceDistances.empty())
    {'hd': 0.0, 'hd95': 0.0, 'assd': 0.0, 'nsd': 1.0}
    """
    return {
        "hd": hausdorff_distance(distances),
        "hd95": percentile_hausdorff_distance(distances, percentile=95.0),
        "assd": average_symmetric_surface_distance(distances),
        "nsd": normalized_surface_dice(distances, tolerance_mm=tolerance_mm),
    }


def _nearest_distances(points: np.ndarray, targets: np.ndarray, to_query: np.ndarray) -> np.ndarray:
    """Distance from each point to its nearest target; 0 where ``to_query`` is False."""
    distances = np.zeros(len(points), dtype=np.float64)
    if to_query.any():
        distances[to_query] = spatial.KDTree(targets).query(points[to_query])[0]
    return distances


def _empty_value(distances: SurfaceDistances, *, both: float, one: float) -> float | None:
    """The value for empty masks, or None when both masks have a surface."""
    if distances.pred_empty and distances.ref_empty:
        return both
    if distances.pred_empty or distances.ref_empty:
        return one
    return None


def _as_bool(array: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype != bool:
        raise TypeError(expected("a boolean mask", key=f"{name}.dtype", received=Received(str(array.dtype)),
                                 hint="Use e.g. `labels == c`."))
    return array


def _check_spacing(spacing_mm: Sequence[float], ndim: int) -> tuple[float, ...]:
    spacing = tuple(float(s) for s in np.atleast_1d(spacing_mm))
    if len(spacing) != ndim or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(expected(f"{ndim} positive finite values (one per array axis)", key="spacing_mm",
                                  received=tuple(spacing_mm) if np.ndim(spacing_mm) else spacing_mm))
    return spacing
