"""Self-contained HTML reports: one file, images embedded as base64 PNG, no scripts, no links out.

- :func:`write_evaluation_report` writes an evaluation folder's ``report.html``: the summary table,
  the lesion-wise table, the per-case tables, and per class the best, median and worst case as
  slice overlays (:mod:`segpipe.reports.overlays`), also written as PNGs under ``overlays/``.
- :func:`write_comparison_report` writes the HTML form of a run comparison
  (``comparison/report.html``): the tables of ``report.md`` and its box plots and curves.

The tables are :class:`~segpipe.reports.tables.Table` models built once by
:mod:`segpipe.reports.evaluation_tables` (the same the Markdown shows). Every number cell carries
``data-*`` attributes naming what it shows (class, metric, statistic), so tests and scripts can read
the tables back.
"""
from __future__ import annotations

import base64
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from segpipe.data.layouts import image_of_label, label_file
from segpipe.errors import Received, expected
from segpipe.io import atomic_path, read_nifti, write_text
from segpipe.reports.evaluation_tables import (
    COMPARISON_NOTE,
    LESION_CASE_COLUMNS,
    PER_CASE_COLUMNS,
    lesion_table,
    per_case_table,
    summary_table,
)
from segpipe.reports.overlays import PREDICTION_COLOR, REFERENCE_COLOR, choose_cases, render_overlay
from segpipe.reports.tables import Table, data_attributes, escape, number_text, to_html
from segpipe.tables import read_csv, read_json

__all__ = [
    "png_data_uri",
    "evaluation_report_html",
    "write_evaluation_report",
    "comparison_report_html",
    "write_comparison_report",
    "REPORT_FILE",
    "OVERLAY_DIR",
]

REPORT_FILE = "report.html"
OVERLAY_DIR = "overlays"
TEXT_COLUMNS = ("case", "class_name")  # of per_case.csv and lesions.csv: ids and names, never numbers

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


def _page(title: str, body: Iterable[str]) -> str:
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"<h1>{escape(title)}</h1>\n" + "\n".join(body) + "\n</body>\n</html>\n"
    )


