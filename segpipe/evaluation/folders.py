"""Folder evaluation: score every prediction against its reference, per case and per class.

:func:`evaluate_folders` matches the label maps of two folders by file name, checks that each pair
has the same shape and affine, scores all cases in parallel with
:func:`segpipe.metrics.case_metrics`, and writes

- ``per_case.csv``: one row per (case, class) with every metric and the case's image diagonal;
- ``summary.json``: per class the mean, std and median of each metric, the counts of missed and
  spurious structures, distance statistics with NaN replaced by the worst value, and the
  foreground mean over classes (see :func:`summarize`);
- with ``lesion_labels``: ``lesions.csv`` (lesion-wise metrics per case and class,
  :mod:`segpipe.metrics.lesions`) and their summary under ``summary.json["lesion_wise"]``;
- ``report.html`` and ``overlays/*.png`` (:func:`segpipe.reports.html.write_evaluation_report`).

:func:`format_summary_markdown` turns the summary into the table the CLI prints.
"""
from __future__ import annotations

import csv
import io
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import nibabel as nib
import numpy as np

from segpipe.arrays import nan_stats
from segpipe.data.layouts import squeeze_trailing, squeeze_trailing_shape
from segpipe.errors import Received, expected
from segpipe.io import (NIFTI_SUFFIXES, affine_text, json_safe, read_nifti, remove_orphaned_temporaries, strip_nifti_suffix,
                        write_json, write_text)
from segpipe.metrics.lesions import (
    LESION_DEFINITION, LESION_DICE_DEFINITION, LESION_METRIC_NAMES, case_lesion_metrics, summarize_lesions,
)
from segpipe.data.labels import Region
from segpipe.metrics.regions import mask_ignored, region_case_metrics, region_lesion_metrics
from segpipe.metrics.overlap import METRIC_NAMES, ConfusionCounts, case_metrics, label_metrics
from segpipe.metrics.surface import SurfaceDistances
from segpipe.parallel import parallel_map
from segpipe.reports.html import write_evaluation_report
from segpipe.runs.rundir import RunDir

__all__ = [
    "CaseResult",
    "evaluate_case",
    "evaluate_folders",
    "summarize",
    "format_summary_markdown",
    "format_lesion_markdown",
    "SUMMARY_METRICS",
    "DISTANCE_METRICS",
]

# Metrics summarised per class (raw voxel counts stay in per_case.csv only).
SUMMARY_METRICS = (
    "dice", "iou", "precision", "recall", "specificity", "volume_similarity", "hd", "hd95", "assd",
    "nsd", "vol_ref_ml", "vol_pred_ml",
)  # fmt: skip
# NaN when exactly one mask is empty; the summary also reports them filled with the worst value.
DISTANCE_METRICS = ("hd", "hd95", "assd")
# Quality metrics averaged over the foreground classes (volumes are not a quality).
_FOREGROUND_METRICS = SUMMARY_METRICS[:10]

# Affines agree if every entry is within atol + rtol * |ref entry| (mm; float32 header rounding).
AFFINE_ATOL_MM = 1e-3
AFFINE_RTOL = 1e-5

HD95_DEFINITION = (
    "max of the two directed 95th percentiles (linear interpolation) of surface-voxel distances; "
    "surface = voxels with a 6-neighbour outside the mask, image border counts as outside"
)
WORST_VALUE_DEFINITION = "image diagonal in mm: sqrt(sum((shape * spacing_mm) ** 2)) of the case"


@dataclass
class CaseResult:
    """Metrics of one case: ``metrics[label]`` is a row of :func:`case_metrics`, ``lesions[label]``
    one of :func:`segpipe.metrics.lesions.lesion_metrics` (for the lesion-wise labels only)."""

    case_id: str
    metrics: dict[int, dict[str, Any]]
    n_voxels: int
    spacing_mm: tuple[float, ...]
    image_diagonal_mm: float
    lesions: dict[int, dict[str, Any]] = field(default_factory=dict)
    # with regions (segpipe.metrics.regions): region name -> metrics row, and lesion-wise rows
    regions: dict[str, dict[str, Any]] = field(default_factory=dict)
    region_lesions: dict[str, dict[str, Any]] = field(default_factory=dict)


