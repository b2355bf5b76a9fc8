"""Crash-safe checkpoints of a training run, and early checks that the run directory can hold them.

The "last" checkpoint is a folder holding ``model.keras`` (weights and optimizer state, including
the step counter that drives the learning-rate schedule) and ``state.json``: finished epochs,
finished steps of the next epoch (a stop request checkpoints mid-epoch), that epoch's metric
accumulators, the data RNG position (samples are a function of ``(seed, index)``, so the next
sample index *is* the RNG state), the best monitored value and the history rows. It is written as
a new folder, flushed to disk, and then swapped in by renames, so at every moment either the
previous or the new checkpoint is complete:

    last.tmp/ written + fsynced  ->  last/ renamed to last.old/  ->  last.tmp/ renamed to last/  ->  last.old/ removed

:func:`segpipe.runs.rundir.find_last_checkpoint` falls back to ``last.old`` when a crash happened between the renames.

Besides the epoch ends (and a stop request), :class:`CheckpointSchedule` saves the same mid-epoch
checkpoint every ``train.checkpoint_every_steps`` steps and/or ``train.checkpoint_every_minutes``,
so a SIGKILL loses at most that much training. A resumed run first rewrites the files derived from
the checkpoint (``history.csv``, ``epoch_times.csv``) and :func:`remove_stale_temporaries` clears
what killed writes left behind.
"""
from __future__ import annotations

import contextlib
import errno
import math
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

import keras
import numpy as np

from segpipe.errors import Received, SettingError, StorageError, expected
from segpipe.export.bundle import remove_orphaned_bundle_folders
from segpipe.io import (
    atomic_path,
    durable_mkdir,
    durable_replace,
    failpoint,
    fsync_tree,
    read_json,
    remove_orphaned_temporaries,
    write_json,
)
from segpipe.reports.progress import write_progress_plot
from segpipe.runs.rundir import RunDir, find_last_checkpoint
from segpipe.tables import write_csv

# Errors that mean "this disk or folder cannot take the run", as opposed to a bug.
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR}
CHECKPOINT_COPIES = 5  # last, last.tmp while swapping, best.keras (+ its temporary file), model.keras
SPACE_MARGIN_BYTES = 16 * 2**20  # history, TensorBoard, state.json


# ---------------------------------------------------------------- early checks


def check_writable(run_dir: str | os.PathLike) -> Path:
    """Fail before any work if ``run_dir`` could not be created and written.

    Nothing is created: a temporary file is written (and removed) in the nearest existing folder.
    Returns that folder (where free space is measured).
    """
    run_dir = Path(run_dir).absolute()
    existing = next(p for p in (run_dir, *run_dir.parents) if p.exists())
    if not existing.is_dir():
        raise StorageError(expected("a writable directory for the run", key="output_dir",
                                    received=Received(f"{run_dir} (cannot be created: {existing} is a file)")))
    try:
        with tempfile.TemporaryFile(dir=existing) as probe:
            probe.write(b"segpipe")
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as exc:
        raise StorageError(expected("a writable directory for the run", key="output_dir",
                                    received=Received(f"{run_dir} (cannot write {existing}: "
                                                      f"{exc.strerror or exc})"))) from exc
    return existing


def checkpoint_bytes(model: keras.Model) -> int:
    """Bytes of the model's weights and optimizer state (what one checkpoint holds)."""
    variables = list(model.weights) + (list(model.optimizer.variables) if model.optimizer is not None else [])
    return int(sum(math.prod(v.shape) * np.dtype(v.dtype).itemsize for v in variables))


def check_free_space(run_dir: str | os.PathLike, model: keras.Model) -> None:
    """Fail before training if the disk cannot hold the run's checkpoints."""
    folder = check_writable(run_dir)
    required = CHECKPOINT_COPIES * checkpoint_bytes(model) + SPACE_MARGIN_BYTES
    free = shutil.disk_usage(folder).free
    if free < required:
        raise StorageError(expected(
            f"at least {required / 2**20:.0f} MiB of free disk space for the checkpoints ({CHECKPOINT_COPIES} copies "
            f"of weights + optimizer state)", key="output_dir",
            received=Received(f"{run_dir} ({free / 2**20:.0f} MiB free on {folder})"),
        ))


