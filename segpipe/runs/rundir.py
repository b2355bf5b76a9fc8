"""The run directory: one owner of every path in it and of the readers (and writers) of its files.

A run directory (``<output_dir>/<name>/``, or ``<output_dir>/<experiment>/<name>/``) describes itself::

    config.yaml          the fully resolved config
    splits.json          the train/validation case ids (a copy of the dataset's split)
    preprocessing.json   the resolved preprocessing settings (PreprocessSettings as a dict)
    .segpipe             the ownership marker (segpipe.ownership): --overwrite deletes only a folder with it
    status.json          "running", "interrupted" (stopped by a signal, after a checkpoint) or "finished",
                         with the process id and host of the training that wrote it
    run_info.json        seed, resolved config, split, distribution, versions, git commit
    history.csv          one row per finished epoch (loss, val_loss, per-class Dice, ..., learning_rate)
    epoch_times.csv      seconds per finished epoch (wall clock; apart so histories stay reproducible)
    progress.png         the history as a picture, redrawn after every epoch (segpipe.reports.progress)
    tensorboard/         TensorBoard logs
    checkpoints/last/    model.keras + state.json of the last finished epoch or stop (crash-safe;
                         ``last.old/`` stands in while a new one is swapped in)
    checkpoints/best.keras   the epoch with the best ``train.monitor`` value
    model.keras          the final model
    bundle/              the deployable bundle (segpipe.export)
    predictions/         ``evaluate.py RUN_DIR``: the validation cases, predicted
    evaluation/          ``evaluate.py RUN_DIR``: per_case.csv, summary.json, report.html, overlays/, references/
    budget.json          a time-budgeted ``train.py``: the plan's predicted seconds against the measured ones, per part

Beside it, ``.<name>.lock`` while a training holds the run (and ``RUN_DIR/.evaluation.lock`` while
an evaluation writes ``predictions/`` and ``evaluation/``): one writer at a time (segpipe.locks).

No TensorFlow here: comparing and evaluating runs read run directories without it.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from segpipe.config import Config, load_config, to_yaml
from segpipe.data.preprocess import PreprocessSettings
from segpipe.errors import Received, expected
from segpipe.io import read_json, write_json, write_text
from segpipe.ownership import has_marker, write_marker
from segpipe.tables import read_csv

MODEL_CHOICES = ("best", "last", "final")
STATUSES = ("running", "interrupted", "finished")


def find_last_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder (``folder`` or its ``.old`` twin, left by a crash
    between the renames of a checkpoint swap), or None."""
    folder = Path(folder)
    for candidate in (folder, folder.with_name(folder.name + ".old")):
        if (candidate / "model.keras").is_file() and (candidate / "state.json").is_file():
            return candidate
    return None