def evaluate_case(
    pred_path: str | os.PathLike,
    ref_path: str | os.PathLike,
    *,
    labels: Iterable[int] | None = None,
    tolerance_mm: float | Mapping[int, float] = 1.0,
    case_id: str | None = None,
    lesion_labels: Iterable[int] = (),
    lesion_min_size_mm3: float = 0.0,
    lesion_dilation_vox: int = 0,
    ignore_label: int | None = None,
    regions: Sequence[Region] = (),
) -> CaseResult:
    """Read one prediction/reference pair of NIfTI label maps and score it.

    Parameters
    ----------
    pred_path, ref_path : path-like
        NIfTI label maps (``.nii`` or ``.nii.gz``) of the same shape and affine. Float files are
        accepted if they hold whole numbers.
    labels : iterable of int, optional
        Label values to score. Defaults to every non-zero value present in either map.
    tolerance_mm : float or dict of int to float, optional
        NSD tolerance in mm, for all classes or per label. Defaults to 1 mm.
    case_id : str, optional
        Name of the case. Defaults to the reference file name without its NIfTI suffix.
    lesion_labels : iterable of int, optional
        Labels also scored lesion by lesion (:func:`segpipe.metrics.lesions.case_lesion_metrics`).
    lesion_min_size_mm3 : float, optional
        Smaller connected components are not lesions (reference and prediction). Defaults to 0.
    lesion_dilation_vox : int, optional
        Matching reach of the reference lesions in voxels (BraTS 2023: 1-3). Defaults to 0 (overlap).
    ignore_label : int, optional
        Voxels holding it in the reference count nowhere (:func:`segpipe.metrics.regions.mask_ignored`).
    regions : sequence of Region, optional
        Also scored per region (and lesion-wise per region when ``lesion_labels`` is not empty).

    Returns
    -------
    result : CaseResult
        Metrics per label, with the spacing (from the reference's affine) and image diagonal.
    """
    ref_vol = read_nifti(ref_path)
    pred_vol = read_nifti(pred_path)
    pred = _as_label_map(pred_vol.array, pred_path)
    ref = _as_label_map(ref_vol.array, ref_path)
    if pred.shape != ref.shape:
        raise ValueError(expected(f"the shape {ref.shape} of the reference {ref_path}", key="shape",
                                  received=pred.shape, where=str(pred_path)))
    spacing_mm = ref_vol.spacing_mm
    pred, ref = mask_ignored(pred, ref, ignore_label)
    region_rows = region_case_metrics(pred, ref, regions, spacing_mm=spacing_mm,
                                      tolerance_mm=1.0 if isinstance(tolerance_mm, Mapping) else tolerance_mm)
    region_lesions = (region_lesion_metrics(pred, ref, regions, spacing_mm=spacing_mm, min_size_mm3=lesion_min_size_mm3,
                                            dilation_vox=lesion_dilation_vox) if lesion_labels else {})
    metrics = case_metrics(
        pred, ref, labels=labels, spacing_mm=spacing_mm, tolerance_mm=tolerance_mm
    )
    lesions = case_lesion_metrics(pred, ref, labels=lesion_labels, spacing_mm=spacing_mm,
                                  min_size_mm3=lesion_min_size_mm3, dilation_vox=lesion_dilation_vox)
    extent_mm = np.asarray(ref.shape, dtype=np.float64) * np.asarray(spacing_mm)
    return CaseResult(
        case_id=case_id or strip_nifti_suffix(Path(ref_path).name),
        metrics=metrics,
        n_voxels=int(ref.size),
        spacing_mm=tuple(spacing_mm),
        image_diagonal_mm=float(np.sqrt(np.sum(extent_mm**2))),
        lesions=lesions,
        regions=region_rows,
        region_lesions=region_lesions,
    )


