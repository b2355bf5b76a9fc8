"""The tables of evaluations and comparisons, built once as :class:`~segpipe.reports.tables.Table`.

Each builder turns a result (``summary.json``, ``summary["lesion_wise"]``, ``per_case.csv`` rows,
``comparison.json``) into table models; the CLI and ``report.md`` print them with
:func:`~segpipe.reports.tables.to_markdown`, ``report.html`` with :func:`~segpipe.reports.tables.to_html`.
Whatever is computed for display (the foreground mean over classes of a comparison, the best value of
a column) is computed here, once, with one NaN rule: an undefined value (NaN) is left out of a mean
(the mean of none is NaN) and is never the best.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from segpipe.reports.tables import Cell, Column, Row, Stat, Table, metric_spec, to_markdown

__all__ = [
    "summary_table",
    "lesion_table",
    "per_case_table",
    "comparison_tables",
    "tests_table",
    "format_summary_markdown",
    "format_lesion_markdown",
    "comparison_markdown",
    "COMPARISON_NOTE",
    "PER_CASE_COLUMNS",
    "LESION_CASE_COLUMNS",
]

# (key in the summary, column title) of the evaluation summary; "hd95_worst" is the worst-filled HD95.
_SUMMARY_COLUMNS = (("dice", "dice"), ("iou", "iou"), ("hd95", "hd95 (mm)"),
                    ("hd95_worst", "hd95, undefined = worst (mm)"), ("assd", "assd (mm)"), ("nsd", "nsd"))
_SHOW_COVERAGE = {"hd95", "assd"}  # defined only where both masks are non-empty: show (k/n)
PER_CASE_COLUMNS = ("dice", "iou", "precision", "recall", "hd95", "assd", "nsd", "n_ref", "n_pred",
                    "vol_ref_ml", "vol_pred_ml")
LESION_CASE_COLUMNS = ("n_ref_lesions", "n_pred_lesions", "lesion_tp", "lesion_fn", "lesion_fp",
                       "lesion_precision", "lesion_recall", "lesion_f1", "lesion_dice")
_STAT_NOTE = "mean ± std (median)"
COMPARISON_NOTE = ("Per class: mean ± std (median) over cases; best mean in bold. HD95/ASSD in mm, with undefined "
                   "distances (one mask empty) counted as the image diagonal.")


def _count(value: Any, metric: str, **data: Any) -> Cell:
    return Cell(value, metric_spec(metric), {"metric": metric, **data})


# ---------------------------------------------------------------- evaluation of folders


def summary_table(summary: Mapping[str, Any]) -> Table:
    """Per class the main metrics (mean ± std (median)), missed and spurious cases; then the foreground mean.

    Parameters
    ----------
    summary : dict
        What :func:`segpipe.evaluation.summary.summarize` returns (``summary.json``).

    Returns
    -------
    table : Table
        HTML id ``summary``; cells named by ``data-class``, ``data-metric``, ``data-table``
        (``metrics`` or ``worst``: NaN distances counted as the image diagonal).
    """
    columns = [Column("class", text=True), Column("name", text=True)]
    columns += [Column(title, _STAT_NOTE) for _, title in _SUMMARY_COLUMNS]
    columns += [Column("missed"), Column("spurious"), Column("cases")]
    rows = []
    for value, entry in summary["per_class"].items():
        metrics, worst = entry.get("metrics", {}), entry.get("distances_worst_filled", {})
        cells = [Cell(str(value)), Cell(str(entry["name"]))]
        for key, _ in _SUMMARY_COLUMNS:
            metric, table, stats = ("hd95", "worst", worst.get("hd95")) if key == "hd95_worst" else (
                key, "metrics", metrics.get(key))
            stat = Stat.of_mapping(stats, of=entry["n_cases"] if key in _SHOW_COVERAGE else None)
            cells.append(Cell(stat, metric_spec(metric), {"metric": metric, "class": value, "table": table}))
        cells += [_count(entry[k], k, **{"class": value}) for k in ("missed", "spurious", "n_cases")]
        rows.append(Row(cells, {"class": value}))
    fg = summary.get("foreground_mean", {})
    cells = [Cell("fg"), Cell("foreground mean", strong=True)]
    for key, _ in _SUMMARY_COLUMNS:
        metric = "hd95_worst_filled" if key == "hd95_worst" else key
        cells.append(Cell(fg.get(metric), metric_spec(metric), {"metric": metric, "class": "fg", "stat": "mean"}))
    cells += [Cell(""), Cell(""), Cell("")]
    rows.append(Row(cells, {"class": "fg"}, css_class="fg"))
    tolerance = summary.get("tolerance_mm")
    tau = f"NSD at tolerance_mm={_compact(tolerance)}; " if tolerance else ""
    note = (f"{summary['n_cases']} cases, mean ± std (median). {tau}hd95 = max of the two directed 95th "
            f"percentiles. (k/n): over the k of n cases where both masks are non-empty; "
            f"'undefined = worst' counts the others as the image diagonal.")
    return Table(columns, rows, notes=[note], html_id="summary")


def lesion_table(lesion_wise: Mapping[str, Any]) -> Table:
    """Per class lesion-wise Dice and F1 (mean ± std (median) over cases), lesion counts and pooled detection.

    Parameters
    ----------
    lesion_wise : dict
        ``summary["lesion_wise"]`` (:func:`segpipe.evaluation.folders.evaluate_folders`).

    Returns
    -------
    table : Table
        HTML id ``lesions``.
    """
    columns = [Column("class", text=True), Column("name", text=True), Column("cases"),
               Column("lesion Dice", _STAT_NOTE), Column("lesion F1", _STAT_NOTE), Column("ref lesions"),
               Column("predicted components"), Column("TP"), Column("FN"), Column("FP"),
               Column("precision (pooled)"), Column("recall (pooled)"), Column("F1 (pooled)")]
    names = lesion_wise.get("class_names", {})
    rows = []
    for value, entry in lesion_wise["per_class"].items():
        cells = [Cell(str(value)), Cell(str(names.get(value, value))),
                 _count(entry["n_cases"], "n_cases", **{"class": value})]
        cells += [Cell(Stat.of_mapping(entry[k]), ".4f", {"metric": k, "class": value})
                  for k in ("lesion_dice", "lesion_f1")]
        cells += [_count(entry[k], k, **{"class": value}) for k in
                  ("n_ref_lesions", "n_pred_lesions", "lesion_tp", "lesion_fn", "lesion_fp",
                   "pooled_precision", "pooled_recall", "pooled_f1")]
        rows.append(Row(cells, {"class": value}))
    definitions = lesion_wise.get("definitions", {})
    notes = [f"{k}: {v}" for k, v in definitions.items()]
    if "min_size_mm3" in lesion_wise:
        notes.append(f"minimum lesion size: {lesion_wise['min_size_mm3']:g} mm³")
    if "dilation_vox" in lesion_wise:
        notes.append(f"matching reach: {lesion_wise['dilation_vox']} voxels (0: by overlap)")
    return Table(columns, rows, notes=notes, html_id="lesions")


def per_case_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], html_id: str) -> Table:
    """One row per (case, class) with the ``columns`` the rows have (``per_case.csv``, ``lesions.csv``)."""
    present = [c for c in columns if rows and c in rows[0]]
    table_rows = []
    for row in rows:
        cells = [Cell(str(row["case"])), Cell(str(row.get("class_name") or row["class"]))]
        cells += [Cell(row[c], metric_spec(c), {"metric": c}) for c in present]
        table_rows.append(Row(cells, {"case": row["case"], "class": row["class"]}))
    return Table([Column("case", text=True), Column("class", text=True), *(Column(c) for c in present)],
                 table_rows, html_id=html_id)


def format_summary_markdown(summary: Mapping[str, Any]) -> str:
    """:func:`summary_table` as Markdown (what ``evaluate.py`` prints)."""
    return to_markdown(summary_table(summary))


def format_lesion_markdown(lesion_wise: Mapping[str, Any]) -> str:
    """:func:`lesion_table` as Markdown."""
    return to_markdown(lesion_table(lesion_wise))


# ---------------------------------------------------------------- comparison of runs


def comparison_tables(result: Mapping[str, Any], *, metrics: Sequence[str],
                      lower_is_better: Iterable[str] = ()) -> list[Table]:
    """One table per class (configs × metrics, mean ± std (median)), then the foreground mean over classes.

    Parameters
    ----------
    result : dict
        :func:`segpipe.evaluation.compare.compare`'s result (``comparison.json``): ``configs`` and
        ``summary`` rows (``config``, ``class``, ``class_name``, ``metric``, ``n``, ``mean``, ``std``,
        ``median``).
    metrics : sequence of str
        The metric columns, in order.
    lower_is_better : iterable of str, optional
        Metrics whose lowest mean is the best (distances); for the others the highest.

    Returns
    -------
    tables : list of Table
        Titled ``class <label> (<name>)`` and ``foreground mean``; the best mean of each column is
        marked. The foreground mean of a config is the mean of its class means that are defined.
    """
    lower_is_better = set(lower_is_better)
    summary, configs = result["summary"], list(result["configs"])
    entries = {(s["config"], s["class"], s["metric"]): s for s in summary}
    labels = list(dict.fromkeys(s["class"] for s in summary))
    names = {s["class"]: s["class_name"] for s in summary}
    tables = []
    for label in [*labels, "fg"]:
        if label == "fg":
            means = {(c, m): _mean_of_defined([entries[c, v, m]["mean"] for v in labels if (c, v, m) in entries])
                     for c in configs for m in metrics}
        else:
            means = {(c, m): float(entries[c, label, m]["mean"]) for c in configs for m in metrics}
        best = {m: _best([means[c, m] for c in configs], lower=m in lower_is_better) for m in metrics}
        rows = []
        for config in configs:
            cells = [Cell(config)]
            for metric in metrics:
                is_best = means[config, metric] == best[metric]
                if label == "fg":
                    cells.append(Cell(means[config, metric], metric_spec(metric), {"metric": metric, "stat": "mean"},
                                      best=is_best))
                else:
                    s = entries[config, label, metric]
                    cells.append(Cell(Stat(s["mean"], s["std"], s["median"], int(s.get("n", 1))), metric_spec(metric),
                                      {"metric": metric, "config": config}, best=is_best))
            rows.append(Row(cells, {"config": config}))
        title = "foreground mean" if label == "fg" else f"class {label} ({names[label]})"
        tables.append(Table([Column("config", text=True), *(Column(m) for m in metrics)], rows, title=title,
                            css_class="comparison", data={"class": label}))
    return tables


def tests_table(result: Mapping[str, Any]) -> Table | None:
    """The paired tests of every config against the reference (None when there are none)."""
    if not result.get("tests"):
        return None
    columns = [Column(t, text=t in ("config", "class", "metric"))
               for t in ("config", "class", "metric", "n", "wins", "losses", "ties", "p", "p (Holm)")]
    rows = []
    for t in result["tests"]:
        cells = [Cell(str(t["config"])), Cell(str(t["class_name"])), Cell(str(t["metric"]))]
        cells += [Cell(t[k], ".0f") for k in ("n", "wins", "losses", "ties")]
        cells += [Cell(t["p"], ".4g", {"stat": "p"}), Cell(t["p_holm"], ".4g", {"stat": "p_holm"})]
        rows.append(Row(cells, {"config": t["config"], "class": t["class"], "metric": t["metric"]}))
    note = ("Wilcoxon signed-rank over cases, two-sided; wins/losses = cases where the config is better/worse "
            "than the reference; p (Holm) corrected over all rows of this table.")
    return Table(columns, rows, title=f"Paired tests against `{result['reference']}`", notes=[note], html_id="tests")


def comparison_markdown(tables: Sequence[Table], tests: Table | None) -> str:
    """The comparison's tables as Markdown sections (``report.md``, what ``evaluate.py --compare`` prints)."""
    sections = [to_markdown(t) + "\n" for t in [*tables, *([tests] if tests is not None else [])]]
    return "\n".join(sections)


def _mean_of_defined(values: Sequence[float]) -> float:
    defined = [float(v) for v in values if not math.isnan(float(v))]
    return float(np.mean(defined)) if defined else math.nan


def _best(values: Sequence[float], *, lower: bool) -> float:
    defined = [v for v in values if not math.isnan(v)]
    return (min if lower else max)(defined) if defined else math.nan


def _compact(tolerance: Mapping[str, float]) -> str:
    values = set(tolerance.values())
    if len(values) == 1:
        return f"{values.pop():g}"
    return ", ".join(f"{k}: {v:g}" for k, v in tolerance.items())
