"""Prediction of a trained run's validation cases (``evaluate.py RUN_DIR``).

:func:`predict_run` segments each validation case the way ``predict.py`` segments a new scan
(:func:`segpipe.predict.segment_preprocessed`: sliding window over the preprocessed image with the
run's ``inference`` settings, probabilities mapped back onto the original grid, argmax, optional
largest-component post-processing), starting from the run's cached preprocessed image.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from segpipe.io import write_nifti


def predict_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None, *, model: str | None = None):
    """Predict the validation cases of a trained run into ``out_dir`` (default ``RUN_DIR/predictions``).

    Each case is predicted on its preprocessed (cached) image, with the run's own preprocessing
    settings and split, by sliding windows of ``data.patch_size`` with the run's ``inference``
    settings (overlap, mirroring, batch size); the probabilities are mapped back onto the original
    image grid (linear interpolation, outside the crop box background), and the argmax there, after
    ``inference.postprocess_largest_component``, is written as a NIfTI label map with the original
    shape and affine. The model is the best checkpoint, else the final model (:func:`run_model`);
    ``model="best"`` or ``"final"`` insists on one of them.

    Returns ``(pred_dir, ref_dir, labels, class_names)``: the predictions, a folder of links to the
    reference label maps of the same cases, the foreground label values, and the class names
    indexed by label value.
    """
    import keras
    from tqdm import tqdm

    from segpipe.data.pipeline import prepare_data, read_run_settings, read_run_split
    from segpipe.export import InferenceSettings
    from segpipe.predict import segment_preprocessed
    from segpipe.sliding_window import keras_predict_fn
    from segpipe.training import load_run_config

    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    split = read_run_split(run_dir)
    if split is None:
        raise FileNotFoundError(f"Expected the run's split in {run_dir / 'splits.json'}; found none")
    prepared = prepare_data(config, split=split, settings=read_run_settings(run_dir))
    model = keras.models.load_model(run_model(run_dir, model)[1], compile=False)  # safe_mode stays on
    predict_fn = keras_predict_fn(model)
    settings = InferenceSettings.from_object(config.inference)

    pred_dir = Path(out_dir) if out_dir else run_dir / "predictions"
    ref_dir = run_dir / "evaluation" / "references"
    ref_dir.mkdir(parents=True, exist_ok=True)
    for cached in tqdm(prepared.subset("val"), desc="Predicting", unit="case"):
        result = segment_preprocessed(
            predict_fn, np.asarray(cached.load_image()), cached.meta, patch_size=config.data.patch_size,
            settings=settings,
        )
        name = f"{cached.case_id}.nii.gz"
        write_nifti(pred_dir / name, result.labels, result.affine)
        _link(ref_dir / name, prepared.dataset.case(cached.case_id).label_path)
    dataset = prepared.dataset
    labels = [v for v in sorted(dataset.labels) if v != 0]
    return pred_dir, ref_dir, labels, dataset.class_names


def run_model(run_dir: str | os.PathLike, which: str | None = None) -> tuple[str, Path]:
    """The model a run is evaluated and exported with: ``("best", checkpoints/best.keras)``, else
    ``("final", model.keras)`` (names as :func:`segpipe.export.export_run` takes them).

    ``which="best"`` or ``"final"`` asks for that one (an error if the run has none). The best
    checkpoint was chosen on the validation cases, so scores of the final model on them are the
    ones free of that selection.
    """
    run_dir = Path(run_dir)
    candidates = {"best": run_dir / "checkpoints" / "best.keras", "final": run_dir / "model.keras"}
    if which is not None and which not in candidates:
        raise ValueError(f"Expected model 'best' or 'final'. Received: model={which!r}")
    for name, path in candidates.items():
        if which in (None, name) and path.is_file():
            return name, path
    wanted = candidates[which].relative_to(run_dir) if which else "checkpoints/best.keras or model.keras"
    raise FileNotFoundError(f"Expected a trained model in {run_dir} ({wanted}); found none")


def _link(link: Path, target: Path) -> None:
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(Path(target).resolve())
