"""Prediction of a trained run's validation cases (``evaluate.py RUN_DIR``).

:func:`predict_run` segments each validation case the way ``predict.py`` segments a new scan
(:func:`segpipe.inference.segment.segment_preprocessed`: sliding window over the preprocessed image with the
run's ``inference`` settings, probabilities mapped back onto the original grid, argmax, optional
largest-component post-processing), starting from the run's cached preprocessed image.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from segpipe.data.pipeline import prepare_data
from segpipe.errors import Received, expected
from segpipe.inference.segment import segment_preprocessed
from segpipe.inference.sliding_window import keras_predict_fn
from segpipe.io import explain_write_errors, remove_orphaned_temporaries, write_nifti
from segpipe.runs.rundir import RunDir


def predict_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None, *, model: str | None = None):
    """Predict the validation cases of a trained run into ``out_dir`` (default ``RUN_DIR/predictions``).

    Each case is predicted on its preprocessed (cached) image, with the run's own preprocessing
    settings and split, by sliding windows of ``data.patch_size`` with the run's ``inference``
    settings (overlap, mirroring, batch size); the probabilities are mapped back onto the original
    image grid (linear interpolation, outside the crop box background), and the argmax there, after
    ``inference.postprocess_largest_component``, is written as a NIfTI label map with the original
    shape and affine. The model is the best checkpoint, else the final model (:meth:`RunDir.model_file`);
    ``model="best"`` or ``"final"`` insists on one of them. A full disk or a read-only folder stops with
    a :class:`segpipe.errors.StorageError` naming the file; the label maps written before it are complete.

    Returns ``(pred_dir, ref_dir, labels, class_names)``: the predictions, a folder of links to the
    reference label maps of the same cases, the foreground label values, and the class names
    indexed by label value.
    """
    import keras
    from tqdm import tqdm

    from segpipe.models.unet3d import probability_model  # loads Keras, as the model does

    run = RunDir(run_dir)
    config = run.config()
    split = run.split()
    if split is None:
        raise FileNotFoundError(expected("the run's split", key="splits.json",
                                         received=Received(f"{run.splits_json} (no such file)")))
    prepared = prepare_data(config, split=split, settings=run.preprocessing())
    if model not in (None, "best", "final"):
        raise ValueError(expected("'best' or 'final' (the models of a finished run)", key="model", received=model))
    model = keras.models.load_model(run.model_file(model)[1], compile=False)  # safe_mode stays on
    predict_fn = keras_predict_fn(probability_model(model))  # probabilities also from a logits head

    pred_dir = Path(out_dir) if out_dir else run.predictions_dir
    ref_dir = run.evaluation_dir / "references"
    with explain_write_errors(ref_dir):
        ref_dir.mkdir(parents=True, exist_ok=True)
    remove_orphaned_temporaries(pred_dir)  # of an earlier evaluation killed while writing a prediction
    for cached in tqdm(prepared.subset("val"), desc="Predicting", unit="case"):
        result = segment_preprocessed(
            predict_fn, np.asarray(cached.load_image()), cached.meta, patch_size=config.data.patch_size,
            settings=config.inference, regions_class_order=prepared.dataset.regions_class_order,
        )
        name = f"{cached.case_id}.nii.gz"
        write_nifti(pred_dir / name, result.labels, result.affine)  # atomic; names the file on a full disk
        with explain_write_errors(ref_dir / name):
            _link(ref_dir / name, prepared.dataset.case(cached.case_id).label_path)
    dataset = prepared.dataset
    labels = [v for v in sorted(dataset.labels) if v != 0]
    return pred_dir, ref_dir, labels, dataset.class_names


def _link(link: Path, target: Path) -> None:
    """Point ``link`` at ``target``: a new link beside it, renamed over it (no moment without one, and no
    ``FileExistsError`` if another process made it first)."""
    tmp = link.with_name(f".{link.name}.{os.getpid()}.link")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(Path(target).resolve())
    os.replace(tmp, link)
