"""``RUN/progress.png``: the whole training history of a run in one picture, redrawn every epoch.

Three panels on a shared epoch axis: training and validation loss; per-class and foreground-mean
Dice (validation solid, training dashed); learning rate (log scale) and wall-clock seconds per
epoch. A dotted vertical line marks the best epoch of the monitored value (the epoch whose model is
``checkpoints/best.keras``). The picture is drawn from the files, never from memory, so a resumed
run continues the same curves:

- ``history.csv``: one row per finished epoch (``epoch``, ``loss``, ``dice_<class>``,
  ``dice_fg_mean``, ``val_*``, ``learning_rate``);
- ``epoch_times.csv`` (optional): ``epoch``, ``seconds`` (training + validation of that epoch; a
  resumed epoch counts from the resume).

Redraw a finished run by hand with ``python -m segpipe.reports.progress RUN_DIR``.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib
import numpy as np

from segpipe.errors import expected
from segpipe.io import atomic_path
from segpipe.runs.rundir import RunDir
from segpipe.tables import read_columns

__all__ = ["read_history", "best_epoch", "progress_figure", "plot_progress", "write_progress_plot"]


def read_history(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Columns of a per-epoch CSV file as float64 arrays (empty cells and ``nan`` are NaN, :mod:`segpipe.tables`).

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    ValueError
        A cell is not a number, or there is no ``epoch`` column (names the file, row and column).
    """
    path = Path(path)
    columns = read_columns(path)
    if columns and "epoch" not in columns:
        raise ValueError(expected("an 'epoch' column", key="columns", received=list(columns), where=str(path)))
    return columns


def best_epoch(history: Mapping[str, Sequence[float]], monitor: str) -> tuple[int, float] | None:
    """(epoch, value) where ``monitor`` is best: lowest for a loss, else highest; first of ties.

    NaN values never win; None if ``monitor`` is not logged or never finite.

    Examples
    --------
    >>> best_epoch({"epoch": [1, 2, 3], "val_loss": [0.5, 0.3, 0.3]}, "val_loss")
    (2, 0.3)
    """
    if monitor not in history or "epoch" not in history:
        return None
    values = np.asarray(history[monitor], dtype=np.float64)
    finite = np.isfinite(values)
    if not finite.any():
        return None
    # Same rule as the checkpoint callback: "loss" in the name means lower is better.
    scores = np.where(finite, values if "loss" in monitor else -values, np.inf)
    index = int(np.argmin(scores))
    return int(np.asarray(history["epoch"])[index]), float(values[index])


def plot_progress(
    history: Mapping[str, Sequence[float]],
    path: str | os.PathLike,
    *,
    monitor: str = "val_dice_fg_mean",
    epoch_seconds: Mapping[str, Sequence[float]] | None = None,
    title: str | None = None,
) -> None:
    """Draw :func:`progress_figure` into the PNG ``path`` (atomically: a reader never sees half a file)."""
    fig = progress_figure(history, monitor=monitor, epoch_seconds=epoch_seconds, title=title)
    _save(fig, path)


