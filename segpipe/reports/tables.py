"""One table model, rendered as Markdown (the CLI, ``report.md``) and as HTML (``report.html``).

A :class:`Table` holds what is shown, already computed: cells of text, numbers or statistics
(:class:`Stat`: mean ± std (median), with ``(k/n)`` when a statistic covers only some cases), which
cell is the best of its column, and the ``data-*`` attributes that name each HTML cell (so tests and
scripts can read the numbers back). :func:`to_markdown` and :func:`to_html` only lay it out: both
show the same numbers with the same digits, and both write an undefined value (NaN or None) as
``n/a``. Builders of segpipe's tables: :mod:`segpipe.reports.evaluation_tables`.

Examples
--------
>>> table = Table([Column("config", text=True), Column("dice")],
...               [Row([Cell("a"), Cell(Stat(0.5, 0.1, 0.52, 3), best=True)]),
...                Row([Cell("b"), Cell(Stat(0.4, 0.2, 0.41, 3))])])
>>> print(to_markdown(table))
| config | dice |
|---|---|
| a | **0.5000 ± 0.1000 (0.5200)** |
| b | 0.4000 ± 0.2000 (0.4100) |
"""
from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from segpipe.errors import Received, expected

__all__ = ["Stat", "Cell", "Column", "Row", "Table", "number_text", "metric_spec", "to_markdown", "to_html",
           "escape", "data_attributes"]

NOT_AVAILABLE = "n/a"
# Columns of whole numbers (counts), written without decimals.
COUNT_COLUMNS = frozenset({
    "n", "n_cases", "missed", "spurious", "both_empty", "n_ref", "n_pred", "tp", "fp", "fn", "tn",
    "n_ref_lesions", "n_pred_lesions", "lesion_tp", "lesion_fn", "lesion_fp", "wins", "losses", "ties",
})


def metric_spec(metric: str) -> str:
    """The number format of a metric's column: counts ``.0f``, distances in mm ``.2f``, ratios ``.4f``.

    Examples
    --------
    >>> metric_spec("n_ref"), metric_spec("hd95_worst_filled"), metric_spec("dice")
    ('.0f', '.2f', '.4f')
    """
    if metric in COUNT_COLUMNS:
        return ".0f"
    if metric.startswith(("hd", "assd")):
        return ".2f"
    return ".4f"


def number_text(value: Any, spec: str = ".4f") -> str:
    """``value`` formatted with ``spec``; ``n/a`` for None and NaN.

    Examples
    --------
    >>> number_text(0.61234), number_text(float("nan")), number_text(3, ".0f"), number_text(0.0312, ".4g")
    ('0.6123', 'n/a', '3', '0.0312')
    """
    if value is None:
        return NOT_AVAILABLE
    value = float(value)
    return NOT_AVAILABLE if math.isnan(value) else format(value, spec)


@dataclass(frozen=True)
class Stat:
    """Mean, standard deviation and median over ``n`` values; ``of``: the cases there were (shows ``(n/of)``)."""

    mean: float
    std: float
    median: float
    n: int
    of: int | None = None

    @classmethod
    def of_mapping(cls, stats: Mapping[str, Any] | None, *, of: int | None = None) -> "Stat | None":
        """A :class:`Stat` from ``{"mean", "std", "median", "n"}`` (a summary's entry), or None."""
        if not stats:
            return None
        return cls(stats.get("mean", math.nan), stats.get("std", math.nan), stats.get("median", math.nan),
                   int(stats.get("n", 0)), of)

    @property
    def coverage(self) -> str:
        """`` (k/n)`` when the statistic covers fewer than all cases, else empty."""
        return f" ({self.n}/{self.of})" if self.of is not None and self.n != self.of else ""


@dataclass(frozen=True)
class Cell:
    """One cell: ``value`` text (``""``: a blank cell), a number (formatted with ``spec``), a :class:`Stat`,
    or None (an undefined value: ``n/a``, as NaN).

    ``data`` names the cell in HTML (``data-<key>`` attributes); ``best`` marks the best value of
    its column (bold in both renderings); ``strong`` emphasises a text cell.
    """

    value: Any = None
    spec: str = ".4f"
    data: Mapping[str, Any] = field(default_factory=dict)
    best: bool = False
    strong: bool = False


@dataclass(frozen=True)
class Column:
    """A column heading; ``note`` is a second line (HTML only); ``text`` columns are left-aligned."""

    title: str
    note: str = ""
    text: bool = False


@dataclass(frozen=True)
class Row:
    """The cells of one row; ``data`` and ``css_class`` name the HTML row."""

    cells: Sequence[Cell]
    data: Mapping[str, Any] = field(default_factory=dict)
    css_class: str | None = None


