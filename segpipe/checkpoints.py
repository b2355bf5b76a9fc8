"""Crash-safe checkpoints of a training run.

The "last" checkpoint is a folder holding ``model.keras`` (weights and optimizer state) and
``state.json`` (epoch, best monitored value, history rows). It is written as a new folder and then
swapped in by renames, so at every moment either the previous or the new checkpoint is complete:

    last.tmp/ written  ->  last/ renamed to last.old/  ->  last.tmp/ renamed to last/  ->  last.old/ removed

:func:`find_last_checkpoint` falls back to ``last.old`` when a crash happened between the renames.
"""
from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Any

import keras

from segpipe.io import atomic_path, read_json, write_json, write_text


def save_model_atomic(model: keras.Model, path: str | os.PathLike) -> None:
    """``model.save`` to a temporary ``.keras`` file, then rename it onto ``path``."""
    with atomic_path(path) as tmp:
        model.save(tmp)


def save_checkpoint(folder: Path, model: keras.Model, state: dict[str, Any]) -> None:
    """Write ``folder/model.keras`` and ``folder/state.json`` so that ``folder`` is never partial."""
    tmp, old = folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save(tmp / "model.keras")
    write_json(tmp / "state.json", state)
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def find_last_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint folder (``folder`` or its ``.old`` twin), or None."""
    for candidate in (folder, folder.with_name(folder.name + ".old")):
        if (candidate / "model.keras").is_file() and (candidate / "state.json").is_file():
            return candidate
    return None


def history_csv(rows: list[dict[str, Any]]) -> str:
    """CSV text of per-epoch log rows; columns in first-seen order, missing values empty."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    lines = [",".join(columns)]
    for row in rows:
        lines.append(",".join(_fmt(row.get(c, "")) for c in columns))
    return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return str(value)


class RunCheckpoint(keras.callbacks.Callback):
    """After every epoch: best model (if improved), last checkpoint, then ``history.csv``.

    ``history.csv`` is rewritten from the rows stored in the checkpoint state, so after a resume it
    has exactly one row per finished epoch, none duplicated and none missing.
    """

    def __init__(self, run_dir: Path, monitor: str, state: dict[str, Any] | None = None):
        super().__init__()
        self.run_dir = Path(run_dir)
        self.monitor = monitor
        self.mode = "min" if "loss" in monitor else "max"
        state = state or {}
        self.rows: list[dict[str, Any]] = list(state.get("history", []))
        self.best = state.get("best")

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        logs = {k: float(v) for k, v in (logs or {}).items()}
        self.rows.append({"epoch": epoch + 1, **logs})
        value = logs.get(self.monitor)
        if value is None:
            raise KeyError(
                f"train.monitor: expected one of the logged values {sorted(logs)}. Received: {self.monitor!r}"
            )
        improved = self.best is None or (value < self.best if self.mode == "min" else value > self.best)
        if improved and not math.isnan(value):
            self.best = value
            save_model_atomic(self.model, self.run_dir / "checkpoints" / "best.keras")
        state = {"epoch": epoch + 1, "monitor": self.monitor, "best": self.best, "history": self.rows}
        save_checkpoint(self.run_dir / "checkpoints" / "last", self.model, state)
        write_text(self.run_dir / "history.csv", history_csv(self.rows))


def read_state(checkpoint: Path) -> dict[str, Any]:
    return read_json(checkpoint / "state.json")
