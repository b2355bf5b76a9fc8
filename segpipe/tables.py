"""Rows of tables on disk: the one reader and writer of segpipe's CSV and JSON tables.

Every table segpipe writes or reads (``history.csv``, ``epoch_times.csv``, ``per_case.csv``,
``lesions.csv``, ``comparison.csv``, ``summary.json``, ``comparison.json``) goes through this module,
so all of them share one NaN convention:

- **CSV.** A NaN is written as ``nan`` (as Python's ``csv`` module always wrote it); a value a row
  lacks is an empty cell. On reading, an empty cell and ``nan`` (any case) are both NaN. Other
  numbers are written in Python's shortest round-trip form (``repr``) unless a writer asks for a
  fixed precision (``history.csv``: ``%.6g``); whole numbers are read back as ``int``, other
  numbers as ``float``, and the columns a reader names as text stay strings.
- **JSON.** NaN and infinities are written as ``null`` (strict JSON has no such numbers); on
  reading, ``null`` is NaN.

The bytes of every file are those the earlier writers produced, so runs and evaluations written
before this module read as before. Rendering tables for people (Markdown, HTML) is
:mod:`segpipe.reports.tables`.

Examples
--------
>>> text = format_csv([{"case": "a", "dice": float("nan"), "n": 3}, {"case": "b", "dice": 0.5}])
>>> print(text, end="")
case,dice,n
a,nan,3
b,0.5,
>>> parse_cell("") != parse_cell("")  # NaN
True
"""
from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from segpipe.errors import Received, expected
from segpipe.io import json_safe, write_text
from segpipe.io import read_json as _read_any_json
from segpipe.io import write_json as _write_any_json

__all__ = [
    "NAN_TEXT",
    "format_cell",
    "format_csv",
    "write_csv",
    "parse_cell",
    "read_csv",
    "read_columns",
    "write_json",
    "read_json",
    "nan_from_null",
]

NAN_TEXT = "nan"  # how a NaN is written in a CSV cell


def format_cell(value: Any, *, float_format: str | None = None) -> str:
    """The CSV text of one value.

    Parameters
    ----------
    value : Any
        None is an empty cell; a float (NaN as ``nan``) in ``repr`` form, or with ``float_format``
        (``%``-style, e.g. ``"%.6g"``); anything else as ``str``.
    float_format : str, optional
        Fixed precision for floats. Default: the shortest text that reads back exactly.

    Returns
    -------
    text : str

    Examples
    --------
    >>> format_cell(float("nan")), format_cell(0.1 + 0.2), format_cell(0.1 + 0.2, float_format="%.6g")
    ('nan', '0.30000000000000004', '0.3')
    """
    if value is None:
        return ""
    if isinstance(value, float):  # np.float64 too; other numpy scalars print as str, as csv did
        if math.isnan(value):
            return NAN_TEXT
        return float_format % value if float_format is not None else float.__repr__(value)
    return str(value)


def format_csv(rows: Iterable[Mapping[str, Any]], columns: Sequence[str] | None = None, *,
               float_format: str | None = None) -> str:
    """CSV text of ``rows``: a header and one line per row (``\\n`` line ends).

    Parameters
    ----------
    rows : iterable of mapping
        One mapping per row.
    columns : sequence of str, optional
        The columns, in order; keys of a row not among them are left out. Default: every key, in
        the order first seen.
    float_format : str, optional
        See :func:`format_cell`.

    Returns
    -------
    text : str
        A cell a row has no value for is empty.
    """
    rows = list(rows)
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([format_cell(row.get(key), float_format=float_format) for key in columns])
    return buffer.getvalue()


