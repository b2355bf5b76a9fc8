"""A tiny end-to-end run: train.py -> run directory -> evaluate.py; resume after a crash."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest

import evaluate
import predict
import train
from segpipe.config import load_config
from segpipe.io import read_nifti


def read_history(run_dir: Path) -> list[dict]:
    with open(run_dir / "history.csv") as f:
        return list(csv.DictReader(f))


def test_train_then_evaluate(tiny_run, tmp_path, phantom_root):
    run_dir, overrides = tiny_run  # train.main(["--set", *overrides]) == 0, bundle exported
    for name in ("config.yaml", "splits.json", "history.csv", "model.keras", "checkpoints/best.keras",
                 "checkpoints/last/model.keras", "checkpoints/last/state.json", "bundle/bundle.json",
                 "bundle/model.weights.h5", "bundle/savedmodel/saved_model.pb"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "tensorboard" / "train").iterdir())
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "finished" and isinstance(status["pid"], int) and status["host"]
    assert json.loads((run_dir / ".segpipe").read_text())["kind"] == "run"  # --overwrite may delete it
    assert not (run_dir.parent / f".{run_dir.name}.lock").exists()  # released at the end
    resolved = load_config(run_dir / "config.yaml")
    assert resolved.train.epochs == 2 and resolved.data.patch_size == [16, 16, 16]

    history = read_history(run_dir)
    assert [row["epoch"] for row in history] == ["1", "2"]
    for column in ("loss", "val_loss", "val_dice_organ", "val_dice_lesion", "val_dice_fg_mean"):
        assert column in history[0], column

    split = json.loads((run_dir / "splits.json").read_text())
    assert len(split["val"]) == 2 and len(split["train"]) == 4
    assert not set(split["val"]) & set(split["train"])

    # a finished run is not trained again
    assert train.main(["--set", *overrides]) == 0
    assert len(read_history(run_dir)) == 2

    assert evaluate.main([str(run_dir), "--workers", "1"]) == 0  # parallel scoring: test_evaluation.py
    for case_id in split["val"]:
        prediction = read_nifti(run_dir / "predictions" / f"{case_id}.nii.gz")
        image = read_nifti(phantom_root / "imagesTr" / f"{case_id}.nii.gz")
        assert prediction.array.shape == image.array.shape
        np.testing.assert_allclose(prediction.affine, image.affine)
        assert np.issubdtype(prediction.array.dtype, np.integer)
    with open(run_dir / "evaluation" / "per_case.csv") as f:
        rows = list(csv.DictReader(f))
    assert {row["case"] for row in rows} == set(split["val"])
    for row in rows:  # the reported Dice is the Dice of the written prediction against the reference
        pred = read_nifti(run_dir / "predictions" / f"{row['case']}.nii.gz").array == int(row["class"])
        ref = read_nifti(phantom_root / "labelsTr" / f"{row['case']}.nii.gz").array == int(row["class"])
        assert ref.any()  # both phantom classes occur in every case
        expected_dice = 2 * np.sum(pred & ref) / (pred.sum() + ref.sum())
        assert float(row["dice"]) == pytest.approx(expected_dice, rel=1e-9)
    assert (run_dir / "evaluation" / "summary.json").is_file()

    # the bundle written at the end of training segments a raw scan as evaluate.py's predict_run did
    bundle = json.loads((run_dir / "bundle" / "bundle.json").read_text())
    assert bundle["source"]["checkpoint"] == "best" and bundle["patch_size"] == [16, 16, 16]
    assert bundle["inference"]["mirror_axes"] == [0, 1, 2] and bundle["inference"]["overlap"] == 0.5
    case_id = split["val"][0]
    out = tmp_path / "bundle_predictions"
    assert predict.main(["--model", str(run_dir / "bundle"), "--input",
                         str(phantom_root / "imagesTr" / f"{case_id}.nii.gz"),
                         "--output", str(out), "--quiet"]) == 0
    from_bundle = read_nifti(out / f"{case_id}.nii.gz")
    from_run = read_nifti(run_dir / "predictions" / f"{case_id}.nii.gz")
    np.testing.assert_array_equal(from_bundle.array, from_run.array)
    np.testing.assert_allclose(from_bundle.affine, from_run.affine)


def test_unfinished_run_needs_resume_or_overwrite(tiny_overrides, tmp_path, capsys):
    run_dir = tmp_path / "runs" / "x"
    run_dir.mkdir(parents=True)
    (run_dir / "status.json").write_text('{"status": "running"}')
    assert train.main(["--set", *tiny_overrides, "name=x"]) == 1
    assert "--resume" in capsys.readouterr().err


def test_resume_after_a_crash_equals_an_uninterrupted_run(resumed_tiny_run, tiny_run):
    """A KeyboardInterrupt right after the first checkpoint, then --resume: the history of the
    uninterrupted run (``tiny_run``: the same config and seed)."""
    crashed = resumed_tiny_run["run_dir"]
    assert resumed_tiny_run["status"] == "running"  # at the crash
    assert len(resumed_tiny_run["history"]) == 1

    assert resumed_tiny_run["resume_code"] == 0
    assert json.loads((crashed / "status.json").read_text())["status"] == "finished"
    straight = read_history(tiny_run[0])
    resumed = read_history(crashed)
    assert [r["epoch"] for r in resumed] == ["1", "2"]  # no duplicated or missing epochs
    assert len(straight) == 2
    for a, b in zip(straight, resumed):
        for key in ("loss", "val_loss", "val_dice_fg_mean"):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-4, abs=1e-5), key