def evaluate_folders(
    pred_dir: str | os.PathLike,
    ref_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    labels: Iterable[int] | None = None,
    class_names: Sequence[str] | Mapping[int, str] | None = None,
    tolerance_mm: float | Mapping[int, float] = 1.0,
    workers: int | None = None,
    lesion_labels: Iterable[int] | None = None,
    lesion_min_size_mm3: float = 0.0,
    lesion_dilation_vox: int = 0,
    report: bool = True,
    image_dir: str | os.PathLike | None = None,
    ignore_label: int | None = None,
    regions: Sequence[Region] | None = None,
) -> dict[str, Any]:
    """Score every reference in ``ref_dir`` against the prediction of the same name in ``pred_dir``.

    Parameters
    ----------
    pred_dir, ref_dir : path-like
        Folders of NIfTI label maps, matched by file name without the ``.nii``/``.nii.gz``
        suffix. Every reference needs a prediction; predictions without a reference are ignored
        (with a warning).
    out_dir : path-like
        Folder for ``per_case.csv`` and ``summary.json`` (created if needed).
    labels : iterable of int, optional
        Label values to score. Defaults to the union of the values found in the references,
        minus 0.
    class_names : list of str (indexed by label value) or dict of int to str, optional
        Names for the tables, e.g. from ``dataset.json``. Defaults to ``class_<value>``.
    tolerance_mm : float or dict of int to float, optional
        NSD tolerance in mm, for all classes or per label. Defaults to 1 mm.
    workers : int, optional
        Parallel processes. Defaults to the CPU cores available to this process; 1 runs in
        this process.
    lesion_labels : iterable of int, optional
        Labels also scored lesion by lesion (connected components; ``lesions.csv`` and
        ``summary["lesion_wise"]``, see :mod:`segpipe.metrics.lesions`).
    lesion_min_size_mm3 : float, optional
        Minimum lesion volume in mm³ (smaller components are dropped from both masks). Default 0.
    lesion_dilation_vox : int, optional
        Matching reach of the reference lesions in voxels (BraTS 2023: 1-3). Default 0 (overlap).
    report : bool, optional
        Also write ``report.html`` and ``overlays/`` (default). Needs the label maps only; the scans
        come from ``image_dir`` or the ``images*`` folder beside the references.
    ignore_label : int, optional
        Reference voxels holding it count nowhere (not annotated).
    regions : sequence of Region, optional
        Also scored per region: ``regions.csv`` (one row per case and region) and the summary's
        ``regions`` (as ``per_class``), and with ``lesion_labels`` ``regions_lesion_wise``.
    image_dir : path-like, optional
        Scans drawn under the overlays (see :func:`segpipe.reports.html.write_evaluation_report`).

    Returns
    -------
    summary : dict
        What :func:`summarize` returns (also written to ``summary.json``), plus ``lesion_wise``
        when ``lesion_labels`` are given.

    Raises
    ------
    FileNotFoundError
        A folder does not exist, or predictions are missing (lists the missing cases).
    ValueError
        No reference files, or pairs whose shape or affine differ (one line per pair).

    Examples
    --------
    >>> summary = evaluate_folders("preds", "labelsTr", "eval", labels=[1, 2])  # doctest: +SKIP
    >>> print(format_summary_markdown(summary))  # doctest: +SKIP
    """
    pred_dir, ref_dir, out_dir = Path(pred_dir), Path(ref_dir), Path(out_dir)
    lesion_labels = _check_lesion_options(lesion_labels, lesion_min_size_mm3, lesion_dilation_vox)
    if image_dir is not None and not Path(image_dir).is_dir():
        raise FileNotFoundError(expected("a folder of scans", key="image_dir", received=Received(f"{image_dir} (no such folder)")))
    pairs = _match_cases(pred_dir, ref_dir)
    _check_geometry(pairs)
    if labels is not None:
        labels = sorted({int(v) for v in labels})
    results = _run_cases([(c, pred, ref) for c, (pred, ref) in pairs.items()],
                         labels=labels, tolerance_mm=tolerance_mm, workers=workers,
                         lesion_labels=lesion_labels, lesion_min_size_mm3=lesion_min_size_mm3,
                         lesion_dilation_vox=lesion_dilation_vox, ignore_label=ignore_label,
                         regions=tuple(regions or ()))
    if labels is None:
        labels = _labels_found(results, ref_dir)
    rows = _rows(results, labels, class_names, tolerance_mm)
    summary = summarize(rows, labels=labels, class_names=class_names)
    summary["tolerance_mm"] = {str(c): _tolerance(tolerance_mm, c) for c in labels}
    summary["pred_dir"], summary["ref_dir"] = str(pred_dir), str(ref_dir)
    remove_orphaned_temporaries(out_dir, recursive=True)  # of an earlier evaluation killed while writing
    write_text(out_dir / "per_case.csv", _to_csv(rows))
    if lesion_labels:
        summary["lesion_wise"] = _write_lesions(out_dir, results, lesion_labels, lesion_min_size_mm3,
                                                lesion_dilation_vox, class_names)
    if regions:  # one row per case and region; the summary's "regions" as its "per_class"
        region_rows = [{"case": r.case_id, "region": name, **row, "image_diagonal_mm": r.image_diagonal_mm}
                       for r in results for name, row in r.regions.items()]
        write_text(out_dir / "regions.csv", _to_csv(region_rows, ["case", "region", *METRIC_NAMES, "image_diagonal_mm"]))
        summary["regions"] = {g.name: _class_summary([row for row in region_rows if row["region"] == g.name], g.name)
                              for g in regions}
        if lesion_labels:
            summary["regions_lesion_wise"] = {g.name: _mean_numbers([r.region_lesions[g.name] for r in results])
                                              for g in regions}
    write_json(out_dir / "summary.json", json_safe(summary))
    if report:
        write_evaluation_report(out_dir, pred_dir=pred_dir, ref_dir=ref_dir, image_dir=image_dir)
    return summary