def write_csv(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]], columns: Sequence[str] | None = None, *,
              float_format: str | None = None, unless_same: bool = False) -> bool:
    """Write :func:`format_csv` of ``rows`` to ``path`` atomically (:func:`segpipe.io.write_text`).

    Parameters
    ----------
    path : path-like
    rows, columns, float_format
        As :func:`format_csv`.
    unless_same : bool, optional
        Write nothing when the file already holds exactly this text (a resumed run repairs its
        ``history.csv`` this way without touching a file that is right).

    Returns
    -------
    written : bool
        False when ``unless_same`` found the file already right.
    """
    text = format_csv(rows, columns, float_format=float_format)
    if unless_same:
        try:
            if Path(path).read_text() == text:
                return False
        except (OSError, UnicodeDecodeError):
            pass
    write_text(path, text)
    return True


def parse_cell(text: str) -> float | int | str:
    """The value of one CSV cell: NaN for an empty cell or ``nan``, an ``int``, a ``float``, else the text.

    Examples
    --------
    >>> parse_cell("3"), parse_cell("0.25"), parse_cell("NaN") != parse_cell("NaN"), parse_cell("liver")
    (3, 0.25, True, 'liver')
    """
    cell = text.strip()
    if not cell or cell.lower() == NAN_TEXT:
        return math.nan
    try:
        return int(cell)
    except ValueError:
        pass
    try:
        return float(cell)
    except ValueError:
        return text


def read_csv(path: str | os.PathLike, *, text: Iterable[str] = (), strict: bool = False) -> list[dict[str, Any]]:
    """Rows of a CSV table with numbers parsed (:func:`parse_cell`).

    Parameters
    ----------
    path : path-like
        A CSV file with a header line.
    text : iterable of str, optional
        Columns kept as the strings written (names, ids), never parsed.
    strict : bool, optional
        Every other cell must be a number or NaN.

    Returns
    -------
    rows : list of dict
        Column name to value, in file order.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    ValueError
        ``strict`` and a cell that is not a number (names the file, line and column).
    """
    return _read(Path(path), set(text), strict)[1]


def read_columns(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The columns of an all-number CSV table (``history.csv``) as float64 arrays, NaN where empty.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    ValueError
        A cell is not a number (names the file, line and column).
    """
    names, rows = _read(Path(path), set(), True)
    return {name: np.asarray([row.get(name, math.nan) for row in rows], dtype=np.float64) for name in names}


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented strict JSON, atomically: NaN and infinities as ``null``."""
    _write_any_json(path, json_safe(data))


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON table (``summary.json``, ``comparison.json``): ``null`` is NaN.

    Raises
    ------
    ValueError
        The file is not valid JSON (names the file and position).
    """
    return nan_from_null(_read_any_json(path))


def nan_from_null(value: Any) -> Any:
    """``value`` with every ``None`` (JSON ``null``) inside lists and mappings replaced by NaN.

    Examples
    --------
    >>> nan_from_null({"dice": {"mean": None, "n": 0}})
    {'dice': {'mean': nan, 'n': 0}}
    """
    if value is None:
        return math.nan
    if isinstance(value, Mapping):
        return {k: nan_from_null(v) for k, v in value.items()}
    if isinstance(value, list):
        return [nan_from_null(v) for v in value]
    return value


def _read(path: Path, text: set[str], strict: bool) -> tuple[list[str], list[dict[str, Any]]]:
    """(column names, parsed rows) of a CSV table; see :func:`read_csv`."""
    if not path.is_file():
        raise FileNotFoundError(expected("a CSV table", key="path", received=Received(f"{path} (no such file)")))
    reader = csv.DictReader(io.StringIO(path.read_text(), newline=""))
    rows = []
    for line, row in enumerate(reader, start=2):
        parsed: dict[str, Any] = {}
        for key, cell in row.items():
            if key is None:  # cells beyond the header: no column to put them in
                continue
            if key in text:
                parsed[key] = cell
                continue
            value = parse_cell(cell or "")
            if strict and isinstance(value, str):
                raise ValueError(expected("numbers", key=key, received=cell.strip(), where=f"{path}:{line}"))
            parsed[key] = value
        rows.append(parsed)
    return list(reader.fieldnames or []), rows
