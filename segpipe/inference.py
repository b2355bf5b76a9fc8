"""Prediction of whole volumes with a trained model, and of a run's validation cases.

A volume is padded at the end to a size the network accepts, predicted in one pass, cropped back
and turned into a label map with argmax. :func:`predict_run` predicts a run's validation cases on
their preprocessed images and maps the probabilities back onto the original grid. (Sliding-window
prediction for volumes larger than memory allows and test-time mirroring come with issue 6.)
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from segpipe.data.preprocess import restore_to_original
from segpipe.io import write_nifti


def predict_probabilities(model, image: np.ndarray, divisor: int) -> np.ndarray:
    """Softmax probabilities (X, Y, Z, C) of a channels-last image (X, Y, Z, Cin)."""
    shape = image.shape[:3]
    padded = tuple(-(-n // divisor) * divisor for n in shape)
    batch = np.zeros((1, *padded, image.shape[-1]), dtype=np.float32)
    batch[0, : shape[0], : shape[1], : shape[2]] = image
    out = model.predict_on_batch(batch)
    if isinstance(out, (list, tuple)):  # deep supervision: full resolution first
        out = out[0]
    return np.asarray(out)[0, : shape[0], : shape[1], : shape[2]]


def predict_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None):
    """Predict the validation cases of a trained run into ``out_dir`` (default ``RUN_DIR/predictions``).

    Each case is predicted on its preprocessed (cached) image, with the run's own preprocessing
    settings and split; the probabilities are mapped back onto the original image grid (linear
    interpolation, outside the crop box background) and the argmax there is written as a NIfTI label
    map with the original shape and affine.

    Returns ``(pred_dir, ref_dir, labels, class_names)``: the predictions, a folder of links to the
    reference label maps of the same cases, the foreground label values, and the class names
    indexed by label value.
    """
    import keras
    from tqdm import tqdm

    from segpipe.data.pipeline import prepare_data, read_run_settings, read_run_split
    from segpipe.training import load_run_config

    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    split = read_run_split(run_dir)
    if split is None:
        raise FileNotFoundError(f"Expected the run's split in {run_dir / 'splits.json'}; found none")
    prepared = prepare_data(config, split=split, settings=read_run_settings(run_dir))
    model = keras.models.load_model(_model_path(run_dir), compile=False)  # safe_mode stays on

    pred_dir = Path(out_dir) if out_dir else run_dir / "predictions"
    ref_dir = run_dir / "evaluation" / "references"
    ref_dir.mkdir(parents=True, exist_ok=True)
    divisor = 2 ** (config.model.depth - 1)
    for cached in tqdm(prepared.subset("val"), desc="Predicting", unit="case"):
        probabilities = predict_probabilities(model, np.asarray(cached.load_image()), divisor)
        name = f"{cached.case_id}.nii.gz"
        write_nifti(pred_dir / name, labels_on_original_grid(probabilities, cached.meta),
                    np.asarray(cached.meta["original_affine"]))
        _link(ref_dir / name, prepared.dataset.case(cached.case_id).label_path)
    dataset = prepared.dataset
    labels = [v for v in sorted(dataset.labels) if v != 0]
    return pred_dir, ref_dir, labels, dataset.class_names


def labels_on_original_grid(probabilities: np.ndarray, meta: dict) -> np.ndarray:
    """Argmax on the original image grid of probabilities (X, Y, Z, C) on the preprocessed grid.

    Probabilities, not labels, are resampled (linearly), so class borders fall between voxels of
    the preprocessed grid as the network saw them; outside the crop box is background.
    """
    fill = np.zeros(probabilities.shape[-1], dtype=np.float32)
    fill[0] = 1.0
    restored = restore_to_original(probabilities.astype(np.float32, copy=False), meta, order=1, fill_value=fill)
    return np.argmax(restored, axis=-1).astype(np.uint8)


def _model_path(run_dir: Path) -> Path:
    """The best checkpoint, else the final model."""
    for path in (run_dir / "checkpoints" / "best.keras", run_dir / "model.keras"):
        if path.is_file():
            return path
    raise FileNotFoundError(f"Expected a trained model in {run_dir} (checkpoints/best.keras or model.keras); found none")


def _link(link: Path, target: Path) -> None:
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(Path(target).resolve())
