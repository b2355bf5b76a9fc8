"""Run mode: predict a trained run's validation cases, then score them like folders.

Imports TensorFlow (through :mod:`segpipe.evaluation.predictions`) only when called, so the folder mode of
``evaluate.py`` never loads it.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from segpipe.data.labels import Region
from segpipe.errors import expected, first_line
from segpipe.evaluation.folders import score_folders
from segpipe.evaluation.options import EvaluationOptions, LesionOptions
from segpipe.locks import hold
from segpipe.runs.rundir import RunDir

__all__ = ["evaluate_run"]


def evaluate_run(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    *,
    labels: Sequence[int] | None = None,
    class_names: Sequence[str] | Mapping[int, str] | None = None,
    tolerance_mm: float | Mapping[int, float] = 1.0,
    workers: int | None = None,
    model: str | None = None,
    lesion_labels: Iterable[int] | None = None,
    lesion_min_size_mm3: float = 0.0,
    lesion_dilation_vox: int = 0,
    report: bool = True,
    image_dir: str | os.PathLike | None = None,
) -> tuple[dict[str, Any], Path]:
    """Predict a trained run's validation cases and score them.

    Parameters
    ----------
    run_dir : path-like
        The trained run.
    out_dir : path-like, optional
        Where the scores go. Default ``RUN_DIR/evaluation``; predictions go to ``RUN_DIR/predictions``.
    model : {"best", "final"}, optional
        The model to predict with. Default: the best checkpoint if there is one.
    labels, class_names, tolerance_mm, workers, report, image_dir
        As :func:`segpipe.evaluation.folders.evaluate_folders`; labels and class names default to the
        run's. The report finds the scans beside the dataset's label maps, which the references link to.
        The run's dataset gives the ignore label and regions (``data.ignore_label``, ``data.regions``
        or its ``dataset.json``).
    lesion_labels, lesion_min_size_mm3, lesion_dilation_vox
        As :func:`segpipe.evaluation.folders.evaluate_folders`.

    Returns
    -------
    summary : dict
        As :func:`segpipe.evaluation.folders.evaluate_folders`.
    out_dir : Path
        The folder the scores were written to.

    Raises
    ------
    ValueError
        An option out of range (checked before anything is predicted).
    FileNotFoundError
        ``run_dir`` is not a run directory.
    segpipe.locks.LockHeldError
        Another process evaluates this run (it holds the lock of ``RUN_DIR/evaluation``).
    """
    options = EvaluationOptions(
        labels=labels, class_names=class_names, tolerance_mm=tolerance_mm, workers=workers, report=report,
        image_dir=image_dir, lesions=LesionOptions(labels=lesion_labels or (), min_size_mm3=lesion_min_size_mm3,
                                                   dilation_vox=lesion_dilation_vox),
    )
    from segpipe.evaluation.predictions import predict_run  # TensorFlow: only the run mode needs it

    run = RunDir(run_dir)
    if not run.is_run():  # before the lock, which would create the folder
        raise FileNotFoundError(expected("a run directory with config.yaml", key="run_dir", received=str(run.path)))
    out = Path(out_dir) if out_dir is not None else run.evaluation_dir
    # one evaluation of a run at a time: a second one stops at once naming the first
    # (segpipe.locks.LockHeldError) instead of mixing their predictions
    with hold(run.evaluation_dir, what="evaluation folder"):
        pred_dir, ref_dir, run_labels, run_names = predict_run(run.path, model=model)
        ignore_label, regions = _run_label_scheme(run)
        options = replace(options, labels=options.labels if options.labels is not None else run_labels,
                          class_names=options.class_names if options.class_names is not None else run_names,
                          ignore_label=ignore_label, regions=regions or ())
        return score_folders(pred_dir, ref_dir, out, options), out


def _run_label_scheme(run: RunDir) -> tuple[int | None, tuple[Region, ...] | None]:
    """The ignore label and regions of a run's dataset (its config and dataset.json); none, with a
    warning, when the dataset cannot be opened (the predictions are then scored as plain labels)."""
    from segpipe.data.pipeline import open_dataset  # the config layer: only the run mode needs it

    config = run.config()
    try:
        dataset = open_dataset(config.data)
    except (OSError, ValueError) as exc:
        warnings.warn(f"Cannot open the run's dataset {config.data.root} ({first_line(exc)}): scoring without its "
                      "ignore label and regions", stacklevel=3)
        return None, None
    return dataset.ignore_label, dataset.regions