def progress_figure(
    history: Mapping[str, Sequence[float]],
    *,
    monitor: str = "val_dice_fg_mean",
    epoch_seconds: Mapping[str, Sequence[float]] | None = None,
    title: str | None = None,
):
    """The progress picture of ``history`` as a Matplotlib figure (not registered with pyplot).

    Parameters
    ----------
    history : dict of str to sequence of float
        Columns of ``history.csv`` (:func:`read_history`); needs ``epoch``.
    monitor : str, optional
        The column whose best epoch is marked. Defaults to ``val_dice_fg_mean``.
    epoch_seconds : dict, optional
        Columns ``epoch`` and ``seconds`` (``epoch_times.csv``).
    title : str, optional
        Figure title, e.g. the run name.

    Returns
    -------
    fig : matplotlib.figure.Figure
        Axes: loss, Dice, learning rate (and its twin, seconds per epoch).
    """
    from matplotlib.figure import Figure  # no pyplot: no global figure registry, no GUI backend

    if "epoch" not in history:
        raise ValueError(expected("an 'epoch' column in the history", key="columns", received=sorted(history)))
    epochs = np.asarray(history["epoch"], dtype=np.float64)
    fig = Figure(figsize=(8.5, 9.5))
    ax_loss, ax_dice, ax_lr = fig.subplots(3, 1, sharex=True, gridspec_kw={"height_ratios": [1.0, 1.3, 0.8]})
    style = {"marker": "." if epochs.size <= 60 else None, "linewidth": 1.4}

    _plot_if(ax_loss, history, "loss", epochs, label="training", color="tab:blue", **style)
    _plot_if(ax_loss, history, "val_loss", epochs, label="validation", color="tab:orange", **style)
    ax_loss.set_ylabel("loss (unitless)")
    ax_loss.set_title("Loss")

    classes = _dice_classes(history)
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, name in enumerate(classes):
        color = colors[i % len(colors)]
        _plot_if(ax_dice, history, f"val_dice_{name}", epochs, label=f"{name} (val)", color=color, **style)
        _plot_if(ax_dice, history, f"dice_{name}", epochs, label=f"{name} (train)", color=color,
                 linestyle="--", alpha=0.6, linewidth=1.0)
    _plot_if(ax_dice, history, "val_dice_fg_mean", epochs, label="foreground mean (val)", color="black",
             linewidth=2.4)
    _plot_if(ax_dice, history, "dice_fg_mean", epochs, label="foreground mean (train)", color="black",
             linestyle="--", linewidth=1.6, alpha=0.6)
    ax_dice.set_ylabel("Dice (0-1)")
    ax_dice.set_ylim(-0.02, 1.02)
    ax_dice.set_title("Dice per class: validation solid, training dashed")

    lines = []
    if _finite(history, "learning_rate"):
        lr = np.asarray(history["learning_rate"], dtype=np.float64)
        lines += ax_lr.plot(epochs, lr, color="tab:green", label="learning rate", **style)
        if np.nanmin(lr) > 0:
            ax_lr.set_yscale("log")
    ax_lr.set_ylabel("learning rate")
    ax_time = ax_lr.twinx()
    if epoch_seconds is not None and _finite(epoch_seconds, "seconds"):
        lines += ax_time.plot(np.asarray(epoch_seconds["epoch"], dtype=np.float64),
                              np.asarray(epoch_seconds["seconds"], dtype=np.float64),
                              color="tab:purple", label="seconds per epoch", **style)
        ax_time.set_ylim(bottom=0)
    ax_time.set_ylabel("seconds per epoch (s)")
    ax_lr.set_title("Learning rate and time per epoch")
    ax_lr.set_xlabel("epoch")
    if not lines:
        ax_lr.text(0.5, 0.5, "no learning rate or epoch times logged", transform=ax_lr.transAxes,
                   ha="center", va="center", color="gray")

    best = best_epoch(history, monitor)
    if best is not None:
        epoch, value = best
        for ax in (ax_loss, ax_dice, ax_lr):
            ax.axvline(epoch, color="gray", linestyle=":", linewidth=1.5)
        marked = ax_loss if "loss" in monitor else ax_dice
        marked.plot([epoch], [value], marker="*", markersize=14, color="gold", markeredgecolor="black",
                    linestyle="none", label=f"best epoch {epoch}: {monitor} = {value:.4g}", zorder=5)
    for ax in (ax_loss, ax_dice, ax_lr):
        ax.grid(alpha=0.3)
    ax_loss.legend(fontsize="small", loc="best")
    ax_dice.legend(fontsize="x-small", loc="lower right", ncol=2 if len(classes) > 2 else 1)
    if lines:
        ax_lr.legend(lines, [line.get_label() for line in lines], fontsize="small", loc="best")
    if epochs.size:
        last = float(np.nanmax(epochs))
        ax_lr.set_xlim(0.5, max(last, 1.0) + 0.5)
        ax_lr.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(title or "Training progress", fontsize="large")
    # Fixed margins: tight_layout would draw the figure twice (this runs after every epoch).
    fig.subplots_adjust(left=0.1, right=0.9, bottom=0.06, top=0.93, hspace=0.28)
    return fig


def write_progress_plot(run_dir: str | os.PathLike, *, monitor: str = "val_dice_fg_mean") -> Path:
    """Redraw ``RUN_DIR/progress.png`` from ``history.csv`` (and ``epoch_times.csv`` if present)."""
    run = RunDir(run_dir)
    history = read_history(run.history_csv)
    times = read_history(run.epoch_times_csv) if run.epoch_times_csv.is_file() else None
    plot_progress(history, run.progress_png, monitor=monitor, epoch_seconds=times,
                  title=f"{run.path.name}: training progress")
    return run.progress_png


def _dice_classes(history: Mapping[str, Sequence[float]]) -> list[str]:
    """Class names of the ``dice_<class>`` / ``val_dice_<class>`` columns, in column order."""
    names: list[str] = []
    for key in history:
        for prefix in ("val_dice_", "dice_"):
            if key.startswith(prefix):
                name = key[len(prefix):]
                if name != "fg_mean" and name not in names:
                    names.append(name)
                break
    return names


def _finite(columns: Mapping[str, Sequence[float]], key: str) -> bool:
    return key in columns and bool(np.isfinite(np.asarray(columns[key], dtype=np.float64)).any())


def _plot_if(ax, history, key: str, epochs: np.ndarray, **kwargs) -> None:
    if _finite(history, key):
        ax.plot(epochs, np.asarray(history[key], dtype=np.float64), **kwargs)


def _save(fig, path: str | os.PathLike, dpi: int = 80) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")  # a pyplot-free Figure renders with Agg


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m segpipe.reports.progress",
                                     description="Redraw RUN_DIR/progress.png from RUN_DIR/history.csv.")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--monitor", default="val_dice_fg_mean", help="column whose best epoch is marked")
    args = parser.parse_args(argv)
    print(f"Wrote {write_progress_plot(args.run_dir, monitor=args.monitor)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
