"""train.py --folds K ends with <name>_ensemble: out-of-fold evaluation, post-processing chosen on it, one bundle."""
from __future__ import annotations

import json

import numpy as np

import evaluate
import train
from segpipe.inference.bundle import read_bundle
from segpipe.io import read_nifti


def test_folds_end_with_an_ensemble_of_all_folds(tiny_overrides, tmp_path, phantom_root, capsys):
    args = ["--set", *tiny_overrides, "train.export_bundle=true", "train.epochs=1", "train.steps_per_epoch=2",
            "inference.mirror_axes=[]", "name=ens", "--folds", "2"]
    assert train.main(args) == 0
    runs = tmp_path / "runs"
    ensemble = runs / "ens_ensemble"
    assert "Ensemble of 2 folds" in capsys.readouterr().out
    summary = json.loads((ensemble / "ensemble.json").read_text())
    cases = sorted(p.name for p in (phantom_root / "labelsTr").iterdir())
    # every training case predicted out of fold, by the fold that did not train on it
    assert sorted(p.name for p in (ensemble / "oof_predictions").iterdir()) == cases and summary["cases"] == len(cases)
    for k in (0, 1):
        val = json.loads((runs / f"ens_fold{k}" / "splits.json").read_text())["val"]
        for case in val:
            np.testing.assert_array_equal(read_nifti(ensemble / "oof_predictions" / f"{case}.nii.gz").array,
                                          read_nifti(runs / f"ens_fold{k}" / "predictions" / f"{case}.nii.gz").array)
    record = summary["postprocessing"]
    assert {"postprocess_largest_foreground", "postprocess_largest_component", "dice_before",
            "dice_after"} <= set(record)
    evaluation = json.loads((ensemble / "evaluation" / "summary.json").read_text())
    assert evaluation["postprocessing"] == json.loads(json.dumps(record))
    bundle = read_bundle(ensemble / "bundle")
    assert [m["run_dir"] for m in bundle.meta["members"]] == [str((runs / f"ens_fold{k}").resolve()) for k in (0, 1)]
    assert bundle.inference.postprocess_largest_component == tuple(record["postprocess_largest_component"])
    assert bundle.inference.postprocess_largest_foreground == record["postprocess_largest_foreground"]

    # the same command again (a resume): the finished folds are skipped and the complete ensemble is kept
    before = (ensemble / "ensemble.json").stat().st_mtime_ns
    assert train.main(args) == 0
    assert (ensemble / "ensemble.json").stat().st_mtime_ns == before

    # the same from runs one chooses
    chosen = tmp_path / "chosen"
    assert evaluate.main(["--ensemble", str(runs / "ens_fold0"), str(runs / "ens_fold1"), "--out", str(chosen)]) == 0
    assert json.loads((chosen / "ensemble.json").read_text())["postprocessing"] == summary["postprocessing"]
    assert "out-of-fold foreground Dice" in capsys.readouterr().out