@contextlib.contextmanager
def explain_storage_errors(path: Path) -> Iterator[None]:
    """Turn a full disk (or a folder that became read-only) while writing ``path`` into a clear message."""
    try:
        yield
    except StorageError:
        raise
    except OSError as exc:
        full = exc.errno in STORAGE_ERRNOS or "No space left" in str(exc)
        if not full:
            raise
        raise StorageError(expected(
            "space to write the checkpoint", key="output_dir", received=Received(f"{path} ({exc.strerror or exc})"),
            hint="The last complete checkpoint is kept; free space (or fix the folder) and continue with --resume.",
        )) from exc


# ---------------------------------------------------------------- writing


def save_model_atomic(model: keras.Model, path: str | os.PathLike) -> None:
    """``model.save`` to a temporary ``.keras`` file, then rename it onto ``path`` (flushed before and after)."""
    with explain_storage_errors(Path(path)), atomic_path(path) as tmp:
        model.save(tmp)


def save_checkpoint(folder: Path, model: keras.Model, state: dict[str, Any]) -> None:
    """Write ``folder/model.keras`` and ``folder/state.json`` so that ``folder`` is never partial."""
    folder = Path(folder)
    tmp, old = folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")
    with explain_storage_errors(folder):
        shutil.rmtree(tmp, ignore_errors=True)
        durable_mkdir(folder.parent)  # a new checkpoints/ folder is recorded in the run directory
        tmp.mkdir()
        try:
            model.save(tmp / "model.keras")
            write_json(tmp / "state.json", state)
            fsync_tree(tmp)  # the data is on disk before the rename makes it "the" checkpoint
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        failpoint("checkpoint_written", folder)
        if folder.exists():
            shutil.rmtree(old, ignore_errors=True)
            durable_replace(folder, old, flushed=True)  # flushed when it was written as last.tmp/
            failpoint("checkpoint_swap", folder)
        durable_replace(tmp, folder, flushed=True)
        failpoint("checkpoint_swapped", folder)
        shutil.rmtree(old, ignore_errors=True)  # should a power loss bring it back, a resume removes it


def remove_stale_temporaries(run_dir: str | os.PathLike) -> list[Path]:
    """Delete what killed writes left in a run directory; returns the paths removed.

    The temporary files of :func:`segpipe.io.atomic_path` in the run directory and ``checkpoints/``
    (:func:`segpipe.io.remove_orphaned_temporaries`), and the bundle's temporary and old folders
    (``.bundle.tmp-<pid>``, ``.bundle.old-<pid>``:
    :func:`segpipe.export.bundle.remove_orphaned_bundle_folders`), of processes that
    no longer run; ``checkpoints/last.tmp/`` (never trusted), and ``checkpoints/last.old/`` when
    ``last/`` is complete (otherwise ``last.old/`` is the checkpoint, kept). Nothing reads these
    names: this is for the disk space (a run resumed with no step left to train saves no
    checkpoint that would remove them).
    """
    run = RunDir(run_dir)
    # only the temporaries of dead processes: an export or evaluation of this run may be writing
    stale = [p for folder in (run.path, run.checkpoints_dir) for p in remove_orphaned_temporaries(folder)]
    last = run.last_checkpoint_dir
    stale += [p for p in (last.with_name(last.name + ".tmp"),) if p.is_dir()]
    if find_last_checkpoint(last) == last:
        stale += [p for p in (last.with_name(last.name + ".old"),) if p.is_dir()]
    for path in stale:
        if not path.exists():
            continue  # removed above
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return stale + remove_orphaned_bundle_folders(run.bundle_dir)


def read_state(checkpoint: Path) -> dict[str, Any]:
    return read_json(checkpoint / "state.json")


# history.csv and epoch_times.csv keep six significant digits (the bytes runs have always had).
HISTORY_FLOAT_FORMAT = "%.6g"


