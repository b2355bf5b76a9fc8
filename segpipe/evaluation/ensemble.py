"""The ensemble of k-fold runs: out-of-fold predictions, post-processing chosen on them, one bundle.

nnU-Net's published numbers come from this workflow; :func:`build_ensemble_run` does it for the fold
runs of ``train.py --folds K`` (at the end of the command, also after a resume) or for runs you
choose (``evaluate.py --ensemble RUN RUN ... --out DIR``)::

    <name>_ensemble/
      .segpipe              marker (kind "ensemble")
      oof_predictions/      every training case, predicted by the fold that did not train on it
      references/           links to the dataset's label maps of the same cases
      oof_postprocessed/    the same with the chosen post-processing applied
      evaluation/           scores of oof_postprocessed (summary.json also holds "postprocessing")
      bundle/               all K networks in one bundle (segpipe.export.ensemble), post-processing included
      ensemble.json         members, cases, the post-processing decision with Dice before and after

Post-processing is chosen on the out-of-fold predictions by
:func:`segpipe.evaluation.postprocessing.choose_postprocessing` (nnU-Net's largest-component steps,
switched on only with a Wilcoxon-significant gain). Each fold's predictions come from its own
evaluation (``evaluate.py RUN``: run now if missing), so they use the fold's best checkpoint.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any, Sequence

from segpipe.data.pipeline import open_dataset
from segpipe.errors import Received, expected
from segpipe.evaluation.folders import evaluate_folders
from segpipe.evaluation.postprocessing import DEFAULT_ALPHA, choose_postprocessing_folders
from segpipe.evaluation.run import evaluate_run
from segpipe.export.ensemble import export_ensemble
from segpipe.inference.postprocess import apply_largest_component_steps
from segpipe.io import atomic_path, read_nifti, write_nifti
from segpipe.locks import hold
from segpipe.ownership import check_replaceable, has_marker, write_marker
from segpipe.runs.rundir import RunDir
from segpipe.tables import read_json, write_json

ENSEMBLE_SUFFIX = "_ensemble"
_FOLD = re.compile(r"^(?P<name>.+)_fold\d+$")


def ensemble_dir(fold_dirs: Sequence[str | os.PathLike]) -> Path:
    """``<parent>/<name>_ensemble`` for runs named ``<name>_fold<k>`` (else ``<first run>_ensemble``)."""
    first = Path(fold_dirs[0])
    match = _FOLD.match(first.name)
    return first.with_name((match["name"] if match else first.name) + ENSEMBLE_SUFFIX)


def build_ensemble_run(
    fold_dirs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike | None = None,
    *,
    checkpoint: str = "best",
    overwrite: bool = False,
    alpha: float = DEFAULT_ALPHA,
    workers: int | None = 1,
    onnx: bool = False,
) -> Path:
    """Write the ensemble folder of ``fold_dirs`` (see the module); returns it.

    Parameters
    ----------
    fold_dirs
        2 to 16 finished runs whose validation cases do not overlap (the folds of one k-fold split).
    out_dir
        The ensemble folder; default :func:`ensemble_dir`.
    checkpoint
        ``best`` or ``final``: the model each fold predicts with and the bundle holds.
    overwrite
        Rebuild a complete ensemble folder (one segpipe wrote); without it a complete one is kept as
        it is (a resumed command does not redo it).
    alpha
        Significance level of the post-processing rule.
    workers
        Processes for scoring and the post-processing choice.
    onnx
        Also write ONNX into the bundle.

    Raises
    ------
    ValueError
        A case predicted by two runs (not folds of one split), or members that differ
        (classes, channels, preprocessing, patch size: :func:`segpipe.export.ensemble.check_members_agree`).
    FileExistsError
        ``out_dir`` exists and is not an ensemble folder segpipe wrote.
    """
    fold_dirs = [Path(d) for d in fold_dirs]
    out = Path(out_dir) if out_dir is not None else ensemble_dir(fold_dirs)
    check_replaceable(out, "ensemble", key="out_dir")
    if (out / "ensemble.json").is_file() and not overwrite:
        return out
    out.mkdir(parents=True, exist_ok=True)
    with hold(out, what="ensemble folder"):
        write_marker(out, "ensemble")
        oof, refs = out / "oof_predictions", out / "references"
        cases = _collect_out_of_fold(fold_dirs, oof, refs, checkpoint=checkpoint, workers=workers)
        dataset = open_dataset(RunDir(fold_dirs[0]).config().data)  # as training: data.ignore_label, data.regions
        labels = [v for v in sorted(dataset.labels) if v != 0]
        record = choose_postprocessing_folders(oof, refs, labels=labels, alpha=alpha, workers=workers)
        post = out / "oof_postprocessed"
        for case in cases:
            volume = read_nifti(oof / f"{case}.nii.gz")
            labels_after = apply_largest_component_steps(
                volume.array, largest_foreground=record["postprocess_largest_foreground"],
                classes=record["postprocess_largest_component"], connectivity=record["connectivity"])
            write_nifti(post / f"{case}.nii.gz", labels_after.astype(volume.array.dtype), volume.affine)
        summary = evaluate_folders(post, refs, out / "evaluation", labels=labels, class_names=dataset.class_names,
                                   workers=workers, ignore_label=dataset.ignore_label, regions=dataset.regions)
        summary["postprocessing"] = record  # where evaluate.py --compare's recommendation reads it
        write_json(out / "evaluation" / "summary.json", summary)
        export_ensemble(fold_dirs, out / "bundle", checkpoint=checkpoint, postprocessing=record, onnx=onnx,
                        overwrite=True)
        write_json(out / "ensemble.json", {
            "members": [str(d.resolve()) for d in fold_dirs], "checkpoint": checkpoint, "cases": len(cases),
            "postprocessing": record, "dice_before": record["dice_before"], "dice_after": record["dice_after"],
        })  # last: its presence marks the ensemble folder complete
    return out


def ensemble_summary(out_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The ``ensemble.json`` of a complete ensemble folder, or None."""
    path = Path(out_dir) / "ensemble.json"
    return read_json(path) if path.is_file() and has_marker(path.parent, "ensemble") else None


def _collect_out_of_fold(fold_dirs: Sequence[Path], oof: Path, refs: Path, *, checkpoint: str,
                         workers: int | None) -> list[str]:
    """Copy every fold's validation predictions into ``oof`` and link their references into ``refs``.

    A fold without a complete evaluation (``evaluation/per_case.csv``) is evaluated first.
    """
    seen: dict[str, Path] = {}
    for fold in fold_dirs:
        run = RunDir(fold)
        if not (run.evaluation_dir / "per_case.csv").is_file():
            evaluate_run(fold, model=checkpoint if checkpoint in ("best", "final") else None, workers=workers,
                         report=False)
        for reference in sorted((run.evaluation_dir / "references").glob("*.nii.gz")):
            case = reference.name[: -len(".nii.gz")]
            if case in seen:
                raise ValueError(expected(
                    "runs whose validation cases do not overlap (the folds of one split)", key="fold_dirs",
                    received=Received(f"{case} predicted by {seen[case]} and {fold}")))
            seen[case] = fold
            with atomic_path(oof / reference.name) as tmp:
                shutil.copyfile(run.predictions_dir / reference.name, tmp)
            link = refs / reference.name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.unlink(missing_ok=True)
            link.symlink_to(reference.resolve())
    return sorted(seen)