@dataclass(frozen=True)
class Table:
    """A table: columns, rows, an optional ``title`` (a heading above it) and ``notes`` (paragraphs below).

    ``html_id``, ``css_class`` and ``data`` name the HTML ``<table>``.
    """

    columns: Sequence[Column]
    rows: Sequence[Row]
    title: str | None = None
    notes: Sequence[str] = ()
    html_id: str | None = None
    css_class: str | None = None
    data: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for i, row in enumerate(self.rows):
            if len(row.cells) != len(self.columns):
                raise ValueError(expected(f"{len(self.columns)} cells per row (one per column)", key=f"rows[{i}]",
                                          received=Received(f"{len(row.cells)} cells")))


# ---------------------------------------------------------------- Markdown


def to_markdown(table: Table, *, heading: str = "###") -> str:
    """The table as GitHub Markdown: ``heading`` + title, the table, then the notes (no trailing newline)."""
    lines = [f"{heading} {table.title}", ""] if table.title else []
    lines.append("| " + " | ".join(_md_escape(c.title) for c in table.columns) + " |")
    lines.append("|" + "---|" * len(table.columns))
    lines += ["| " + " | ".join(_markdown_cell(c) for c in row.cells) + " |" for row in table.rows]
    for note in table.notes:
        lines += ["", note]
    return "\n".join(lines)


def _markdown_cell(cell: Cell) -> str:
    value = cell.value
    if isinstance(value, str):
        text = _md_escape(value)
    elif isinstance(value, Stat):
        text = NOT_AVAILABLE if value.n == 0 else (
            f"{number_text(value.mean, cell.spec)} ± {number_text(value.std, cell.spec)} "
            f"({number_text(value.median, cell.spec)}){value.coverage}")
    else:
        text = number_text(value, cell.spec)
    return f"**{text}**" if (cell.best or cell.strong) and text else text


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|")


# ---------------------------------------------------------------- HTML


def escape(value: Any) -> str:
    """HTML text of ``value`` (quotes escaped too, so it can sit in an attribute)."""
    return html.escape(str(value), quote=True)


def data_attributes(data: Mapping[str, Any]) -> str:
    """`` data-<key>="<value>"`` for each item (underscores in keys become dashes)."""
    return "".join(f' data-{k.replace("_", "-")}="{escape(v)}"' for k, v in data.items())


def to_html(table: Table, *, heading: str = "h2") -> str:
    """The table as an HTML ``<table>`` (``<thead>``, ``<tbody>``), its title as ``heading``, notes as paragraphs."""
    parts = [f"<{heading}>{escape(table.title)}</{heading}>"] if table.title else []
    attributes = (f' id="{escape(table.html_id)}"' if table.html_id else "") + (
        f' class="{escape(table.css_class)}"' if table.css_class else "") + data_attributes(table.data)
    head = "".join(_html_head(c) for c in table.columns)
    lines = [f"<table{attributes}><thead><tr>{head}</tr></thead><tbody>"]
    for row in table.rows:
        css = f' class="{escape(row.css_class)}"' if row.css_class else ""
        lines.append(f"<tr{css}{data_attributes(row.data)}>"
                     + "".join(_html_cell(cell, column) for cell, column in zip(row.cells, table.columns)) + "</tr>")
    lines.append("</tbody></table>")
    parts.append("\n".join(lines))
    parts += [f'<p class="note">{escape(note)}</p>' for note in table.notes]
    return "\n".join(parts)


def _html_head(column: Column) -> str:
    css = " class='text'" if column.text else ""
    note = f"<br><small>{escape(column.note)}</small>" if column.note else ""
    return f"<th{css}>{escape(column.title)}{note}</th>"


def _html_cell(cell: Cell, column: Column) -> str:
    value = cell.value
    text_cell = column.text or (isinstance(value, str) and value != "")
    classes = [name for name, on in (("text", text_cell), ("best", cell.best)) if on]
    css = f' class="{" ".join(classes)}"' if classes else ""
    if isinstance(value, str):
        text = escape(value)
    elif isinstance(value, Stat):
        if value.n == 0:
            text = NOT_AVAILABLE
        else:
            mean, std, median = (f'<span data-stat="{s}">{number_text(getattr(value, s), cell.spec)}</span>'
                                 for s in ("mean", "std", "median"))
            text = f"{mean} ± {std} ({median}){value.coverage}"
    else:
        text = number_text(value, cell.spec)
    if cell.strong and text:
        text = f"<b>{text}</b>"
    return f"<td{css}{data_attributes(cell.data)}>{text}</td>"