def write_history_csv(path: Path, rows: list[dict[str, Any]]) -> bool:
    """Write per-epoch log rows as CSV (atomically); columns in first-seen order, missing values empty.

    Floats keep six significant digits, NaN is ``nan`` (:mod:`segpipe.tables`). Returns False (and
    writes nothing) when the file already holds exactly these rows.
    """
    return write_csv(path, rows, float_format=HISTORY_FLOAT_FORMAT, unless_same=True)


class CheckpointSchedule:
    """When to save a checkpoint in the middle of an epoch (``train.checkpoint_every_steps`` / ``_minutes``).

    Due after every ``every_steps``-th step of the run (steps counted over all epochs, so the saves
    fall on the same steps after a resume), and/or when ``every_minutes`` have passed since the last
    save of any kind (the clock restarts at :meth:`saved`). Epoch ends are saved anyway; between two
    saves there are then at most ``every_steps`` steps.

    Parameters
    ----------
    every_steps
        an integer >= 1, or None.
    every_minutes
        a number > 0 (``inf``: never), or None.
    clock
        seconds, monotonic (tests pass a fake one).

    Raises
    ------
    SettingError
        a value out of range (keyed ``every_steps`` / ``every_minutes``).

    Examples
    --------
    >>> schedule = CheckpointSchedule(every_steps=4)
    >>> [step for step in range(1, 13) if schedule.due(step)]
    [4, 8, 12]
    """

    def __init__(self, every_steps: int | None = None, every_minutes: float | None = None, *,
                 clock: Any = time.monotonic):
        if every_steps is not None and (isinstance(every_steps, bool) or not isinstance(every_steps, int)
                                        or every_steps < 1):
            raise SettingError("every_steps", "an integer >= 1 or None", every_steps)
        if every_minutes is not None and (isinstance(every_minutes, bool) or not isinstance(every_minutes, (int, float))
                                          or not every_minutes > 0):  # also NaN
            raise SettingError("every_minutes", "a number > 0 or None", every_minutes)
        self.every_steps, self.every_minutes, self.clock = every_steps, every_minutes, clock
        self._last_save = clock()

    @property
    def timed(self) -> bool:
        """Whether the schedule depends on the clock (several workers must then agree: their clocks differ)."""
        return self.every_minutes is not None

    def due(self, global_step: int) -> bool:
        """Whether to checkpoint after ``global_step`` steps of the run."""
        if self.every_steps is not None and global_step % self.every_steps == 0:
            return True
        return self.every_minutes is not None and self.clock() - self._last_save >= 60 * self.every_minutes

    def saved(self) -> None:
        """A checkpoint was just saved: the time-based interval starts again."""
        self._last_save = self.clock()


