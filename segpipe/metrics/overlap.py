"""Confusion counts of all classes in one pass, overlap metrics, and the per-case entry point.

Rules for empty masks (mask = ``labels == c``). Every overlap metric is a ratio; when its
denominator is 0 it follows the same rule as Dice: **1 if both sets it compares are empty, 0 if
only one is**. Concretely:

=====================  ===========================  =========================================
metric                 formula                      0/0 happens when ... and then it is
=====================  ===========================  =========================================
dice                   2 tp / (2 tp + fp + fn)      both masks empty: 1
iou                    tp / (tp + fp + fn)          both masks empty: 1
precision              tp / (tp + fp)               pred empty: 1 if ref is empty too, else 0
recall (sensitivity)   tp / (tp + fn)               ref empty: 1 if pred is empty too, else 0
specificity            tn / (tn + fp)               ref fills the image: 1 if pred does too,
                                                    else 0
volume_similarity      1 - |n_pred - n_ref| /       both masks empty: 1
                       (n_pred + n_ref)
=====================  ===========================  =========================================

Surface metrics and their empty-mask rules are in :mod:`segpipe.metrics.surface`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage

from segpipe.errors import Received, expected
from segpipe.metrics.surface import SurfaceDistances, _check_spacing, surface_distances, surface_metrics

__all__ = [
    "ConfusionCounts",
    "confusion_counts",
    "overlap_metrics",
    "label_metrics",
    "case_metrics",
    "METRIC_NAMES",
]

# Column order of one (case, class) row, as returned by case_metrics.
METRIC_NAMES = (
    "dice", "iou", "precision", "recall", "specificity", "volume_similarity",
    "tp", "fp", "fn", "tn", "n_ref", "n_pred", "vol_ref_ml", "vol_pred_ml",
    "hd", "hd95", "assd", "nsd", "empty",
)  # fmt: skip

# Above this many classes a C x C bincount gets large; remap the requested labels instead.
_MAX_DIRECT_CLASSES = 1024


@dataclass(frozen=True)
class ConfusionCounts:
    """Voxel counts of one class: true/false positives/negatives of ``pred == c`` vs ``ref == c``.
    """

    tp: int
    fp: int
    fn: int
    tn: int

    @property
    def n_ref(self) -> int:
        """Voxels of the class in the reference."""
        return self.tp + self.fn

    @property
    def n_pred(self) -> int:
        """Voxels of the class in the prediction."""
        return self.tp + self.fp


def confusion_counts(
    pred: np.ndarray, ref: np.ndarray, *, labels: Iterable[int] | None = None
) -> dict[int, ConfusionCounts]:
    """Confusion counts of every class from one pass over the volume.

    The joint histogram of ``ref * C + pred`` (one ``np.bincount``) is the C x C confusion matrix;
    each class's counts are read from its row, column and diagonal.

    Parameters
    ----------
    pred, ref : np.ndarray
        Non-negative integer label maps of the same shape.
    labels : iterable of int, optional
        Label values to report. Defaults to every non-zero value present in ``pred`` or ``ref``.
        Values absent from both are allowed (all-zero counts but ``tn``).

    Returns
    -------
    counts : dict of int to ConfusionCounts
        Keyed by label value, in the order of ``labels`` (ascending by default).

    Examples
    --------
    >>> ref = np.array([0, 1, 1, 2, 2, 2]); pred = np.array([0, 1, 2, 2, 2, 0])
    >>> confusion_counts(pred, ref)[2]
    ConfusionCounts(tp=2, fp=1, fn=1, tn=2)
    """
    pred, ref = _check_label_maps(pred, ref)
    n_voxels = int(ref.size)
    if labels is not None:
        labels = _check_labels(labels)
    max_value = int(max(pred.max(initial=0), ref.max(initial=0)))
    if max_value + 1 <= _MAX_DIRECT_CLASSES:
        num_classes = max_value + 1
        matrix = _joint_histogram(pred, ref, num_classes)
        if labels is None:
            present = (matrix.sum(axis=0) + matrix.sum(axis=1)) > 0
            labels = [int(v) for v in np.flatnonzero(present) if v != 0]
        index = {c: c for c in labels if c < num_classes}
    else:
        # Few requested labels among huge values: map every other value to one extra bin.
        if labels is None:
            labels = [int(v) for v in np.union1d(np.unique(pred), np.unique(ref)) if v != 0]
        lookup = np.full(max_value + 1, len(labels), dtype=np.min_scalar_type(len(labels)))
        for i, c in enumerate(labels):
            if c <= max_value:
                lookup[c] = i
        matrix = _joint_histogram(lookup[pred], lookup[ref], len(labels) + 1)
        index = {c: i for i, c in enumerate(labels) if c <= max_value}
    row_sums, col_sums = matrix.sum(axis=1), matrix.sum(axis=0)
    counts = {}
    for c in labels:
        if c not in index:
            counts[c] = ConfusionCounts(tp=0, fp=0, fn=0, tn=n_voxels)
            continue
        i = index[c]
        tp = int(matrix[i, i])
        fn = int(row_sums[i]) - tp  # ref == c, pred != c
        fp = int(col_sums[i]) - tp  # pred == c, ref != c
        counts[c] = ConfusionCounts(tp=tp, fp=fp, fn=fn, tn=n_voxels - tp - fp - fn)
    return counts


def overlap_metrics(counts: ConfusionCounts) -> dict[str, float]:
    """Dice, IoU, precision, recall, specificity and volume similarity from confusion counts.

    Formula::

        dice = 2 tp / (2 tp + fp + fn)          iou = tp / (tp + fp + fn)
        precision = tp / (tp + fp)              recall = tp / (tp + fn)
        specificity = tn / (tn + fp)            volume_similarity = 1 - |fp - fn| / (2 tp + fp + fn)

    A 0/0 ratio is 1 if both sets it compares are empty and 0 if only one is (see the module
    docstring for each metric).

    Parameters
    ----------
    counts : ConfusionCounts
        Counts of one class.

    Returns
    -------
    metrics : dict of str to float
        Keys ``dice``, ``iou``, ``precision``, ``recall``, ``specificity``, ``volume_similarity``.

    Examples
    --------
    >>> overlap_metrics(ConfusionCounts(tp=0, fp=0, fn=0, tn=8))["dice"]
    1.0
    >>> overlap_metrics(ConfusionCounts(tp=0, fp=0, fn=3, tn=5))["precision"]  # missed structure
    0.0
    """
    tp, fp, fn, tn = counts.tp, counts.fp, counts.fn, counts.tn
    both_empty = 1.0 if tp + fp + fn == 0 else 0.0
    n_sum = counts.n_pred + counts.n_ref
    return {
        "dice": _ratio(2 * tp, 2 * tp + fp + fn, both_empty),
        "iou": _ratio(tp, tp + fp + fn, both_empty),
        # pred empty: no false positives, perfect only if there was nothing to find.
        "precision": _ratio(tp, tp + fp, 1.0 if fn == 0 else 0.0),
        # ref empty: nothing to find, perfect only if nothing was predicted.
        "recall": _ratio(tp, tp + fn, 1.0 if fp == 0 else 0.0),
        # ref fills the image (no negatives): perfect only if pred fills it too.
        "specificity": _ratio(tn, tn + fp, 1.0 if tn + fn == 0 else 0.0),
        "volume_similarity": 1.0 - _ratio(abs(counts.n_pred - counts.n_ref), n_sum, 0.0),
    }


def label_metrics(
    counts: ConfusionCounts,
    distances: SurfaceDistances,
    *,
    voxel_volume_ml: float,
    tolerance_mm: float = 1.0,
) -> dict[str, float | int | bool]:
    """One row of :func:`case_metrics` from the two primitives of a class.

    Parameters
    ----------
    counts : ConfusionCounts
        Confusion counts of the class.
    distances : SurfaceDistances
        Surface distances of the class (:func:`segpipe.metrics.surface.surface_distances`).
    voxel_volume_ml : float
        Volume of one voxel in ml (product of the spacing in mm / 1000).
    tolerance_mm : float, optional
        Tolerance of the normalised surface Dice. Defaults to 1 mm.

    Returns
    -------
    row : dict
        The keys of ``METRIC_NAMES``, in that order.

    Examples
    --------
    >>> counts = ConfusionCounts(tp=0, fp=0, fn=0, tn=8)
    >>> row = label_metrics(counts, SurfaceDistances.empty(), voxel_volume_ml=1e-3)
    >>> row["dice"], row["hd95"], row["nsd"], row["empty"]
    (1.0, 0.0, 1.0, True)
    """
    row: dict[str, float | int | bool] = dict(overlap_metrics(counts))
    row.update(tp=counts.tp, fp=counts.fp, fn=counts.fn, tn=counts.tn)
    row.update(n_ref=counts.n_ref, n_pred=counts.n_pred)
    row["vol_ref_ml"] = counts.n_ref * voxel_volume_ml
    row["vol_pred_ml"] = counts.n_pred * voxel_volume_ml
    row.update(surface_metrics(distances, tolerance_mm=tolerance_mm))
    row["empty"] = counts.n_ref == 0 and counts.n_pred == 0
    return row


def case_metrics(
    pred: np.ndarray,
    ref: np.ndarray,
    *,
    labels: Iterable[int] | None = None,
    spacing_mm: Sequence[float] = (1.0, 1.0, 1.0),
    tolerance_mm: float | Mapping[int, float] = 1.0,
) -> dict[int, dict[str, float | int | bool]]:
    """Every overlap and surface metric of every class of one case.

    Confusion counts come from one ``np.bincount`` over the volume; surface distances are
    computed per class inside the bounding box of both masks (:mod:`segpipe.metrics.surface`).

    Parameters
    ----------
    pred, ref : np.ndarray
        Non-negative integer label maps of the same shape (prediction and reference).
    labels : iterable of int, optional
        Label values to score. Defaults to every non-zero value present in ``pred`` or ``ref``.
    spacing_mm : sequence of float, optional
        Voxel size along each array axis in mm (e.g. ``Volume.spacing_mm``). Defaults to 1 mm.
    tolerance_mm : float or dict of int to float, optional
        Tolerance of the normalised surface Dice in mm, for all classes or per label value.
        Defaults to 1 mm.

    Returns
    -------
    metrics : dict of int to dict
        ``{label: {"dice", "iou", "precision", "recall", "specificity", "volume_similarity", "tp",
        "fp", "fn", "tn", "n_ref", "n_pred", "vol_ref_ml", "vol_pred_ml", "hd", "hd95", "assd",
        "nsd", "empty"}}``. Distances are in mm; volumes in ml; ``empty`` is True when the class
        is absent from both maps (then dice = iou = nsd = 1 and distances are 0). When exactly one
        map lacks the class, dice = iou = nsd = 0 and distances are NaN.

    Examples
    --------
    >>> ref = np.zeros((8, 8, 8), np.uint8); ref[2:6, 2:6, 2:6] = 1
    >>> pred = np.roll(ref, 1, axis=0)
    >>> m = case_metrics(pred, ref, labels=[1, 2], spacing_mm=(2.0, 1.0, 1.0))
    >>> m[1]["dice"], m[1]["hd"], m[2]["empty"]
    (0.75, 2.0, True)
    """
    pred, ref = _check_label_maps(pred, ref)
    spacing_mm = _check_spacing(spacing_mm, ref.ndim)
    counts = confusion_counts(pred, ref, labels=labels)
    tolerances = _check_tolerance(tolerance_mm, list(counts))
    voxel_volume_ml = float(np.prod(spacing_mm)) / 1000.0
    boxes: tuple[list, list] | None = None
    results = {}
    for c, count in counts.items():
        if count.n_ref == 0 and count.n_pred == 0:
            distances = SurfaceDistances.empty()
        else:
            if boxes is None:
                # One pass per map gives the bounding boxes of all classes.
                max_label = max(counts)
                boxes = (
                    ndimage.find_objects(pred, max_label),
                    ndimage.find_objects(ref, max_label),
                )
            box = _union_box(boxes[0][c - 1], boxes[1][c - 1])
            distances = surface_distances(pred[box] == c, ref[box] == c, spacing_mm=spacing_mm)
        results[c] = label_metrics(
            count, distances, voxel_volume_ml=voxel_volume_ml, tolerance_mm=tolerances[c]
        )
    return results


def _joint_histogram(pred: np.ndarray, ref: np.ndarray, num_classes: int) -> np.ndarray:
    """C x C matrix: rows are reference values, columns predicted values."""
    # The smallest unsigned type that holds ref * C + pred keeps the temporary small.
    dtype = np.min_scalar_type(num_classes * num_classes - 1)
    joint = ref.astype(dtype) * dtype.type(num_classes) + pred.astype(dtype)
    hist = np.bincount(joint.ravel(), minlength=num_classes * num_classes)
    return hist.reshape(num_classes, num_classes)


def _union_box(a: tuple[slice, ...] | None, b: tuple[slice, ...] | None) -> tuple[slice, ...]:
    """Smallest box holding two boxes of ``find_objects`` (None = class absent from that map)."""
    if a is None or b is None:
        return a if b is None else b
    return tuple(slice(min(sa.start, sb.start), max(sa.stop, sb.stop)) for sa, sb in zip(a, b))


def _ratio(numerator: float, denominator: float, zero_over_zero: float) -> float:
    return zero_over_zero if denominator == 0 else float(numerator / denominator)


def _check_label_maps(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, ref = np.asarray(pred), np.asarray(ref)
    for name, array in (("pred", pred), ("ref", ref)):
        if not (np.issubdtype(array.dtype, np.integer) or array.dtype == bool):
            raise TypeError(expected(
                "an integer label map", key=f"{name}.dtype", received=Received(str(array.dtype)),
                hint="Round or cast label maps read as float, e.g. `np.rint(x).astype(np.int16)`.",
            ))
    if pred.shape != ref.shape:
        raise ValueError(expected(f"pred of the same shape as ref {ref.shape}", key="pred.shape", received=pred.shape))
    # Boolean masks are label maps with the single label 1.
    pred = pred.view(np.uint8) if pred.dtype == bool else pred
    ref = ref.view(np.uint8) if ref.dtype == bool else ref
    for name, array in (("pred", pred), ("ref", ref)):
        if np.issubdtype(array.dtype, np.signedinteger) and array.size and array.min() < 0:
            raise ValueError(expected(f"non-negative label values in {name}", key=f"min({name})",
                                      received=Received(str(array.min()))))
    return pred, ref


def _check_labels(labels: Iterable[int]) -> list[int]:
    values = [int(v) for v in labels]
    if any(v <= 0 for v in values) or len(set(values)) != len(values):
        raise ValueError(expected("distinct positive label values (0 is background)", key="labels", received=values))
    return values


def _check_tolerance(
    tolerance_mm: float | Mapping[int, float], labels: list[int]
) -> dict[int, float]:
    if isinstance(tolerance_mm, Mapping):
        tolerances = {int(k): float(v) for k, v in tolerance_mm.items()}
        missing = [c for c in labels if c not in tolerances]
        if missing:
            raise ValueError(expected(f"a tolerance_mm entry for every scored label {labels}", key="tolerance_mm",
                                      received=Received(f"{dict(tolerance_mm)} (missing {missing})")))
    else:
        tolerances = {c: float(tolerance_mm) for c in labels}
    bad = {c: t for c, t in tolerances.items() if not (np.isfinite(t) and t >= 0)}
    if bad:
        raise ValueError(expected("numbers >= 0", key="tolerance_mm", received=bad))
    return tolerances
