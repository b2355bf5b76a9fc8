"""Per-class statistics of per-case rows: the ``summary.json`` of an evaluation.

:func:`summarize` turns the rows of ``per_case.csv`` into, per class, the mean, std and median of
each metric over the cases where it is defined, the counts of missed and spurious structures,
distance statistics with NaN replaced by the worst value (the case's image diagonal), and the
foreground mean over classes. Formatting it for people is :mod:`segpipe.reports.evaluation_tables`.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from segpipe.arrays import nan_stats

__all__ = ["summarize", "class_name", "SUMMARY_METRICS", "DISTANCE_METRICS", "HD95_DEFINITION",
           "WORST_VALUE_DEFINITION"]

# Metrics summarised per class (raw voxel counts stay in per_case.csv only).
SUMMARY_METRICS = (
    "dice", "iou", "precision", "recall", "specificity", "volume_similarity", "hd", "hd95", "assd",
    "nsd", "vol_ref_ml", "vol_pred_ml",
)  # fmt: skip
# NaN when exactly one mask is empty; the summary also reports them filled with the worst value.
DISTANCE_METRICS = ("hd", "hd95", "assd")
# Quality metrics averaged over the foreground classes (volumes are not a quality).
_FOREGROUND_METRICS = SUMMARY_METRICS[:10]

HD95_DEFINITION = (
    "max of the two directed 95th percentiles (linear interpolation) of surface-voxel distances; "
    "surface = voxels with a 6-neighbour outside the mask, image border counts as outside"
)
WORST_VALUE_DEFINITION = "image diagonal in mm: sqrt(sum((shape * spacing_mm) ** 2)) of the case"


def summarize(
    rows: Sequence[Mapping[str, Any]],
    *,
    labels: Iterable[int] | None = None,
    class_names: Sequence[str] | Mapping[int, str] | None = None,
) -> dict[str, Any]:
    """Per-class statistics of per-case rows, never dropping empty-mask cases silently.

    Parameters
    ----------
    rows : sequence of dict
        One dict per (case, class) with ``case``, ``class``, the keys of ``METRIC_NAMES`` and
        ``image_diagonal_mm`` (the rows of ``per_case.csv``).
    labels : iterable of int, optional
        Classes to summarise. Defaults to the classes in ``rows``.
    class_names : list of str or dict of int to str, optional
        Names of the classes. Defaults to the ``class_name`` of the rows, else ``class_<value>``.

    Returns
    -------
    summary : dict
        ``{"n_cases", "labels", "class_names", "definitions", "per_class", "foreground_mean"}``.
        ``per_class[str(label)]`` holds ``name``, ``n_cases``, ``missed`` (reference non-empty,
        prediction empty), ``spurious`` (reference empty, prediction non-empty), ``both_empty``,
        ``metrics[name] = {"mean", "std", "median", "n"}`` over the cases where the metric is
        defined (``n`` of them; NaN distances of one-empty cases are left out here) and
        ``distances_worst_filled[name]`` for hd/hd95/assd with NaN replaced by the case's image
        diagonal. ``foreground_mean`` averages the class means of the quality metrics, plus
        ``<distance>_worst_filled``. Undefined statistics are NaN (``null`` in JSON).

    Examples
    --------
    >>> rows = [{"case": "a", "class": 1, "dice": 0.0, "hd95": float("nan"),
    ...          "n_ref": 5, "n_pred": 0, "image_diagonal_mm": 100.0}]
    >>> s = summarize(rows)
    >>> s["per_class"]["1"]["missed"], s["per_class"]["1"]["distances_worst_filled"]["hd95"]["mean"]
    (1, 100.0)
    """
    if labels is None:
        labels = sorted({int(r["class"]) for r in rows})
    labels = [int(c) for c in labels]
    names = {c: class_name(class_names, c, rows) for c in labels}
    per_class = {str(c): _class_summary([r for r in rows if int(r["class"]) == c], names[c]) for c in labels}
    foreground: dict[str, float] = {}
    for name in _FOREGROUND_METRICS:
        foreground[name] = _mean_of_means([p["metrics"].get(name) for p in per_class.values()])
    for name in DISTANCE_METRICS:
        foreground[f"{name}_worst_filled"] = _mean_of_means(
            [p["distances_worst_filled"].get(name) for p in per_class.values()]
        )
    return {
        "n_cases": len({r["case"] for r in rows}),
        "labels": labels,
        "class_names": {str(c): names[c] for c in labels},
        "definitions": {
            "hd95": HD95_DEFINITION,
            "worst_value": WORST_VALUE_DEFINITION,
            "std": "population standard deviation (ddof=0) over cases",
            "metrics": "mean/std/median over the cases where the metric is defined (n of them)",
        },
        "per_class": per_class,
        "foreground_mean": foreground,
    }


def _class_summary(class_rows: Sequence[Mapping[str, Any]], name: str) -> dict[str, Any]:
    """The ``per_class`` entry of :func:`summarize` for the rows of one class."""
    n_ref = np.array([r["n_ref"] for r in class_rows])
    n_pred = np.array([r["n_pred"] for r in class_rows])
    present = set(class_rows[0]) if class_rows else set()
    stats = {m: nan_stats([float(r[m]) for r in class_rows]) for m in SUMMARY_METRICS if m in present}
    worst = {
        m: nan_stats([float(r["image_diagonal_mm"]) if math.isnan(float(r[m])) else float(r[m]) for r in class_rows])
        for m in DISTANCE_METRICS if m in present
    }
    return {
        "name": name,
        "n_cases": len(class_rows),
        "missed": int(np.sum((n_ref > 0) & (n_pred == 0))),
        "spurious": int(np.sum((n_ref == 0) & (n_pred > 0))),
        "both_empty": int(np.sum((n_ref == 0) & (n_pred == 0))),
        "metrics": stats,
        "distances_worst_filled": worst,
    }


def _mean_of_means(stats: list[Mapping[str, float] | None]) -> float:
    means = [s["mean"] for s in stats if s is not None and not math.isnan(s["mean"])]
    return float(np.mean(means)) if means else math.nan


def class_name(class_names: Sequence[str] | Mapping[int, str] | None, value: int,
               rows: Sequence[Mapping[str, Any]] = ()) -> str:
    """The name of class ``value``: from ``class_names``, else the ``class_name`` of its rows, else
    ``class_<value>``."""
    if isinstance(class_names, Mapping):
        if value in class_names:
            return str(class_names[value])
        if str(value) in class_names:
            return str(class_names[str(value)])
    elif class_names is not None and 0 <= value < len(class_names):
        return str(class_names[value])
    for row in rows:
        if int(row["class"]) == value and row.get("class_name"):
            return str(row["class_name"])
    return f"class_{value}"