def evaluate_run(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    *,
    labels: Sequence[int] | None = None,
    class_names: Sequence[str] | Mapping[int, str] | None = None,
    tolerance_mm: float | Mapping[int, float] = 1.0,
    workers: int | None = None,
    model: str | None = None,
    lesion_labels: Iterable[int] | None = None,
    lesion_min_size_mm3: float = 0.0,
    lesion_dilation_vox: int = 0,
    report: bool = True,
    image_dir: str | os.PathLike | None = None,
) -> tuple[dict[str, Any], Path]:
    """Predict a trained run's validation cases and score them; returns (summary, output folder).

    Predictions go to ``RUN_DIR/predictions``, scores to ``out_dir`` (default ``RUN_DIR/evaluation``).
    ``model``: ``"best"`` or ``"final"`` (default: the best checkpoint if there is one). The other
    options are those of :func:`evaluate_folders` (the report finds the scans beside the dataset's
    label maps, which the references link to). Imports TensorFlow (seconds), so only call it when a
    model must run.
    """
    from segpipe.inference.run import predict_run  # TensorFlow: only the run mode needs it
    run_dir = Path(run_dir)
    pred_dir, ref_dir, run_labels, run_names = predict_run(run_dir, model=model)
    ignore_label, regions = _run_label_scheme(RunDir(run_dir))
    out = Path(out_dir) if out_dir is not None else RunDir(run_dir).evaluation_dir
    summary = evaluate_folders(
        pred_dir, ref_dir, out,
        labels=labels if labels is not None else run_labels,
        class_names=class_names if class_names is not None else run_names,
        tolerance_mm=tolerance_mm, workers=workers, lesion_labels=lesion_labels,
        lesion_min_size_mm3=lesion_min_size_mm3, lesion_dilation_vox=lesion_dilation_vox, report=report,
        image_dir=image_dir, ignore_label=ignore_label, regions=regions,
    )
    return summary, out


def _run_label_scheme(run: RunDir) -> tuple[int | None, tuple[Region, ...] | None]:
    """The ignore label and regions of a run's dataset (its config and dataset.json); none without a config."""
    if not run.is_run():
        return None, None
    from segpipe.data.pipeline import open_dataset  # the config layer: only the run mode needs it
    dataset = open_dataset(run.config().data)
    return dataset.ignore_label, dataset.regions


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
    names = {c: _class_name(class_names, c, rows) for c in labels}
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


