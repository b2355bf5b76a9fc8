"""Ensemble bundles: several runs in one bundle whose probabilities are the members' average."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil

import numpy as np
import pytest
from inference_helpers import NON_RAS_AFFINE, make_run_dir, phantom_scan, tiny_model, write_scan

import predict
from segpipe.export.ensemble import check_members_agree, export_ensemble
from segpipe.export.run_export import export_run, load_run_member
from segpipe.inference.bundle import read_bundle
from segpipe.inference.runtimes import load_predictor
from segpipe.io import read_nifti
from segpipe.models.architecture import check_architecture

HAVE_ONNX = all(importlib.util.find_spec(m) for m in ("tf2onnx", "onnx", "onnxruntime"))
HAVE_OPENVINO = importlib.util.find_spec("openvino") is not None


@pytest.fixture(scope="module")
def folds(tmp_path_factory, phantom_root):
    """Two hand-made fold runs with different weights, and their ensemble bundle."""
    root = tmp_path_factory.mktemp("ensemble")
    models, runs = [], []
    for k in range(2):
        models.append(tiny_model(depth=3, deep_supervision=True, seed=10 + k))
        runs.append(make_run_dir(root / f"fold{k}", models[-1], phantom_root, depth=3))
    bundle = export_ensemble(runs, root / "ensemble", onnx=HAVE_ONNX,
                             postprocessing={"postprocess_largest_component": [2], "decided_on": "hand"})
    return models, runs, bundle


def test_the_ensemble_predicts_the_average_of_its_members(folds):
    models, _, bundle_dir = folds
    bundle = read_bundle(bundle_dir)
    meta = bundle.meta
    assert [m["run_dir"].endswith(f"fold{k}/runs/hand") for k, m in enumerate(meta["members"])] == [True, True]
    assert bundle.architecture["builder"] == "ensemble" and len(bundle.architecture["members"]) == 2
    assert meta["postprocessing"]["decided_on"] == "hand" and bundle.inference.postprocess_largest_component == (2,)
    x = np.random.default_rng(3).normal(size=(2, 16, 24, 16, 1)).astype(np.float32)
    by_hand = (models[0].predict_on_batch(x)[0] + models[1].predict_on_batch(x)[0]) / 2  # full-resolution outputs
    formats = ["keras"] + (["onnx"] if HAVE_ONNX else []) + (["openvino"] if HAVE_OPENVINO else [])
    for fmt in formats:
        np.testing.assert_allclose(load_predictor(bundle, fmt)(x), by_hand, atol=1e-5, err_msg=fmt)
    np.testing.assert_allclose(load_predictor(bundle, "savedmodel", trust_bundle=True)(x), by_hand, atol=1e-5)


def test_predict_py_with_an_ensemble_gives_the_members_mean_probabilities(folds, tmp_path):
    """Sliding window, blending, mirroring and resampling back are linear: the ensemble's probabilities
    on a raw scan are the mean of the member bundles' probabilities."""
    _, runs, bundle_dir = folds
    scan = write_scan(tmp_path / "scans" / "s.nii.gz", phantom_scan((18, 26, 20), seed=2), NON_RAS_AFFINE)
    member_bundles = [export_run(run, tmp_path / f"member{k}", verify=False, onnx=False) for k, run in enumerate(runs)]
    probabilities = []
    for name, bundle in [("ensemble", bundle_dir), *[(f"m{k}", b) for k, b in enumerate(member_bundles)]]:
        assert predict.main(["--model", str(bundle), "--input", str(scan), "--output", str(tmp_path / name), "--quiet",
                             "--save-probabilities", "--probabilities-dtype", "float32", "--largest-component"]) == 0
        probabilities.append(read_nifti(tmp_path / name / "s_probabilities.nii.gz").array)
    np.testing.assert_allclose(probabilities[0], (probabilities[1] + probabilities[2]) / 2, atol=1e-5)


@pytest.mark.parametrize("fmt", ["nifti", "npz"])
def test_saved_probabilities_sum_to_one_and_match_the_label_map(folds, tmp_path, fmt):
    """16 bits by default: per voxel the classes sum to 1 within the rounding, and their argmax is the
    label map wherever the two most likely classes are further apart than that rounding."""
    _, _, bundle_dir = folds
    scan = write_scan(tmp_path / "scans" / "s.nii.gz", phantom_scan((18, 26, 20), seed=3), NON_RAS_AFFINE)
    assert predict.main(["--model", str(bundle_dir), "--input", str(scan), "--output", str(tmp_path / "out"), "--quiet",
                         "--no-mirror", "--save-probabilities", fmt, "--largest-component"]) == 0
    labels = read_nifti(tmp_path / "out" / "s.nii.gz").array
    if fmt == "npz":
        stored = np.load(tmp_path / "out" / "s_probabilities.npz")
        probabilities = stored["probabilities"]
        np.testing.assert_array_equal(stored["affine"], read_nifti(scan).affine)
        assert list(stored["class_names"]) == ["background", "organ", "lesion"]
        assert probabilities.dtype == np.float16
    else:  # 16 bits as uint16 with the header's scale factor (NIfTI-1 has no float16)
        import nibabel as nib

        assert nib.load(tmp_path / "out" / "s_probabilities.nii.gz").get_data_dtype() == np.uint16
        probabilities = read_nifti(tmp_path / "out" / "s_probabilities.nii.gz").array
    assert probabilities.shape == (*labels.shape, 3)
    np.testing.assert_allclose(probabilities.astype(np.float64).sum(-1), 1.0, atol=3e-3)
    top2 = np.sort(probabilities.astype(np.float32), -1)[..., -2:]
    clear = top2[..., 1] - top2[..., 0] > 2e-3
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(np.argmax(probabilities, -1)[clear], labels[clear])