class RunCheckpoint(keras.callbacks.Callback):
    """After every epoch: best model (if improved), last checkpoint, ``history.csv``, ``epoch_times.csv``,
    then (``progress_plot``) ``progress.png``.

    ``history.csv`` is rewritten from the rows stored in the checkpoint state, so after a resume it
    has exactly one row per finished epoch, none duplicated and none missing; its rows add the
    optimizer's ``learning_rate`` after the epoch to the logs. Wall-clock seconds per epoch go to
    ``epoch_times.csv`` (also kept in the state), not the history, which stays reproducible. At the
    start of a resumed run both files are rewritten from the state (a crash between the checkpoint
    and ``history.csv`` would otherwise leave the last epoch out when no epoch is left to train).

    Parameters
    ----------
    run_dir
        where to write (the run directory; a temporary folder on a non-chief worker).
    monitor
        the log value that selects ``best.keras``.
    state
        the state of the checkpoint resumed from (history rows, best value), or None.
    seed, samples_per_step, steps_per_epoch
        record the data RNG position in the state
        (``next_sample_index``); optional.
    progress_plot
        redraw ``progress.png`` from the history files after every epoch (the chief).
    schedule
        when to save mid-epoch checkpoints (:class:`CheckpointSchedule`); None: only at epoch
        ends and on a stop request. The training loop asks it after every step.
    extra_state
        ``{key: function}``: each function's value is saved under ``key`` in every
        ``state.json`` (e.g. ``time_limit``: :meth:`segpipe.training.budget.WallTimeLimit.state`).
    """

    def __init__(self, run_dir: Path, monitor: str, state: dict[str, Any] | None = None, *,
                 seed: int | None = None, samples_per_step: int | None = None, steps_per_epoch: int | None = None,
                 progress_plot: bool = False, schedule: CheckpointSchedule | None = None,
                 extra_state: dict[str, Any] | None = None):
        super().__init__()
        self.run = RunDir(run_dir)
        self.monitor = monitor
        self.mode = "min" if "loss" in monitor else "max"
        state = state or {}
        self.rows: list[dict[str, Any]] = list(state.get("history", []))
        self.best = state.get("best")
        self.epoch_times: list[dict[str, Any]] = list(state.get("epoch_times", []))
        self.seed, self.samples_per_step, self.steps_per_epoch = seed, samples_per_step, steps_per_epoch
        self.progress_plot = progress_plot
        self.schedule = schedule
        self.extra_state = extra_state or {}
        self._epoch_start: float | None = None

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        if self.rows:  # resumed: the files derived from the checkpoint say what it says
            self._write_history_files(resumed=True)

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._epoch_start = time.monotonic()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        logs = {k: float(v) for k, v in (logs or {}).items()}
        learning_rate = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        self.rows.append({"epoch": epoch + 1, **logs, "learning_rate": learning_rate})
        if self._epoch_start is not None:
            self.epoch_times.append({"epoch": epoch + 1, "seconds": round(time.monotonic() - self._epoch_start, 3)})
        value = logs.get(self.monitor)
        if value is None:
            raise KeyError(expected(f"one of the logged values {sorted(logs)}", key="train.monitor",
                                    received=self.monitor))
        improved = self.best is None or (value < self.best if self.mode == "min" else value > self.best)
        if improved and not math.isnan(value):
            self.best = value
            save_model_atomic(self.model, self.run.best_model)
        self._save(self.state(epoch + 1, 0))
        self._write_history_files()

    def _write_history_files(self, resumed: bool = False) -> None:
        """``history.csv`` and ``epoch_times.csv`` from the rows, then ``progress.png`` (at the start of a
        resumed run only if the history file was out of date)."""
        with explain_storage_errors(self.run.history_csv):
            changed = write_history_csv(self.run.history_csv, self.rows)
            if self.epoch_times:
                write_history_csv(self.run.epoch_times_csv, self.epoch_times)
        if self.progress_plot and (changed or not resumed):
            self._redraw_progress()

    def _redraw_progress(self) -> None:
        try:
            write_progress_plot(self.run.path, monitor=self.monitor)
        except Exception as exc:  # a picture of the history must never stop the training itself
            warnings.warn(f"{self.run.progress_png} not redrawn: {type(exc).__name__}: {exc}", stacklevel=2)

    def save_partial(self, epoch: int, step: int, metrics: dict[str, list]) -> None:
        """Checkpoint after ``step`` steps of epoch ``epoch`` (0-based), with its metric accumulators."""
        self._save(self.state(epoch, step, metrics))

    def _save(self, state: dict[str, Any]) -> None:
        save_checkpoint(self.run.last_checkpoint_dir, self.model, state)
        if self.schedule is not None:
            self.schedule.saved()

    def state(self, epoch: int, step: int, metrics: dict[str, list] | None = None) -> dict[str, Any]:
        """The ``state.json`` of a checkpoint after ``epoch`` finished epochs and ``step`` more steps."""
        state: dict[str, Any] = {"epoch": epoch, "step": step, "monitor": self.monitor, "best": self.best,
                                 "history": self.rows, "epoch_times": self.epoch_times}
        if metrics is not None:
            state["metrics"] = metrics
        state.update({key: get() for key, get in self.extra_state.items()})
        if None not in (self.seed, self.samples_per_step, self.steps_per_epoch):
            state["rng"] = {"seed": self.seed,
                            "next_sample_index": (epoch * self.steps_per_epoch + step) * self.samples_per_step}
        return state
