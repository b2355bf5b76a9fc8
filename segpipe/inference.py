"""Prediction of whole volumes with a trained model, and of a run's validation cases.

A volume is padded at the end to a size the network accepts, predicted in one pass, cropped back
and turned into a label map with argmax. (Sliding-window prediction for volumes larger than memory
allows, test-time mirroring and the mapping back through preprocessing come with issue 6.)
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from segpipe.io import strip_nifti_suffix, write_nifti


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

    Returns ``(pred_dir, ref_dir, labels, class_names)``: the predictions, a folder of links to the
    reference label maps of the same cases, the foreground label values, and the class names
    indexed by label value.
    """
    import keras
    from tqdm import tqdm

    from segpipe.data.loader import load_case
    from segpipe.io import read_json
    from segpipe.training import load_run_config, prepare_dataset

    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    dataset = prepare_dataset(config)
    split = read_json(run_dir / "splits.json")
    model_path = run_dir / "checkpoints" / "best.keras"
    if not model_path.is_file():
        model_path = run_dir / "model.keras"
    if not model_path.is_file():
        raise FileNotFoundError(f"Expected a trained model in {run_dir} (checkpoints/best.keras or model.keras); found none")
    model = keras.models.load_model(model_path, compile=False)  # safe_mode stays on

    pred_dir = Path(out_dir) if out_dir else run_dir / "predictions"
    ref_dir = run_dir / "evaluation" / "references"
    ref_dir.mkdir(parents=True, exist_ok=True)
    divisor = 2 ** (config.model.depth - 1)
    for case_id in tqdm(split["val"], desc="Predicting", unit="case"):
        case = dataset.case(case_id)
        loaded = load_case(case, dataset.num_classes)
        probabilities = predict_probabilities(model, loaded.image, divisor)
        name = f"{case_id}.nii.gz"
        write_nifti(pred_dir / name, np.argmax(probabilities, axis=-1).astype(np.uint8), loaded.affine)
        link = ref_dir / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(case.label_path.resolve())
    labels = [v for v in sorted(dataset.labels) if v != 0]
    return pred_dir, ref_dir, labels, dataset.class_names
