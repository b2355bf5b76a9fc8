"""JSON, text and ``.npy`` files, each written atomically (:func:`segpipe.io.durable.atomic_path`)."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from segpipe.errors import Received, expected
from segpipe.io.durable import atomic_path, explain_write_errors


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    write_text(path, json.dumps(data, indent=2, default=_json_default) + "\n")


def json_safe(value: Any) -> Any:
    """``value`` with NaN and inf as None (strict JSON has no such numbers), numpy scalars as Python
    numbers and mapping keys as strings; for reports read by other tools."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file; a parse error names the file and the position."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(expected("valid JSON", key="contents", received=Received(f"invalid JSON ({exc})"),
                                  where=str(path))) from exc


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """Save a ``.npy`` array atomically.

    Raises
    ------
    StorageError
        the disk is full or the folder read-only (names ``path``; nothing half-written).
    """
    with explain_write_errors(path), atomic_path(path) as tmp:
        np.save(tmp, array)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(expected("a JSON-serialisable value (number, string, list, mapping, numpy value or path)",
                             key="value", received=Received(f"an object of type {type(value).__name__}")))