class RunDir:
    """The paths of one run directory and the readers of its files.

    Examples
    --------
    >>> run = RunDir("runs/default")
    >>> run.history_csv
    PosixPath('runs/default/history.csv')
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    @classmethod
    def of(cls, config: Config) -> "RunDir":
        """``<output_dir>/<name>``, or ``<output_dir>/<experiment>/<name>`` when the run belongs to an experiment."""
        return cls(Path(config.output_dir) / (config.experiment or "") / str(config.name))

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    # ------------------------------------------------------------ paths

    config_yaml = property(lambda self: self.path / "config.yaml")
    splits_json = property(lambda self: self.path / "splits.json")
    preprocessing_json = property(lambda self: self.path / "preprocessing.json")
    status_json = property(lambda self: self.path / "status.json")
    run_info_json = property(lambda self: self.path / "run_info.json")
    history_csv = property(lambda self: self.path / "history.csv")
    epoch_times_csv = property(lambda self: self.path / "epoch_times.csv")
    progress_png = property(lambda self: self.path / "progress.png")
    tensorboard_dir = property(lambda self: self.path / "tensorboard")
    checkpoints_dir = property(lambda self: self.path / "checkpoints")
    last_checkpoint_dir = property(lambda self: self.path / "checkpoints" / "last")
    best_model = property(lambda self: self.path / "checkpoints" / "best.keras")
    final_model = property(lambda self: self.path / "model.keras")
    bundle_dir = property(lambda self: self.path / "bundle")
    predictions_dir = property(lambda self: self.path / "predictions")
    evaluation_dir = property(lambda self: self.path / "evaluation")
    budget_json = property(lambda self: self.path / "budget.json")

    def create(self) -> None:
        """Create the run directory (if needed) with segpipe's run marker, so ``--overwrite`` may delete it later."""
        self.path.mkdir(parents=True, exist_ok=True)
        if not has_marker(self.path, "run"):
            write_marker(self.path, "run")

    def is_run(self) -> bool:
        """Whether the folder holds a (started) run: it has its config."""
        return self.config_yaml.is_file()

    # ------------------------------------------------------------ readers

    def config(self) -> Config:
        """The resolved config the run was trained with."""
        if not self.is_run():
            raise FileNotFoundError(expected("a run directory with config.yaml", key="run_dir", received=str(self.path)))
        return load_config(self.config_yaml)

    def config_dict(self) -> dict[str, Any]:
        """``config.yaml`` as a plain mapping, not validated (comparisons read runs of older versions too)."""
        import yaml

        if not self.is_run():
            raise FileNotFoundError(expected("a run directory with config.yaml", key="run_dir", received=str(self.path)))
        return yaml.safe_load(self.config_yaml.read_text()) or {}

    def split(self) -> dict[str, Any] | None:
        """The run's split (``{"train": [...], "val": [...], ...}``), or None before it was written."""
        return read_json(self.splits_json) if self.splits_json.is_file() else None

    def preprocessing(self) -> PreprocessSettings | None:
        """The resolved preprocessing settings of training, or None before they were written."""
        path = self.preprocessing_json
        return PreprocessSettings.from_dict(read_json(path), where=str(path)) if path.is_file() else None

    def status(self) -> str | None:
        """``"running"``, ``"interrupted"``, ``"finished"``, or None for a run not started."""
        return read_json(self.status_json)["status"] if self.status_json.is_file() else None

    def last_checkpoint(self) -> Path | None:
        """The folder of the last complete checkpoint (``model.keras`` + ``state.json``), or None."""
        return find_last_checkpoint(self.last_checkpoint_dir)

    def history(self) -> list[dict[str, Any]]:
        """The rows of ``history.csv`` (numbers; NaN where written ``nan`` or empty, :mod:`segpipe.tables`),
        or [] before the first epoch ended."""
        if not self.history_csv.is_file():
            return []
        return read_csv(self.history_csv)

    def epoch_seconds(self) -> list[float]:
        """The wall-clock seconds of each finished epoch (``epoch_times.csv``), or [] before the first ended."""
        if not self.epoch_times_csv.is_file():
            return []
        return [float(row["seconds"]) for row in read_csv(self.epoch_times_csv)]

    def model_file(self, which: str | os.PathLike | None = None) -> tuple[str, Path]:
        """The one checkpoint resolver: ``(name, path)`` of the model a run is evaluated or exported with.

        Parameters
        ----------
        which : {None, "best", "last", "final"} or path to a ``.keras`` file
            None: the best checkpoint if there is one, else the final model (what ``evaluate.py`` and
            the bundle at the end of training use). ``"best"``: ``checkpoints/best.keras`` (chosen
            on the validation cases); ``"last"``: the last finished epoch or stop; ``"final"``:
            ``model.keras``; a path: that file.

        Raises
        ------
        ValueError
            ``which`` is none of these.
        FileNotFoundError
            The run has no such model.
        """
        if which is None:
            for name, path in (("best", self.best_model), ("final", self.final_model)):
                if path.is_file():
                    return name, path
            raise FileNotFoundError(expected("a trained model (checkpoints/best.keras or model.keras)",
                                             key="run_dir", received=Received(f"{self.path} (neither exists)")))
        if which == "best":
            path = self.best_model
        elif which == "final":
            path = self.final_model
        elif which == "last":
            folder = self.last_checkpoint()
            path = (folder or self.last_checkpoint_dir) / "model.keras"
        elif isinstance(which, (str, os.PathLike)) and Path(which).suffix == ".keras":
            path = Path(which)
        else:
            raise ValueError(expected(f"one of {list(MODEL_CHOICES)} or a .keras file", key="model", received=which))
        if not path.is_file():
            raise FileNotFoundError(expected(f"the {str(which)!r} model at {path}", key="model",
                                             received=Received(f"{str(which)!r} (no such file)")))
        return str(which) if which in MODEL_CHOICES else "file", path

    # ------------------------------------------------------------ writers (atomic, segpipe.io)

    def write_config(self, config: Config) -> None:
        write_text(self.config_yaml, to_yaml(config))

    def write_split(self, split: dict[str, Any]) -> None:
        write_json(self.splits_json, split)

    def write_preprocessing(self, settings: PreprocessSettings) -> None:
        write_json(self.preprocessing_json, settings.to_dict())

    def write_status(self, status: str) -> None:
        if status not in STATUSES:
            raise ValueError(expected(f"one of {list(STATUSES)}", key="status", received=status))
        # the process id and host: which process a "running" run belongs to (its lock names the same)
        write_json(self.status_json, {"status": status, "pid": os.getpid(), "host": socket.gethostname()})