def test_members_must_share_classes_channels_and_preprocessing(folds):
    _, runs, _ = folds
    members = [load_run_member(run) for run in runs]
    check_members_agree(members)
    other = dataclasses.replace(members[1], class_names=["background", "organ", "tumour"])
    with pytest.raises(ValueError, match=r"Expected members that share classes \(the first member, .*fold0.*, has "
                                         r"\['background', 'organ', 'lesion'\]\)\. Received: "
                                         r"members.classes=.*fold1.*tumour"):
        check_members_agree([members[0], other])
    other = dataclasses.replace(members[1], preprocessing=dataclasses.replace(members[1].preprocessing, image_order=3))
    with pytest.raises(ValueError,
                       match=r"Expected members that share preprocessing .* Received: members.preprocessing="):
        check_members_agree([members[0], other])
    with pytest.raises(ValueError, match=r"Expected 2 to 16 run directories\. Received: run_dirs=\["):
        export_ensemble(runs[:1], runs[0].parent / "single")


def test_an_ensemble_description_is_bounded():
    member = {"builder": "unet3d", "in_channels": 1, "num_classes": 3, "args": {"depth": 2, "base_filters": 4}}
    assert check_architecture({"builder": "ensemble", "in_channels": 1, "num_classes": 3, "members": [member] * 2})
    with pytest.raises(ValueError,
                       match=r"Expected a list of 2 to 16 networks\. Received: architecture.members=list of 40"):
        check_architecture({"builder": "ensemble", "in_channels": 1, "num_classes": 3, "members": [member] * 40})
    nested = {"builder": "ensemble", "in_channels": 1, "num_classes": 3, "members": [member] * 2}
    with pytest.raises(ValueError, match=r"no nested ensembles"):
        check_architecture({"builder": "ensemble", "in_channels": 1, "num_classes": 3, "members": [nested, member]})
    with pytest.raises(ValueError, match=r"Expected 1 input channel\(s\) and 3 classes, as the ensemble"):
        check_architecture({"builder": "ensemble", "in_channels": 1, "num_classes": 3,
                            "members": [member, {**member, "num_classes": 4}]})


def test_predict_export_with_several_runs_writes_an_ensemble(folds, tmp_path, capsys):
    _, runs, _ = folds
    assert predict.main(["export", *map(str, runs)]) == 1
    assert "Expected --out DIR for an ensemble of several runs" in capsys.readouterr().err
    out = tmp_path / "cli_ensemble"
    assert predict.main(["export", *map(str, runs), "--out", str(out)]) == 0
    meta = json.loads((out / "bundle.json").read_text())
    assert len(meta["members"]) == 2 and meta["architecture"]["builder"] == "ensemble"


_EXPORT = """
import sys
from segpipe.export.ensemble import export_ensemble
export_ensemble(sys.argv[1:-1], sys.argv[-1], overwrite=True, verify=False)
"""


@pytest.mark.parametrize("point", ["atomic_write@.segpipe", "atomic_write@bundle.json"])
def test_an_ensemble_export_killed_leaves_the_old_bundle_or_none(folds, tmp_path, point):
    """SIGKILL at the first and the last write of an export: where a bundle existed it is still complete
    and unchanged; where none did, none appears; the next export removes the killed one's folder."""
    import os
    import subprocess
    import sys

    from process_helpers import REPO

    from segpipe.export.bundle import remove_orphaned_bundle_folders

    _, runs, bundle_dir = folds

    def export(out, failpoint=None):
        env = {**os.environ, **({"SEGPIPE_FAILPOINT": point} if failpoint else {})}
        return subprocess.run([sys.executable, "-c", _EXPORT, *map(str, runs), str(out)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=600)

    fresh = tmp_path / "fresh"
    assert export(fresh, point).returncode == -9
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert not fresh.exists() and len(leftovers) == 1 and leftovers[0].startswith(".fresh.tmp-")
    old = tmp_path / "old"
    shutil.copytree(bundle_dir, old)
    before = read_bundle(old).meta["manifest"]
    assert export(old, point).returncode == -9
    assert read_bundle(old).meta["manifest"] == before  # complete and unchanged (every file's SHA-256)
    if point == "atomic_write@.segpipe":  # a whole export after the kill, once
        result = export(fresh)
        assert result.returncode == 0, result.stderr[-2000:]
        assert read_bundle(fresh).architecture["builder"] == "ensemble"
    else:  # what every export does first, before its own folder (the leftover's contents do not matter to it)
        assert [p.name for p in remove_orphaned_bundle_folders(fresh)] == leftovers
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".fresh.")]  # the killed export's folder is gone
