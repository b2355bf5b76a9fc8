"""Self-contained HTML reports: one file, images embedded as base64 PNG, no scripts, no links out.

- :func:`write_evaluation_report` turns an evaluation folder (``summary.json``, ``per_case.csv``,
  optionally ``lesions.csv``) into ``report.html``: the summary table, the lesion-wise table, the
  per-case tables, and per class the best, median and worst case as slice overlays
  (:mod:`segpipe.reports.overlays`), also written as PNGs under ``overlays/``.
- :func:`write_comparison_report` writes the HTML form of a run comparison
  (``comparison/report.html``): the tables of ``report.md`` and its box plots and curves.

Every number cell carries ``data-*`` attributes naming what it shows (class, metric, statistic),
so tests and scripts can read the tables back.
"""
from __future__ import annotations

import base64
import csv
import html
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from segpipe.errors import Received, expected
from segpipe.io import NIFTI_SUFFIXES, atomic_path, read_json, read_nifti, write_text
from segpipe.reports.overlays import REFERENCE_COLOR, PREDICTION_COLOR, choose_cases, render_overlay

__all__ = [
    "png_data_uri",
    "read_rows",
    "evaluation_report_html",
    "write_evaluation_report",
    "comparison_report_html",
    "write_comparison_report",
    "find_image",
    "REPORT_FILE",
    "OVERLAY_DIR",
]

REPORT_FILE = "report.html"
OVERLAY_DIR = "overlays"
DISTANCES = {"hd", "hd95", "assd"}
_SUMMARY_COLUMNS = (("dice", "Dice"), ("iou", "IoU"), ("hd95", "HD95 (mm)"), ("assd", "ASSD (mm)"),
                    ("nsd", "NSD"))
_PER_CASE_COLUMNS = ("dice", "iou", "precision", "recall", "hd95", "assd", "nsd", "n_ref", "n_pred",
                     "vol_ref_ml", "vol_pred_ml")
_LESION_CASE_COLUMNS = ("n_ref_lesions", "n_pred_lesions", "lesion_tp", "lesion_fn", "lesion_fp",
                        "lesion_precision", "lesion_recall", "lesion_f1", "lesion_dice")
