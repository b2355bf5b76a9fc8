"""Folder evaluation: score every prediction against its reference, per case and per class.

:func:`evaluate_folders` (keywords) and :func:`score_folders` (:class:`EvaluationOptions`) match the
label maps of two folders by file name, check that each pair has the same shape and affine, score
all cases in parallel with :func:`segpipe.metrics.case_metrics`, and write

- ``per_case.csv``: one row per (case, class) with every metric and the case's image diagonal;
- ``summary.json``: per class the mean, std and median of each metric, the counts of missed and
  spurious structures, distance statistics with NaN replaced by the worst value, and the
  foreground mean over classes (:func:`segpipe.evaluation.summary.summarize`);
- with regions (:class:`segpipe.data.labels.Region`): ``regions.csv`` (one row per case and region)
  and the summary's ``regions`` (as ``per_class``), with lesion labels also ``regions_lesion_wise``;
- with lesion labels: ``lesions.csv`` (lesion-wise metrics per case and class,
  :mod:`segpipe.metrics.lesions`) and their summary under ``summary.json["lesion_wise"]``;
- ``report.html`` and ``overlays/*.png`` (:func:`segpipe.reports.html.write_evaluation_report`).

The tables are written by :mod:`segpipe.tables` (NaN as ``nan`` in CSV, ``null`` in JSON). The
run mode (predict a run's validation cases, then score them) is :mod:`segpipe.evaluation.run`; the
Markdown tables the CLI prints are :mod:`segpipe.reports.evaluation_tables`.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import nibabel as nib
import numpy as np

from segpipe.data.labels import Region
from segpipe.data.layouts import squeeze_trailing, squeeze_trailing_shape
from segpipe.errors import Received, expected
from segpipe.evaluation.options import EvaluationOptions, LesionOptions
from segpipe.evaluation.summary import class_name, summarize
from segpipe.io import NIFTI_SUFFIXES, affine_text, read_nifti, remove_orphaned_temporaries, strip_nifti_suffix
from segpipe.metrics.lesions import (
    LESION_DEFINITION,
    LESION_DICE_DEFINITION,
    LESION_METRIC_NAMES,
    case_lesion_metrics,
    summarize_lesions,
)
from segpipe.metrics.overlap import METRIC_NAMES, ConfusionCounts, case_metrics, label_metrics
from segpipe.metrics.regions import mask_ignored, region_case_metrics, region_lesion_metrics
from segpipe.metrics.surface import SurfaceDistances
from segpipe.parallel import parallel_map
from segpipe.reports.html import write_evaluation_report
from segpipe.tables import write_csv, write_json

__all__ = ["CaseResult", "evaluate_case", "evaluate_folders", "score_folders", "PER_CASE_COLUMNS"]

PER_CASE_COLUMNS = ("case", "class", "class_name", *METRIC_NAMES, "image_diagonal_mm")
LESION_COLUMNS = ("case", "class", "class_name", *LESION_METRIC_NAMES)

# Affines agree if every entry is within atol + rtol * |ref entry| (mm; float32 header rounding).
AFFINE_ATOL_MM = 1e-3
AFFINE_RTOL = 1e-5


@dataclass
class CaseResult:
    """Metrics of one case: ``metrics[label]`` is a row of :func:`case_metrics`, ``lesions[label]``
    one of :func:`segpipe.metrics.lesions.lesion_metrics` (for the lesion-wise labels only)."""

    case_id: str
    metrics: dict[int, dict[str, Any]]
    n_voxels: int
    spacing_mm: tuple[float, ...]
    image_diagonal_mm: float
    lesions: dict[int, dict[str, Any]]
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
    lesions: LesionOptions | None = None,
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
    lesions : LesionOptions, optional
        Labels also scored lesion by lesion (:func:`segpipe.metrics.lesions.case_lesion_metrics`),
        with the minimum lesion size and matching reach. Default: none.
    ignore_label : int, optional
        Voxels holding it in the reference count nowhere (:func:`segpipe.metrics.regions.mask_ignored`).
    regions : sequence of Region, optional
        Also scored per region (and lesion-wise per region when lesion labels are given).

    Returns
    -------
    result : CaseResult
        Metrics per label, with the spacing (from the reference's affine) and image diagonal.

    Raises
    ------
    ValueError
        The maps differ in shape, are not 3-D, or hold fractional or negative values.
    """
    lesions = lesions if lesions is not None else LesionOptions()
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
    region_lesions = (region_lesion_metrics(pred, ref, regions, spacing_mm=spacing_mm,
                                            min_size_mm3=lesions.min_size_mm3,
                                            dilation_vox=lesions.dilation_vox) if lesions.enabled else {})
    metrics = case_metrics(pred, ref, labels=labels, spacing_mm=spacing_mm, tolerance_mm=tolerance_mm)
    lesion_metrics = case_lesion_metrics(pred, ref, labels=lesions.labels, spacing_mm=spacing_mm,
                                         min_size_mm3=lesions.min_size_mm3, dilation_vox=lesions.dilation_vox)
    extent_mm = np.asarray(ref.shape, dtype=np.float64) * np.asarray(spacing_mm)
    return CaseResult(
        case_id=case_id or strip_nifti_suffix(Path(ref_path).name),
        metrics=metrics,
        n_voxels=int(ref.size),
        spacing_mm=tuple(spacing_mm),
        image_diagonal_mm=float(np.sqrt(np.sum(extent_mm**2))),
        lesions=lesion_metrics,
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

    The keyword form of :func:`score_folders`: the options are those of :class:`EvaluationOptions`
    and :class:`LesionOptions` (``lesion_labels``, ``lesion_min_size_mm3``, ``lesion_dilation_vox``).

    Parameters
    ----------
    pred_dir, ref_dir : path-like
        Folders of NIfTI label maps, matched by file name without the ``.nii``/``.nii.gz``
        suffix. Every reference needs a prediction; predictions without a reference are ignored
        (with a warning).
    out_dir : path-like
        Folder for ``per_case.csv`` and ``summary.json`` (created if needed).
    labels, class_names, tolerance_mm, workers, report, image_dir, ignore_label, regions
        See :class:`EvaluationOptions`.
    lesion_labels, lesion_min_size_mm3, lesion_dilation_vox
        See :class:`LesionOptions` (``labels``, ``min_size_mm3``, ``dilation_vox``).

    Returns
    -------
    summary : dict
        What :func:`segpipe.evaluation.summary.summarize` returns (also written to
        ``summary.json``), plus ``lesion_wise`` when lesion labels are given, ``regions`` (and
        ``regions_lesion_wise``) with regions.

    Raises
    ------
    FileNotFoundError
        A folder does not exist, or predictions are missing (lists the missing cases).
    ValueError
        An option out of range, no reference files, or pairs whose shape or affine differ (one line
        per pair).

    Examples
    --------
    >>> summary = evaluate_folders("preds", "labelsTr", "eval", labels=[1, 2])  # doctest: +SKIP
    """
    options = EvaluationOptions(
        labels=labels, class_names=class_names, tolerance_mm=tolerance_mm, workers=workers, report=report,
        image_dir=image_dir, lesions=LesionOptions(labels=lesion_labels or (), min_size_mm3=lesion_min_size_mm3,
                                                   dilation_vox=lesion_dilation_vox),
        ignore_label=ignore_label, regions=regions,
    )
    return score_folders(pred_dir, ref_dir, out_dir, options)


def score_folders(pred_dir: str | os.PathLike, ref_dir: str | os.PathLike, out_dir: str | os.PathLike,
                  options: EvaluationOptions) -> dict[str, Any]:
    """:func:`evaluate_folders` with its options as one checked :class:`EvaluationOptions`.

    Parameters
    ----------
    pred_dir, ref_dir, out_dir : path-like
        As :func:`evaluate_folders`.
    options : EvaluationOptions
        Labels, names, tolerance, workers, lesion-wise scoring, report.

    Returns
    -------
    summary : dict
        As :func:`evaluate_folders`.

    Raises
    ------
    FileNotFoundError, ValueError
        As :func:`evaluate_folders`.
    """
    pred_dir, ref_dir, out_dir = Path(pred_dir), Path(ref_dir), Path(out_dir)
    if options.image_dir is not None and not options.image_dir.is_dir():
        raise FileNotFoundError(expected("a folder of scans", key="image_dir",
                                         received=Received(f"{options.image_dir} (no such folder)")))
    pairs = match_cases(pred_dir, ref_dir)
    _check_geometry(pairs)
    jobs = [_Job(case, pred, ref, options.labels, options.tolerance_mm, options.lesions, options.ignore_label,
                 options.regions)
            for case, (pred, ref) in pairs.items()]
    results = sorted(parallel_map(_score_job, jobs, workers=options.workers, progress=True, desc="Evaluating"),
                     key=lambda r: r.case_id)
    if options.labels is None:
        options = replace(options, labels=_labels_found(results, ref_dir))
    rows = _rows(results, options)
    summary = summarize(rows, labels=options.labels, class_names=options.class_names)
    summary["tolerance_mm"] = {str(c): options.tolerance(c) for c in options.labels}
    summary["pred_dir"], summary["ref_dir"] = str(pred_dir), str(ref_dir)
    remove_orphaned_temporaries(out_dir, recursive=True)  # of an earlier evaluation killed while writing
    write_csv(out_dir / "per_case.csv", rows, PER_CASE_COLUMNS)
    lesion_rows = []
    if options.lesions.enabled:
        lesion_rows = [{"case": r.case_id, "class": c, "class_name": class_name(options.class_names, c), **r.lesions[c]}
                       for r in results for c in options.lesions.labels]
        write_csv(out_dir / "lesions.csv", lesion_rows, LESION_COLUMNS)
        summary["lesion_wise"] = _lesion_summary(lesion_rows, options)
    if options.regions:
        summary.update(_write_regions(out_dir, results, options))
    write_json(out_dir / "summary.json", summary)
    if options.report:
        write_evaluation_report(out_dir, summary=summary, rows=rows, lesion_rows=lesion_rows, pred_dir=pred_dir,
                                ref_dir=ref_dir, image_dir=options.image_dir)
    return summary


# --- helpers ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    """One case to score in a worker process (pickled)."""

    case_id: str
    pred_path: Path
    ref_path: Path
    labels: tuple[int, ...] | None
    tolerance_mm: float | Mapping[int, float]
    lesions: LesionOptions
    ignore_label: int | None = None
    regions: tuple[Region, ...] = ()


def _score_job(job: _Job) -> CaseResult:
    """Worker entry point: evaluate_case with the case named in any error."""
    try:
        return evaluate_case(job.pred_path, job.ref_path, labels=job.labels, tolerance_mm=job.tolerance_mm,
                             case_id=job.case_id, lesions=job.lesions, ignore_label=job.ignore_label,
                             regions=job.regions)
    except Exception as exc:
        # Exceptions cross the process boundary without their traceback: name the case here.
        message = f"Case {job.case_id!r} (pred {job.pred_path}, ref {job.ref_path}): {exc}"
        try:
            wrapped = type(exc)(message)
        except Exception:  # exception types whose constructor wants other arguments
            wrapped = RuntimeError(message)
        raise wrapped from exc


def _write_regions(out_dir: Path, results: list[CaseResult], options: EvaluationOptions) -> dict[str, Any]:
    """Write ``regions.csv`` (one row per case and region); return the summary's ``regions`` (as its
    ``per_class``) and, with lesion labels, ``regions_lesion_wise`` (means over cases)."""
    rows = [{"case": r.case_id, "region": name, **row, "image_diagonal_mm": r.image_diagonal_mm}
            for r in results for name, row in r.regions.items()]
    write_csv(out_dir / "regions.csv", rows, ("case", "region", *METRIC_NAMES, "image_diagonal_mm"))
    entries: dict[str, Any] = {}
    for g in options.regions:  # each region summarised as one class of its own rows
        region_rows = [{**row, "class": 1} for row in rows if row["region"] == g.name]
        entry = summarize(region_rows, labels=[1], class_names={1: g.name})["per_class"]["1"]
        entries[g.name] = {**entry, "values": list(g.values)}
    summary: dict[str, Any] = {"regions": entries}
    if options.lesions.enabled:
        summary["regions_lesion_wise"] = {g.name: _mean_numbers([r.region_lesions[g.name] for r in results])
                                          for g in options.regions}
    return summary


def _mean_numbers(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """The mean over cases (NaN ignored) of every numeric entry of the rows."""
    keys = [k for k, v in rows[0].items() if isinstance(v, (int, float, np.integer, np.floating))
            and not isinstance(v, (bool, np.bool_))] if rows else []
    return {k: float(np.nanmean([float(r[k]) for r in rows])) for k in keys}


def _lesion_summary(rows: list[dict[str, Any]], options: EvaluationOptions) -> dict[str, Any]:
    """``summary.json["lesion_wise"]`` of the ``lesions.csv`` rows."""
    lesions = options.lesions
    return {
        "labels": list(lesions.labels),
        "min_size_mm3": lesions.min_size_mm3,
        "dilation_vox": lesions.dilation_vox,
        "class_names": {str(c): class_name(options.class_names, c) for c in lesions.labels},
        "definitions": {"lesion": LESION_DEFINITION, "lesion_dice": LESION_DICE_DEFINITION,
                        "pooled": "precision/recall/F1 of the counts summed over cases"},
        "per_class": summarize_lesions(rows, labels=list(lesions.labels)),
    }


def match_cases(pred_dir: Path, ref_dir: Path) -> dict[str, tuple[Path, Path]]:
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


def _rows(results: list[CaseResult], options: EvaluationOptions) -> list[dict[str, Any]]:
    """The ``per_case.csv`` rows: one per (case, scored label)."""
    rows = []
    for result in results:
        for c in options.labels:
            metrics = result.metrics.get(c)
            if metrics is None:
                # Absent from both maps (labels were inferred after scoring): the both-empty row.
                metrics = label_metrics(
                    ConfusionCounts(tp=0, fp=0, fn=0, tn=result.n_voxels),
                    SurfaceDistances.empty(),
                    voxel_volume_ml=float(np.prod(result.spacing_mm)) / 1000.0,
                    tolerance_mm=options.tolerance(c),
                )
            rows.append({
                "case": result.case_id,
                "class": c,
                "class_name": class_name(options.class_names, c),
                **metrics,
                "image_diagonal_mm": result.image_diagonal_mm,
            })
    return rows


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
                received=Received(f"{array.dtype} with fractional or negative values"),
                hint="Is this a probability map?",
            ))
        array = rounded.astype(np.min_scalar_type(int(rounded.max(initial=0))))
    return array


def _short_list(names: list[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