def _figure(png: bytes, alt: str, caption: str, *, data: Mapping[str, Any] | None = None) -> str:
    return (f'<figure{data_attributes(data or {})}><img src="{png_data_uri(png)}" alt="{escape(alt)}">'
            f"<figcaption>{escape(caption)}</figcaption></figure>")


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
        ``summary.json`` (:func:`segpipe.evaluation.summary.summarize`, plus ``lesion_wise`` if computed).
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

    Returns
    -------
    text : str
        The page.
    """
    body = [f'<p class="note">{escape(n)}</p>' for n in notes]
    body += ["<h2>Summary</h2>", to_html(summary_table(summary)), _definitions(summary)]
    lesion = summary.get("lesion_wise")
    if lesion:
        body += ["<h2>Lesion-wise metrics</h2>", to_html(lesion_table(lesion))]
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
        body.append(f"<h3>class {label} ({escape(items[0]['class_name'])})</h3>")
        for item in items:
            caption = (f"{item['role']}: case {item['case']}, class {item['class_name']}: Dice "
                       f"{number_text(item['dice'])}, HD95 {_hd95_text(item['hd95'])} "
                       f"({OVERLAY_DIR}/{item['file']})")
            body.append(_figure(item["png"], f"{item['role']} case {item['case']}", caption,
                                data={"class": label, "role": item["role"], "case": item["case"]}))
    body += ["<h2>Per case</h2>", to_html(per_case_table(rows, PER_CASE_COLUMNS, "per-case"))]
    if lesion_rows:
        body += ["<h2>Per case, lesion-wise</h2>",
                 to_html(per_case_table(lesion_rows, LESION_CASE_COLUMNS, "lesions-per-case"))]
    return _page(title, body)


def write_evaluation_report(
    eval_dir: str | os.PathLike,
    *,
    summary: Mapping[str, Any] | None = None,
    rows: Sequence[Mapping[str, Any]] | None = None,
    lesion_rows: Sequence[Mapping[str, Any]] | None = None,
    pred_dir: str | os.PathLike | None = None,
    ref_dir: str | os.PathLike | None = None,
    image_dir: str | os.PathLike | None = None,
    title: str | None = None,
    margin_mm: float | None = 20.0,
) -> Path:
    """Write ``EVAL_DIR/report.html`` and ``EVAL_DIR/overlays/*.png`` for an evaluation.

    Parameters
    ----------
    eval_dir : path-like
        The evaluation folder.
    summary, rows, lesion_rows : optional
        The evaluation's summary, ``per_case.csv`` rows and ``lesions.csv`` rows, as the evaluation
        just computed them. Default: read from ``summary.json``, ``per_case.csv`` and (if there)
        ``lesions.csv`` in ``eval_dir`` (:mod:`segpipe.tables`: NaN as written), to redraw a report.
    pred_dir, ref_dir : path-like, optional
        Label-map folders. Default: the ``pred_dir`` / ``ref_dir`` recorded in the summary.
    image_dir : path-like, optional
        Folder of the scans (``CASE_0000.nii.gz`` or ``CASE.nii.gz``; the first channel is drawn).
        Default: the ``images*`` folder beside the ``labels*`` folder of each reference file (or of
        the file a reference links to: ``evaluate.py RUN_DIR`` links the dataset's label maps), as
        in the MSD, nnU-Net and ``images/``+``labels/`` layouts
        (:func:`segpipe.data.layouts.image_of_label`). Without a scan the contours are drawn on black.
    title : str, optional
        Page title. Default: ``Evaluation of <pred_dir>``.
    margin_mm : float or None, optional
        Margin around the structure in the overlays; None shows whole slices.

    Returns
    -------
    path : Path
        The written ``report.html``.

    Raises
    ------
    FileNotFoundError
        A label-map folder or ``image_dir`` does not exist.
    """
    eval_dir = Path(eval_dir)
    if summary is None:
        summary = read_json(eval_dir / "summary.json")
    if rows is None:
        rows = read_csv(eval_dir / "per_case.csv", text=TEXT_COLUMNS)
    if lesion_rows is None:
        lesion_path = eval_dir / "lesions.csv"
        lesion_rows = read_csv(lesion_path, text=TEXT_COLUMNS) if lesion_path.is_file() else []
    pred_dir = Path(pred_dir if pred_dir is not None else summary.get("pred_dir", ""))
    ref_dir = Path(ref_dir if ref_dir is not None else summary.get("ref_dir", ""))
    for name, folder in (("pred_dir", pred_dir), ("ref_dir", ref_dir)):
        if not folder.is_dir():
            raise FileNotFoundError(expected(f"the folder the evaluation in {eval_dir} scored", key=name,
                                             received=Received(f"{folder} (no such folder)")))
    if image_dir is not None and not Path(image_dir).is_dir():
        raise FileNotFoundError(expected("a folder of scans", key="image_dir",
                                         received=Received(f"{image_dir} (no such folder)")))
    overlays, image_folders, without_image = _draw_overlays(summary, rows, eval_dir / OVERLAY_DIR, pred_dir=pred_dir,
                                                            ref_dir=ref_dir, image_dir=image_dir, margin_mm=margin_mm)
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


def _draw_overlays(summary: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], out_dir: Path, *, pred_dir: Path,
                   ref_dir: Path, image_dir: str | os.PathLike | None, margin_mm: float | None
                   ) -> tuple[list[dict[str, Any]], set[str], list[str]]:
    """Draw and write the best, median and worst case of every class; returns (overlays, scan folders used,
    cases drawn without a scan)."""
    overlays, image_folders, without_image = [], set(), []
    class_names = summary.get("class_names", {})
    for label in summary.get("labels", []):
        name = class_names.get(str(label), f"class_{label}")
        for role, row in choose_cases(rows, label):
            case = str(row["case"])
            ref_file = label_file(ref_dir, case)
            ref_vol = read_nifti(ref_file)
            pred_vol = read_nifti(label_file(pred_dir, case))
            image = None
            image_path = image_of_label(case, ref_file, image_dir)
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
            caption = f"{case}, {name} ({role}): Dice {number_text(row['dice'])}, HD95 {_hd95_text(row.get('hd95'))}"
            png = render_overlay(image, _spatial(ref_vol.array) == label, _spatial(pred_vol.array) == label,
                                 spacing_mm=ref_vol.spacing_mm[:3], affine=ref_vol.affine, caption=caption,
                                 margin_mm=margin_mm)
            file = f"{_safe(f'{label}_{name}_{role}_{case}')}.png"
            _write_bytes(out_dir / file, png)
            overlays.append({"label": label, "class_name": name, "role": role, "case": case,
                             "dice": row["dice"], "hd95": row.get("hd95"), "png": png, "file": file})
    return overlays, image_folders, without_image


def _definitions(summary: Mapping[str, Any]) -> str:
    items = [f"<li><b>{escape(k)}</b>: {escape(v)}</li>" for k, v in summary.get("definitions", {}).items()]
    tolerance = summary.get("tolerance_mm")
    if tolerance:
        shown = ", ".join(f"{k}: {v}" for k, v in tolerance.items())
        items.append(f"<li><b>NSD tolerance (mm)</b>: {escape(shown)}</li>")
    items.append("<li><b>missed / spurious</b>: cases with a reference but an empty prediction / a "
                 "prediction but an empty reference; their HD95 is undefined (n/a in the per-case table)</li>")
    return '<ul class="note">' + "".join(items) + "</ul>"


def _hd95_text(value: Any) -> str:
    text = number_text(value, ".2f")
    return "n/a (a mask is empty)" if text == "n/a" else f"{text} mm"


def _spatial(array: np.ndarray) -> np.ndarray:
    return array[..., 0] if array.ndim == 4 and array.shape[3] == 1 else array


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def _write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


# ---------------------------------------------------------------- comparison report


def comparison_report_html(
    tables: Sequence[Table],
    *,
    tests: Table | None = None,
    runs: Mapping[str, Sequence[str]],
    reference: str,
    images: Sequence[tuple[str, bytes]] = (),
    title: str = "Comparison",
    extra_html: str = "",
) -> str:
    """The HTML text of a run comparison.

    Parameters
    ----------
    tables : sequence of Table
        Per class and the foreground mean (:func:`segpipe.reports.evaluation_tables.comparison_tables`).
    tests : Table, optional
        The paired tests (:func:`segpipe.reports.evaluation_tables.tests_table`).
    runs : dict of str to list of str
        Per configuration, its run folders.
    reference : str
        The configuration the others are tested against.
    images : sequence of (title, PNG bytes)
        Plots to embed (box plots, training curves).
    title : str, optional
        Page title.
    extra_html : str, optional
        A section shown after the list of configurations (the recommendation,
        :func:`segpipe.reports.recommendation.recommendation_html`).

    Returns
    -------
    text : str
        The page.
    """
    body = ["<h2>Configurations</h2>", "<ul>"]
    body += [f"<li><code>{escape(name)}</code>{' (reference)' if name == reference else ''}: "
             + ", ".join(f"<code>{escape(r)}</code>" for r in dirs) + "</li>" for name, dirs in runs.items()]
    body += ["</ul>", f'<p class="note">{escape(COMPARISON_NOTE)}</p>']
    if extra_html:
        body.append(extra_html)
    body += [to_html(table) for table in tables]
    if tests is not None:
        body.append(to_html(tests))
    if images:
        body.append("<h2>Plots</h2>")
        body += [_figure(png, caption, caption) for caption, png in images]
    return _page(title, body)


def write_comparison_report(
    out_dir: str | os.PathLike,
    tables: Sequence[Table],
    *,
    tests: Table | None = None,
    runs: Mapping[str, Sequence[str]],
    reference: str,
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
    write_text(path, comparison_report_html(tables, tests=tests, runs=runs, reference=reference, images=images,
                                            extra_html=extra_html))
    return path