def format_summary_markdown(summary: Mapping[str, Any]) -> str:
    """A Markdown table of the main metrics per class (mean ± std) and the foreground mean.

    Parameters
    ----------
    summary : dict
        What :func:`evaluate_folders` or :func:`summarize` returns.

    Returns
    -------
    table : str
        The table plus a legend line.
    """
    header = (
        "| class | name | dice | iou | hd95 (mm) | hd95, NaN = worst (mm) | assd (mm) | nsd "
        "| missed | spurious |"
    )
    lines = [header, "|" + "---|" * 10]
    for value, entry in summary["per_class"].items():
        m, w = entry["metrics"], entry["distances_worst_filled"]
        cells = [
            value,
            entry["name"],
            _mean_std(m.get("dice"), 4),
            _mean_std(m.get("iou"), 4),
            _mean_std(m.get("hd95"), 2, show_n=entry["n_cases"]),
            _mean_std(w.get("hd95"), 2),
            _mean_std(m.get("assd"), 2, show_n=entry["n_cases"]),
            _mean_std(m.get("nsd"), 4),
            str(entry["missed"]),
            str(entry["spurious"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    fg = summary["foreground_mean"]
    columns = (
        ("dice", 4), ("iou", 4), ("hd95", 2), ("hd95_worst_filled", 2), ("assd", 2), ("nsd", 4)
    )
    cells = ["fg", "**foreground mean**", *(_number(fg.get(k), d) for k, d in columns), "", ""]
    lines.append("| " + " | ".join(cells) + " |")
    tolerance = summary.get("tolerance_mm")
    tau = f"NSD at tolerance_mm={_compact(tolerance)}; " if tolerance else ""
    lines.append("")
    lines.append(
        f"{summary['n_cases']} cases, mean ± std. {tau}hd95 = max of the two directed 95th "
        f"percentiles. (k/n): mean over the k of n cases where both masks are non-empty; "
        f"'NaN = worst' counts the others as the image diagonal."
    )
    return "\n".join(lines)


def format_lesion_markdown(lesion_wise: Mapping[str, Any]) -> str:
    """A Markdown table of ``summary["lesion_wise"]``: lesion-wise Dice and detection per class."""
    lines = ["| class | name | lesion Dice | lesion F1 | ref lesions | TP | FN | FP | precision | recall |",
             "|" + "---|" * 10]
    for value, entry in lesion_wise["per_class"].items():
        cells = [value, lesion_wise["class_names"].get(value, value),
                 _mean_std(entry["lesion_dice"], 4), _mean_std(entry["lesion_f1"], 4),
                 *(str(entry[k]) for k in ("n_ref_lesions", "lesion_tp", "lesion_fn", "lesion_fp")),
                 _number(entry["pooled_precision"], 4), _number(entry["pooled_recall"], 4)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Lesions: {LESION_DEFINITION} (min_size_mm3={lesion_wise['min_size_mm3']:g}, "
              f"dilation_vox={lesion_wise.get('dilation_vox', 0)}). "
              "Lesion Dice: BraTS 2023 (false positives count 0); precision/recall pooled over all cases."]
    return "\n".join(lines)


# --- helpers ---------------------------------------------------------------------------------


def _write_lesions(out_dir: Path, results: list[CaseResult], lesion_labels: list[int], min_size_mm3: float,
                   dilation_vox: int, class_names) -> dict[str, Any]:
    """Write ``lesions.csv``; return its summary (``summary.json["lesion_wise"]``)."""
    rows = [{"case": r.case_id, "class": c, "class_name": _class_name(class_names, c), **r.lesions[c]}
            for r in results for c in lesion_labels]
    write_text(out_dir / "lesions.csv", _to_csv(rows, ["case", "class", "class_name", *LESION_METRIC_NAMES]))
    return {
        "labels": lesion_labels,
        "min_size_mm3": float(min_size_mm3),
        "dilation_vox": int(dilation_vox),
        "class_names": {str(c): _class_name(class_names, c) for c in lesion_labels},
        "definitions": {"lesion": LESION_DEFINITION, "lesion_dice": LESION_DICE_DEFINITION,
                        "pooled": "precision/recall/F1 of the counts summed over cases"},
        "per_class": summarize_lesions(rows, labels=lesion_labels),
    }


def _match_cases(pred_dir: Path, ref_dir: Path) -> dict[str, tuple[Path, Path]]:
    """case id -> (prediction, reference), for every reference (sorted); missing predictions are an error."""
    refs = _list_label_files(ref_dir, "ref_dir")
    preds = _list_label_files(pred_dir, "pred_dir")
    if not refs:
        raise ValueError(expected("NIfTI reference files (.nii, .nii.gz)", key="ref_dir",
                                  received=Received(f"{ref_dir} (has none)")))
    missing = sorted(set(refs) - set(preds))
    if missing:
        raise FileNotFoundError(expected("a prediction for every reference case", key="pred_dir", received=Received(
            f"{pred_dir} (lacks {len(missing)} of {len(refs)}: {_short_list(missing)})")))
    extra = sorted(set(preds) - set(refs))
    if extra:
        warnings.warn(
            f"Ignoring {len(extra)} predictions without a reference in {ref_dir}: "
            f"{_short_list(extra)}",
            stacklevel=3,
        )
    return {c: (preds[c], refs[c]) for c in sorted(refs)}


def _labels_found(results: list[CaseResult], ref_dir: Path) -> list[int]:
    """The foreground labels of the references (labels only in predictions are not scored: a warning)."""
    labels = sorted({c for r in results for c, m in r.metrics.items() if m["n_ref"] > 0})
    if not labels:
        raise ValueError(expected("foreground labels (values > 0) in the references", key="ref_dir",
                                  received=Received(f"{ref_dir} (every file is background only)"),
                                  hint="Pass labels= to score the predictions anyway."))
    pred_only = sorted({c for r in results for c in r.metrics} - set(labels))
    if pred_only:
        warnings.warn(
            f"Label values {pred_only} occur only in predictions and are not scored; pass "
            f"labels= to score them",
            stacklevel=3,
        )
    return labels


def _score_job(job: tuple) -> CaseResult:
    """Worker entry point: evaluate_case with the case named in any error."""
    case_id, pred_path, ref_path, labels, tolerance_mm, lesion_options = job
    try:
        return evaluate_case(
            pred_path, ref_path, labels=labels, tolerance_mm=tolerance_mm, case_id=case_id, **lesion_options,
        )
    except Exception as exc:
        # Exceptions cross the process boundary without their traceback: name the case here.
        message = f"Case {case_id!r} (pred {pred_path}, ref {ref_path}): {exc}"
        try:
            wrapped = type(exc)(message)
        except Exception:  # exception types whose constructor wants other arguments
            wrapped = RuntimeError(message)
        raise wrapped from exc


def _run_cases(jobs, *, labels, tolerance_mm, workers, **lesion_options) -> list[CaseResult]:
    jobs = [(*job, labels, tolerance_mm, lesion_options) for job in jobs]
    results = parallel_map(_score_job, jobs, workers=workers, progress=True, desc="Evaluating")
    return sorted(results, key=lambda r: r.case_id)


def _rows(results: list[CaseResult], labels, class_names, tolerance_mm) -> list[dict[str, Any]]:
    rows = []
    for result in results:
        for c in labels:
            metrics = result.metrics.get(c)
            if metrics is None:
                # Absent from both maps (labels were inferred after scoring): the both-empty row.
                metrics = label_metrics(
                    ConfusionCounts(tp=0, fp=0, fn=0, tn=result.n_voxels),
                    SurfaceDistances.empty(),
                    voxel_volume_ml=float(np.prod(result.spacing_mm)) / 1000.0,
                    tolerance_mm=_tolerance(tolerance_mm, c),
                )
            rows.append({
                "case": result.case_id,
                "class": c,
                "class_name": _class_name(class_names, c),
                **metrics,
                "image_diagonal_mm": result.image_diagonal_mm,
            })
    return rows


def _mean_numbers(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """The mean over cases (NaN ignored) of every numeric entry of the rows."""
    keys = [k for k, v in rows[0].items() if isinstance(v, (int, float, np.integer, np.floating))
            and not isinstance(v, bool)] if rows else []
    return {k: float(np.nanmean([float(r[k]) for r in rows])) for k in keys}


def _check_lesion_options(lesion_labels: Iterable[int] | None, min_size_mm3: float, dilation_vox: int) -> list[int]:
    labels = sorted({int(v) for v in lesion_labels or ()})
    if any(v <= 0 for v in labels):
        raise ValueError(f"Expected lesion_labels > 0 (foreground labels). Received: lesion_labels={labels}")
    if not (math.isfinite(min_size_mm3) and min_size_mm3 >= 0):
        raise ValueError(f"Expected lesion_min_size_mm3 >= 0. Received: lesion_min_size_mm3={min_size_mm3}")
    if isinstance(dilation_vox, bool) or not isinstance(dilation_vox, (int, np.integer)) or dilation_vox < 0:
        raise ValueError(f"Expected lesion_dilation_vox as an integer >= 0. Received: lesion_dilation_vox={dilation_vox!r}")
    return labels


def _list_label_files(folder: Path, argument: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise FileNotFoundError(expected("a folder of NIfTI label maps", key=argument,
                                         received=Received(f"{folder} (no such folder)")))
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        # Dot-files include the temporary files of atomic writes in progress.
        if path.name.startswith(".") or not path.name.endswith(NIFTI_SUFFIXES):
            continue
        if not path.is_file():
            continue
        case_id = strip_nifti_suffix(path.name)
        if case_id in files:
            raise ValueError(expected("one file per case", key=argument, received=Received(
                f"{folder} (with {files[case_id].name} and {path.name})")))
        files[case_id] = path
    return files


def _check_geometry(pairs: Mapping[str, tuple[Path, Path]]) -> None:
    """Compare shape and affine of every pair from the headers alone, before any voxel is read."""
    problems = []
    for case_id, (pred_path, ref_path) in pairs.items():
        # Header only (nibabel loads voxel data lazily); segpipe.io.read_nifti would read all.
        pred_img, ref_img = nib.load(str(pred_path)), nib.load(str(ref_path))
        pred_shape, ref_shape = squeeze_trailing_shape(pred_img.shape), squeeze_trailing_shape(ref_img.shape)
        if pred_shape != ref_shape:
            problems.append(f"  {case_id}: shape pred {pred_img.shape} vs ref {ref_img.shape}")
            continue
        pred_affine, ref_affine = np.asarray(pred_img.affine), np.asarray(ref_img.affine)
        if not np.allclose(pred_affine, ref_affine, rtol=AFFINE_RTOL, atol=AFFINE_ATOL_MM):
            diff = float(np.max(np.abs(pred_affine - ref_affine)))
            problems.append(
                f"  {case_id}: affine differs by up to {diff:.4g} mm "
                f"(pred {affine_text(pred_affine)} vs ref {affine_text(ref_affine)})"
            )
    if problems:
        raise ValueError(expected(
            f"each prediction to have the shape and affine of its reference (affine tolerance "
            f"{AFFINE_ATOL_MM} mm + {AFFINE_RTOL} relative)", key="pred_dir",
            received=Received(f"{len(problems)} mismatching pair(s)"),
        ) + "\n" + "\n".join(problems))


def _as_label_map(array: np.ndarray, path) -> np.ndarray:
    array = squeeze_trailing(array)
    if array.ndim != 3:
        raise ValueError(expected("a 3-D label map", key="shape", received=array.shape, where=str(path)))
    if np.issubdtype(array.dtype, np.floating):
        rounded = np.rint(array)
        if not np.array_equal(rounded, array) or (rounded.size and rounded.min() < 0):
            raise ValueError(expected(
                "whole non-negative label values", key="dtype", where=str(path),
                received=Received(f"{array.dtype} with fractional or negative values"), hint="Is this a probability map?",
            ))
        array = rounded.astype(np.min_scalar_type(int(rounded.max(initial=0))))
    return array


def _mean_of_means(stats: list[Mapping[str, float] | None]) -> float:
    means = [s["mean"] for s in stats if s is not None and not math.isnan(s["mean"])]
    return float(np.mean(means)) if means else math.nan


def _class_name(class_names, value: int, rows: Sequence[Mapping[str, Any]] = ()) -> str:
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


def _tolerance(tolerance_mm, value: int) -> float:
    if isinstance(tolerance_mm, Mapping):
        return float(tolerance_mm[value])
    return float(tolerance_mm)


def _to_csv(rows: list[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    columns = columns or ["case", "class", "class_name", *METRIC_NAMES, "image_diagonal_mm"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row[k] for k in columns})  # floats in repr form, NaN as "nan"
    return buffer.getvalue()


def _short_list(names: list[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _mean_std(stats: Mapping[str, float] | None, digits: int, *, show_n: int | None = None) -> str:
    if stats is None or stats["n"] == 0:
        return "n/a"
    text = f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"
    if show_n is not None and stats["n"] != show_n:
        text += f" ({stats['n']}/{show_n})"
    return text


def _number(value: float | None, digits: int) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _compact(tolerance: Mapping[str, float]) -> str:
    values = set(tolerance.values())
    if len(values) == 1:
        return f"{values.pop():g}"
    return ", ".join(f"{k}: {v:g}" for k, v in tolerance.items())