_COUNTS = {"n_ref", "n_pred", "tp", "fp", "fn", "tn", "n_ref_lesions", "n_pred_lesions", "lesion_tp",
           "lesion_fn", "lesion_fp"}

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.6em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: right; }
th { background: #f0f0f0; } td.text, th.text { text-align: left; }
tr.fg td { font-weight: bold; background: #fafafa; } td.best { font-weight: bold; }
figure { margin: 0.8em 0; } figcaption { font-size: 0.85em; color: #444; }
img { max-width: 100%; height: auto; border: 1px solid #ddd; }
.note { font-size: 0.85em; color: #555; } .swatch { display: inline-block; width: 1.2em; height: 0.4em;
vertical-align: middle; margin: 0 0.3em; }
"""


# ---------------------------------------------------------------- building blocks


def png_data_uri(png: bytes) -> str:
    """``data:image/png;base64,...`` of PNG bytes (checked to be a PNG)."""
    if not png.startswith(b"\x89PNG\r\n\x1a\n"):
        raise ValueError(expected("PNG bytes", key="png[:8]", received=png[:8]))
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def read_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a per-case CSV (``per_case.csv``, ``lesions.csv``): numbers as float, ``class`` as int."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key, value in row.items():
            if key in ("case", "class_name"):
                continue
            if key == "class":
                row[key] = int(value)
                continue
            try:
                row[key] = float(value) if value not in ("", None) else math.nan
            except ValueError:
                pass  # a text column: keep it
    return rows


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _number(value: Any, metric: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    value = float(value)
    if metric in _COUNTS or metric in ("n", "n_cases", "missed", "spurious", "both_empty"):
        return f"{value:.0f}"
    if metric in DISTANCES or metric.startswith(("hd", "assd")):
        return f"{value:.2f}"
    return f"{value:.4f}"


def _cell(value: Any, metric: str, **data: Any) -> str:
    attributes = "".join(f' data-{k.replace("_", "-")}="{_e(v)}"' for k, v in data.items())
    return f'<td data-metric="{_e(metric)}"{attributes}>{_number(value, metric)}</td>'


def _stat_cell(stats: Mapping[str, Any] | None, metric: str, **data: Any) -> str:
    """``mean ± std (median)`` with each number in its own span."""
    attributes = "".join(f' data-{k.replace("_", "-")}="{_e(v)}"' for k, v in data.items())
    if not stats or not stats.get("n"):
        return f'<td data-metric="{_e(metric)}"{attributes}>n/a</td>'
    spans = {s: f'<span data-stat="{s}">{_number(stats.get(s), metric)}</span>' for s in ("mean", "std", "median")}
    return (f'<td data-metric="{_e(metric)}"{attributes}>{spans["mean"]} ± {spans["std"]} '
            f'({spans["median"]})</td>')


def _page(title: str, body: Iterable[str]) -> str:
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{_e(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"<h1>{_e(title)}</h1>\n" + "\n".join(body) + "\n</body>\n</html>\n"
    )


def _figure(png: bytes, alt: str, caption: str, *, data: Mapping[str, Any] | None = None) -> str:
    attributes = "".join(f' data-{k.replace("_", "-")}="{_e(v)}"' for k, v in (data or {}).items())
    return (f'<figure{attributes}><img src="{png_data_uri(png)}" alt="{_e(alt)}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>")


# ---------------------------------------------------------------- evaluation report


def evaluation_report_html(
    summary: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]],
    overlays: Sequence[Mapping[str, Any]] = (),
    *,
    lesion_rows: Sequence[Mapping[str, Any]] = (),
    title: str = "Evaluation report",
    notes: Sequence[str] = (),
) -> str:
    """The HTML text of an evaluation report.

    Parameters
    ----------
    summary : dict
        ``summary.json`` (:func:`segpipe.evaluation.summarize`, plus ``lesion_wise`` if computed).
    rows : sequence of dict
        ``per_case.csv`` rows.
    overlays : sequence of dict
        Per picture: ``label``, ``class_name``, ``role``, ``case``, ``dice``, ``hd95``, ``png``
        (bytes), ``file`` (the PNG's name under ``overlays/``).
    lesion_rows : sequence of dict, optional
        ``lesions.csv`` rows.
    title : str, optional
        Page title.
    notes : sequence of str, optional
        Extra lines shown under the title (e.g. where the images came from).
    """
    body = [f'<p class="note">{_e(n)}</p>' for n in notes]
    body += ["<h2>Summary</h2>", _summary_table(summary), _definitions(summary)]
    lesion = summary.get("lesion_wise")
    if lesion:
        body += ["<h2>Lesion-wise metrics</h2>", _lesion_table(lesion)]
    body += ["<h2>Slice overlays</h2>",
             f'<p class="note">Per class the best, median and worst case by Dice (cases with a '
             f'structure in the reference or the prediction). Each view is the slice with the most '
             f'wrongly labelled voxels along that axis. <span class="swatch" style="background:'
             f'{REFERENCE_COLOR}"></span>reference <span class="swatch" style="background:'
             f'{PREDICTION_COLOR}"></span>prediction. PNGs in <code>{OVERLAY_DIR}/</code>.</p>']
    if not overlays:
        body.append('<p class="note">No case has a structure to draw.</p>')
    by_label: dict[int, list[Mapping[str, Any]]] = {}
    for overlay in overlays:
        by_label.setdefault(int(overlay["label"]), []).append(overlay)
    for label, items in by_label.items():
        body.append(f"<h3>class {label} ({_e(items[0]['class_name'])})</h3>")
        for item in items:
            caption = (f"{item['role']}: case {item['case']}, class {item['class_name']}: Dice "
                       f"{_number(item['dice'], 'dice')}, HD95 {_hd95_text(item['hd95'])} "
                       f"({OVERLAY_DIR}/{item['file']})")
            body.append(_figure(item["png"], f"{item['role']} case {item['case']}", caption,
                                data={"class": label, "role": item["role"], "case": item["case"]}))
    body += ["<h2>Per case</h2>", _per_case_table(rows, _PER_CASE_COLUMNS, "per-case")]
    if lesion_rows:
        body += ["<h2>Per case, lesion-wise</h2>", _per_case_table(lesion_rows, _LESION_CASE_COLUMNS, "lesions-per-case")]
    return _page(title, body)


def write_evaluation_report(
    eval_dir: str | os.PathLike,
    *,
    pred_dir: str | os.PathLike | None = None,
    ref_dir: str | os.PathLike | None = None,
    image_dir: str | os.PathLike | None = None,
    title: str | None = None,
    margin_mm: float | None = 20.0,
) -> Path:
    """Write ``EVAL_DIR/report.html`` and ``EVAL_DIR/overlays/*.png`` from an evaluation folder.

    Parameters
    ----------
    eval_dir : path-like
        Holds ``summary.json`` and ``per_case.csv`` (and ``lesions.csv`` with lesion-wise metrics).
    pred_dir, ref_dir : path-like, optional
        Label-map folders. Default: the ``pred_dir`` / ``ref_dir`` recorded in ``summary.json``.
    image_dir : path-like, optional
        Folder of the scans (``CASE_0000.nii.gz`` or ``CASE.nii.gz``; the first channel is drawn).
        Default: the ``images*`` folder beside the ``labels*`` folder of each reference file (or of
        the file a reference links to: ``evaluate.py RUN_DIR`` links the dataset's label maps), as
        in the MSD, nnU-Net and ``images/``+``labels/`` layouts. Without a scan the contours are
        drawn on black.
    title : str, optional
        Page title. Default: ``Evaluation of <pred_dir>``.
    margin_mm : float or None, optional
        Margin around the structure in the overlays; None shows whole slices.

    Returns
    -------
    path : Path
        The written ``report.html``.
    """
    eval_dir = Path(eval_dir)
    summary = read_json(eval_dir / "summary.json")
    rows = read_rows(eval_dir / "per_case.csv")
    lesion_path = eval_dir / "lesions.csv"
    lesion_rows = read_rows(lesion_path) if lesion_path.is_file() else []
    pred_dir = Path(pred_dir if pred_dir is not None else summary.get("pred_dir", ""))
    ref_dir = Path(ref_dir if ref_dir is not None else summary.get("ref_dir", ""))
    for name, folder in (("pred_dir", pred_dir), ("ref_dir", ref_dir)):
        if not folder.is_dir():
            raise FileNotFoundError(expected(f"the folder the evaluation in {eval_dir} scored", key=name,
                                             received=Received(f"{folder} (no such folder)")))
    if image_dir is not None and not Path(image_dir).is_dir():
        raise FileNotFoundError(expected("a folder of scans", key="image_dir",
                                         received=Received(f"{image_dir} (no such folder)")))

    overlays, image_folders, without_image = [], set(), []
    class_names = summary.get("class_names", {})
    out_dir = eval_dir / OVERLAY_DIR
    for label in summary.get("labels", []):
        name = class_names.get(str(label), f"class_{label}")
        for role, row in choose_cases(rows, label):
            case = str(row["case"])
            ref_file = _label_file(ref_dir, case)
            ref_vol = read_nifti(ref_file)
            pred_vol = read_nifti(_label_file(pred_dir, case))
            image = None
            image_path = _image_of(case, ref_file, image_dir)
            if image_path is not None:
                image = read_nifti(image_path).array
                if image.ndim == 4:
                    image = image[..., 0]
                if image.shape != _spatial(ref_vol.array).shape:
                    image = None  # a scan of another geometry cannot sit under these contours
            if image is None:
                without_image.append(case)
            else:
                image_folders.add(str(image_path.parent))
            caption = (f"{case}, {name} ({role}): Dice {_number(row['dice'], 'dice')}, "
                       f"HD95 {_hd95_text(row.get('hd95'))}")
            png = render_overlay(image, _spatial(ref_vol.array) == label, _spatial(pred_vol.array) == label,
                                 spacing_mm=ref_vol.spacing_mm[:3], affine=ref_vol.affine, caption=caption,
                                 margin_mm=margin_mm)
            file = f"{_safe(f'{label}_{name}_{role}_{case}')}.png"
            _write_bytes(out_dir / file, png)
            overlays.append({"label": label, "class_name": name, "role": role, "case": case,
                             "dice": row["dice"], "hd95": row.get("hd95"), "png": png, "file": file})
    notes = [f"Predictions {pred_dir}, references {ref_dir}, {summary.get('n_cases')} cases."]
    if image_folders:
        notes.append(f"Scans from {', '.join(sorted(image_folders))}.")
    if without_image:
        notes.append(f"No scan of the label map's shape found for {', '.join(sorted(set(without_image)))} "
                     "(pass image_dir / --images): those contours are drawn on black.")
    text = evaluation_report_html(summary, rows, overlays, lesion_rows=lesion_rows,
                                  title=title or f"Evaluation of {pred_dir}", notes=notes)
    path = eval_dir / REPORT_FILE
    write_text(path, text)
    return path


def find_image(image_dir: str | os.PathLike, case: str) -> Path | None:
    """The scan of ``case`` in ``image_dir``: ``CASE_0000.nii(.gz)`` (first channel) or ``CASE.nii(.gz)``."""
    for stem in (f"{case}_0000", case):
        for suffix in NIFTI_SUFFIXES:
            path = Path(image_dir) / f"{stem}{suffix}"
            if path.is_file():
                return path
    return None


def _summary_table(summary: Mapping[str, Any]) -> str:
    head = ["<th class='text'>class</th>", "<th class='text'>name</th>", "<th>cases</th>",
            *(f"<th>{_e(title)}<br><small>mean ± std (median)</small></th>" for _, title in _SUMMARY_COLUMNS),
            "<th>HD95, undefined = worst (mm)</th>", "<th>missed</th>", "<th>spurious</th>"]
    lines = ['<table id="summary"><thead><tr>' + "".join(head) + "</tr></thead><tbody>"]
    for value, entry in summary["per_class"].items():
        metrics, worst = entry.get("metrics", {}), entry.get("distances_worst_filled", {})
        cells = [f"<td class='text'>{_e(value)}</td>", f"<td class='text'>{_e(entry['name'])}</td>",
                 _cell(entry["n_cases"], "n_cases", class_=value)]
        cells += [_stat_cell(metrics.get(m), m, class_=value, table="metrics") for m, _ in _SUMMARY_COLUMNS]
        cells.append(_stat_cell(worst.get("hd95"), "hd95", class_=value, table="worst"))
        cells += [_cell(entry["missed"], "missed", class_=value), _cell(entry["spurious"], "spurious", class_=value)]
        lines.append(f'<tr data-class="{_e(value)}">' + "".join(cells) + "</tr>")
    fg = summary.get("foreground_mean", {})
    cells = ["<td class='text'>fg</td>", "<td class='text'>foreground mean</td>", "<td></td>"]
    cells += [_cell(fg.get(m), m, class_="fg", stat="mean") for m, _ in _SUMMARY_COLUMNS]
    cells += [_cell(fg.get("hd95_worst_filled"), "hd95_worst_filled", class_="fg", stat="mean"), "<td></td>", "<td></td>"]
    lines.append('<tr class="fg" data-class="fg">' + "".join(cells) + "</tr>")
    lines.append("</tbody></table>")
    return "\n".join(lines)


def _definitions(summary: Mapping[str, Any]) -> str:
    items = [f"<li><b>{_e(k)}</b>: {_e(v)}</li>" for k, v in summary.get("definitions", {}).items()]
    tolerance = summary.get("tolerance_mm")
    if tolerance:
        items.append(f"<li><b>NSD tolerance (mm)</b>: {_e(', '.join(f'{k}: {v}' for k, v in tolerance.items()))}</li>")
    items.append("<li><b>missed / spurious</b>: cases with a reference but an empty prediction / a "
                 "prediction but an empty reference; their HD95 is undefined (n/a in the per-case table)</li>")
    return '<ul class="note">' + "".join(items) + "</ul>"


def _lesion_table(lesion: Mapping[str, Any]) -> str:
    head = ["<th class='text'>class</th>", "<th class='text'>name</th>", "<th>cases</th>",
            "<th>lesion-wise Dice<br><small>mean ± std (median)</small></th>",
            "<th>lesion F1<br><small>mean ± std (median)</small></th>",
            "<th>reference lesions</th>", "<th>predicted components</th>", "<th>TP</th>", "<th>FN</th>",
            "<th>FP</th>", "<th>precision (pooled)</th>", "<th>recall (pooled)</th>", "<th>F1 (pooled)</th>"]
    lines = ['<table id="lesions"><thead><tr>' + "".join(head) + "</tr></thead><tbody>"]
    names = lesion.get("class_names", {})
    for value, entry in lesion["per_class"].items():
        cells = [f"<td class='text'>{_e(value)}</td>", f"<td class='text'>{_e(names.get(value, value))}</td>",
                 _cell(entry["n_cases"], "n_cases", class_=value),
                 _stat_cell(entry["lesion_dice"], "lesion_dice", class_=value),
                 _stat_cell(entry["lesion_f1"], "lesion_f1", class_=value)]
        cells += [_cell(entry[k], k, class_=value) for k in
                  ("n_ref_lesions", "n_pred_lesions", "lesion_tp", "lesion_fn", "lesion_fp",
                   "pooled_precision", "pooled_recall", "pooled_f1")]
        lines.append(f'<tr data-class="{_e(value)}">' + "".join(cells) + "</tr>")
    lines.append("</tbody></table>")
    definitions = lesion.get("definitions", {})
    items = [f"<li><b>{_e(k)}</b>: {_e(v)}</li>" for k, v in definitions.items()]
    if "min_size_mm3" in lesion:
        items.append(f"<li><b>minimum lesion size</b>: {_e(lesion['min_size_mm3'])} mm³</li>")
    if "dilation_vox" in lesion:
        items.append(f"<li><b>matching reach</b>: {_e(lesion['dilation_vox'])} voxels (0: by overlap)</li>")
    return "\n".join(lines) + '<ul class="note">' + "".join(items) + "</ul>"


def _per_case_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], table_id: str) -> str:
    present = [c for c in columns if rows and c in rows[0]]
    head = "<th class='text'>case</th><th class='text'>class</th>" + "".join(f"<th>{_e(c)}</th>" for c in present)
    lines = [f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>']
    for row in rows:
        name = row.get("class_name") or row["class"]
        cells = [f"<td class='text'>{_e(row['case'])}</td>", f"<td class='text'>{_e(name)}</td>"]
        cells += [_cell(row[c], c) for c in present]
        lines.append(f'<tr data-case="{_e(row["case"])}" data-class="{_e(row["class"])}">' + "".join(cells) + "</tr>")
    lines.append("</tbody></table>")
    return "\n".join(lines)


def _hd95_text(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a (a mask is empty)"
    return f"{float(value):.2f} mm"


def _image_of(case: str, ref_file: Path, image_dir: str | os.PathLike | None) -> Path | None:
    """The scan of ``case``: in ``image_dir``, else beside the label folder of ``ref_file`` or of its link target."""
    if image_dir is not None:
        return find_image(image_dir, case)
    for folder in dict.fromkeys((ref_file.parent, ref_file.resolve().parent)):
        images = _sibling_image_dir(folder)
        found = find_image(images, case) if images is not None else None
        if found is not None:
            return found
    return None


def _sibling_image_dir(ref_dir: Path) -> Path | None:
    """``imagesTr`` beside ``labelsTr`` (``labelsTs`` -> ``imagesTs``, ``labels`` -> ``images``)."""
    if ref_dir.name.startswith("labels"):
        candidate = ref_dir.with_name("images" + ref_dir.name[len("labels"):])
        if candidate.is_dir():
            return candidate
    return None


def _label_file(folder: Path, case: str) -> Path:
    for suffix in NIFTI_SUFFIXES:
        if (folder / f"{case}{suffix}").is_file():
            return folder / f"{case}{suffix}"
    raise FileNotFoundError(expected(f"a label map of case {case!r} ({', '.join(NIFTI_SUFFIXES)})", key="folder",
                                     received=Received(f"{folder} (has none)")))


def _spatial(array: np.ndarray) -> np.ndarray:
    return array[..., 0] if array.ndim == 4 and array.shape[3] == 1 else array


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def _write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


# ---------------------------------------------------------------- comparison report


def comparison_report_html(
    result: Mapping[str, Any],
    *,
    runs: Mapping[str, Sequence[str]],
    metrics: Sequence[str],
    lower_is_better: Iterable[str] = (),
    images: Sequence[tuple[str, bytes]] = (),
    title: str = "Comparison",
    extra_html: str = "",
) -> str:
    """The HTML text of a run comparison (:func:`segpipe.compare.compare` result).

    Parameters
    ----------
    result : dict
        ``{"reference", "configs", "summary", "tests"}`` as ``comparison.json`` holds it.
    runs : dict of str to list of str
        Per configuration, its run folders.
    metrics : sequence of str
        The metric columns, in order.
    lower_is_better : iterable of str, optional
        Metrics where the lowest mean is the best (distances).
    images : sequence of (title, PNG bytes)
        Plots to embed (box plots, training curves).
    title : str, optional
        Page title.
    extra_html : str, optional
        A section shown after the list of configurations (the recommendation,
        :func:`segpipe.reports.recommendation.recommendation_html`).
    """
    metrics, lower_is_better = tuple(metrics), set(lower_is_better)
    body = ["<h2>Configurations</h2>", "<ul>"]
    body += [f"<li><code>{_e(name)}</code>{' (reference)' if name == result['reference'] else ''}: "
             + ", ".join(f"<code>{_e(r)}</code>" for r in dirs) + "</li>" for name, dirs in runs.items()]
    body += ["</ul>", '<p class="note">Per class: mean ± std (median) over cases; best mean in bold. '
             "HD95/ASSD in mm, with undefined distances (one mask empty) counted as the image diagonal.</p>"]
    if extra_html:
        body.append(extra_html)
    summary = result["summary"]
    labels = list(dict.fromkeys(s["class"] for s in summary))
    for label in [*labels, "fg"]:
        if label == "fg":
            heading = "foreground mean"
        else:
            heading = f"class {label} ({next(s['class_name'] for s in summary if s['class'] == label)})"
        means = {}
        for config in result["configs"]:
            for metric in metrics:
                picked = [s["mean"] for s in summary if s["config"] == config and s["metric"] == metric
                          and (label == "fg" or s["class"] == label)]
                means[config, metric] = float(np.mean(picked)) if picked else math.nan
        best = {}
        for metric in metrics:
            values = [means[c, metric] for c in result["configs"] if not math.isnan(means[c, metric])]
            best[metric] = (min if metric in lower_is_better else max)(values) if values else math.nan
        head = "<th class='text'>config</th>" + "".join(f"<th>{_e(m)}</th>" for m in metrics)
        lines = [f"<h2>{_e(heading)}</h2>",
                 f'<table class="comparison" data-class="{_e(label)}"><thead><tr>{head}</tr></thead><tbody>']
        for config in result["configs"]:
            cells = [f"<td class='text'>{_e(config)}</td>"]
            for metric in metrics:
                mark = ' class="best"' if means[config, metric] == best[metric] else ""
                if label == "fg":
                    cells.append(f'<td data-metric="{metric}" data-stat="mean"{mark}>{_number(means[config, metric], metric)}</td>')
                    continue
                (s,) = [s for s in summary if s["config"] == config and s["metric"] == metric and s["class"] == label]
                cell = _stat_cell({**s, "n": s.get("n", 1)}, metric, config=config)
                cells.append(cell.replace("<td ", f"<td{mark} ", 1) if mark else cell)
            lines.append(f'<tr data-config="{_e(config)}">' + "".join(cells) + "</tr>")
        lines.append("</tbody></table>")
        body += lines
    if result.get("tests"):
        body += [f"<h2>Paired tests against <code>{_e(result['reference'])}</code></h2>",
                 '<p class="note">Wilcoxon signed-rank over cases, two-sided; wins/losses = cases where the '
                 "config is better/worse than the reference; p (Holm) corrected over all rows of this table.</p>"]
        head = "".join(f"<th>{h}</th>" for h in ("config", "class", "metric", "n", "wins", "losses", "ties", "p", "p (Holm)"))
        rows = [f'<table id="tests"><thead><tr>{head}</tr></thead><tbody>']
        for t in result["tests"]:
            rows.append(
                f'<tr data-config="{_e(t["config"])}" data-class="{_e(t["class"])}" data-metric="{_e(t["metric"])}">'
                f"<td class='text'>{_e(t['config'])}</td><td class='text'>{_e(t['class_name'])}</td>"
                f"<td class='text'>{_e(t['metric'])}</td><td>{t['n']}</td><td>{t['wins']}</td>"
                f"<td>{t['losses']}</td><td>{t['ties']}</td><td data-stat='p'>{t['p']:.4g}</td>"
                f"<td data-stat='p_holm'>{t['p_holm']:.4g}</td></tr>")
        rows.append("</tbody></table>")
        body += rows
    if images:
        body.append("<h2>Plots</h2>")
        body += [_figure(png, caption, caption) for caption, png in images]
    return _page(title, body)


def write_comparison_report(
    out_dir: str | os.PathLike,
    result: Mapping[str, Any],
    *,
    runs: Mapping[str, Sequence[str]],
    metrics: Sequence[str],
    lower_is_better: Iterable[str] = (),
    plots: Sequence[tuple[str, str]] = (
        ("Dice per case (box plots)", "boxplot_dice.png"),
        ("HD95 per case (box plots, mm)", "boxplot_hd95.png"),
        ("Training curves", "training_curves.png"),
    ),
    extra_html: str = "",
) -> Path:
    """Write ``OUT_DIR/report.html`` with the comparison tables and the PNGs of ``plots`` found in ``out_dir``."""
    out_dir = Path(out_dir)
    images = [(caption, (out_dir / name).read_bytes()) for caption, name in plots if (out_dir / name).is_file()]
    path = out_dir / REPORT_FILE
    write_text(path, comparison_report_html(result, runs=runs, metrics=metrics, lower_is_better=lower_is_better,
                                            images=images, extra_html=extra_html))
    return path
