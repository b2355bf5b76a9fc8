"""A region-based tiny training run on the generated 2-channel lesion phantom (nested regions
whole ⊃ core ⊃ enhancing, sparsely annotated: every other axial slice holds the ignore label),
then evaluation of the run: predictions are label maps from the regions, scored per region; the
run's bundle carries the regions, and every format predicts the run's own labels."""
import csv
import importlib.util
import json
import shutil
import types
from pathlib import Path

import numpy as np
import pytest
from conftest import _tiny

import evaluate
import predict
import train
from segpipe.data.labels import Region
from segpipe.data.layouts import load_dataset
from segpipe.data.phantoms import LESION_IGNORE, PhantomSettings, write_lesion_phantom_dataset
from segpipe.data.preprocess import PreprocessSettings
from segpipe.inference.bundle import BundleError, read_bundle
from segpipe.io import read_nifti

HAVE_ONNX = all(importlib.util.find_spec(m) for m in ("tf2onnx", "onnx", "onnxruntime"))
HAVE_OPENVINO = importlib.util.find_spec("openvino") is not None


@pytest.fixture(scope="module")
def lesion_root(tmp_path_factory):
    settings = PhantomSettings(num_cases=6, shape=(24, 24, 16), spacing_mm=(1.0, 1.0, 1.5), seed=5)
    return write_lesion_phantom_dataset(tmp_path_factory.mktemp("lesions") / "ds", settings, annotate_every=2)


def test_lesion_phantom_is_a_region_dataset(lesion_root):
    dataset = load_dataset(lesion_root)
    assert dataset.layout == "nnunet" and dataset.num_channels == 2
    assert dataset.regions == (Region("whole", (1, 2, 3)), Region("core", (2, 3)), Region("enhancing", (3,)))
    assert dataset.ignore_label == LESION_IGNORE
    label = np.asarray(read_nifti(lesion_root / "labelsTr" / "lesion_000.nii.gz").array)
    assert np.all(label[:, :, 1::2] == LESION_IGNORE) and set(np.unique(label[:, :, ::2])) == {0, 1, 2, 3}


@pytest.fixture(scope="module")
def region_run(lesion_root, phantom_root, tmp_path_factory):
    """A trained region run with its bundle (every format this machine can write), evaluated once."""
    out = tmp_path_factory.mktemp("region_runs")
    overrides = [*_tiny(phantom_root, out), f"data.root={lesion_root}", "name=regions",
                 "loss={terms: [{name: dice, include_background: false}, {name: ce}]}", "train.export_bundle=true",
                 f"train.export_onnx={'true' if HAVE_ONNX else 'false'}"]
    assert train.main(["--set", *overrides]) == 0
    run_dir = out / "regions"
    assert evaluate.main([str(run_dir)]) == 0
    return run_dir


def test_region_training_run_and_evaluation(region_run):
    run_dir = str(region_run)
    with open(f"{run_dir}/history.csv") as f:
        history = list(csv.DictReader(f))
    assert len(history) == 2
    for key in ("val_dice_whole", "val_dice_core", "val_dice_enhancing", "val_dice_fg_mean", "loss"):
        assert np.isfinite(float(history[-1][key])), key
    assert "val_dice_background" not in history[-1]

    import keras
    model = keras.models.load_model(f"{run_dir}/model.keras", compile=False)
    assert model.output_shape[-1] == 3 and model.layers[-1].activation is keras.activations.sigmoid

    summary = json.loads(open(f"{run_dir}/evaluation/summary.json").read())
    assert list(summary["regions"]) == ["whole", "core", "enhancing"]
    assert all("dice" in entry["metrics"] for entry in summary["regions"].values())
    predictions = sorted(Path(run_dir, "predictions").glob("*.nii.gz"))
    assert len(predictions) == 2  # the validation cases
    for path in predictions:
        assert set(np.unique(np.asarray(read_nifti(path).array))) <= {0, 1, 2, 3}


# --- the run's bundle carries the regions ------------------------------------------------------


def _val_cases(run_dir: Path) -> list[str]:
    return sorted(p.name[: -len(".nii.gz")] for p in (run_dir / "predictions").glob("*.nii.gz"))


def _inputs(lesion_root: Path, cases: list[str]) -> list[str]:
    return [str(lesion_root / "imagesTr" / f"{case}_{c:04d}.nii.gz") for case in cases for c in range(2)]


def test_region_bundle_records_regions(region_run):
    bundle = read_bundle(region_run / "bundle")
    assert bundle.regions == (Region("whole", (1, 2, 3)), Region("core", (2, 3)), Region("enhancing", (3,)))
    assert bundle.regions_class_order == (1, 2, 3) and bundle.ignore_label == LESION_IGNORE
    assert bundle.num_outputs == 3 and bundle.num_classes == 4  # sigmoid per region; label values 0..3
    assert bundle.meta["output_activation"] == "sigmoid"
    assert bundle.architecture["args"]["output"] == "sigmoid"
    # the segment signature was compared with segment_volume's region labels at export
    assert bundle.meta["verification"]["segment_label_agreement"] >= 0.999


@pytest.mark.parametrize("fmt", [
    "keras", "savedmodel",
    pytest.param("onnx", marks=pytest.mark.skipif(not HAVE_ONNX, reason="onnx extra not installed")),
    pytest.param("openvino", marks=pytest.mark.skipif(not HAVE_OPENVINO, reason="openvino extra not installed")),
])
def test_region_bundle_predicts_the_runs_labels(region_run, lesion_root, tmp_path, fmt):
    cases = _val_cases(region_run)
    out = tmp_path / fmt
    trust = ["--trust-bundle"] if fmt == "savedmodel" else []
    assert predict.main(["--model", str(region_run / "bundle"), "--input", *_inputs(lesion_root, cases),
                         "--output", str(out), "--format", fmt, "--quiet", *trust]) == 0
    for case in cases:
        ours = np.asarray(read_nifti(out / f"{case}.nii.gz").array)
        runs = np.asarray(read_nifti(region_run / "predictions" / f"{case}.nii.gz").array)
        assert ours.shape == runs.shape
        agreement = float((ours == runs).mean())
        # Keras is the run's own network: the same labels; the other runtimes within float rounding
        assert agreement == 1.0 if fmt == "keras" else agreement >= 0.999, (case, agreement)
        assert set(np.unique(ours)) <= {0, 1, 2, 3}


def test_region_bundle_probabilities_are_per_region(region_run, lesion_root, tmp_path):
    case = _val_cases(region_run)[0]
    assert predict.main(["--model", str(region_run / "bundle"), "--input", *_inputs(lesion_root, [case]),
                         "--output", str(tmp_path), "--save-probabilities", "npz", "--probabilities-dtype", "float32",
                         "--quiet"]) == 0
    stored = np.load(tmp_path / f"{case}_probabilities.npz")
    assert list(stored["class_names"]) == ["whole", "core", "enhancing"]
    probabilities = stored["probabilities"]
    labels = np.asarray(read_nifti(tmp_path / f"{case}.nii.gz").array)
    # nnU-Net's rule by hand: the last region above 0.5 wins
    by_hand = np.zeros(labels.shape, np.uint8)
    for i, value in enumerate((1, 2, 3)):
        by_hand[probabilities[..., i] > 0.5] = value
    assert np.array_equal(labels, by_hand)


def test_region_segment_signature_agrees_with_predict(region_run, lesion_root):
    import tensorflow as tf

    case = _val_cases(region_run)[0]
    channels = [read_nifti(lesion_root / "imagesTr" / f"{case}_{c:04d}.nii.gz") for c in range(2)]
    image = np.stack([np.asarray(v.array, np.float32) for v in channels], axis=-1)
    assert np.allclose(channels[0].affine, np.diag([1.0, 1.0, 1.5, 1.0]))  # RAS already: no reorientation
    signature = tf.saved_model.load(str(region_run / "bundle" / "savedmodel")).signatures["segment"]
    labels = signature(image=tf.constant(image), spacing_mm=tf.constant([1.0, 1.0, 1.5], tf.float64))["labels"].numpy()
    runs = np.asarray(read_nifti(region_run / "predictions" / f"{case}.nii.gz").array)
    assert labels.shape == runs.shape and float((labels == runs).mean()) >= 0.999


def _edited_bundle(region_run: Path, tmp_path: Path, **changes) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(region_run / "bundle", copy)
    meta = json.loads((copy / "bundle.json").read_text())
    meta.update(changes)
    (copy / "bundle.json").write_text(json.dumps(meta))
    return copy


@pytest.mark.parametrize("changes, message", [
    ({"regions": [{"name": "whole", "values": [0, 1]}, {"name": "core", "values": [2, 3]},
                  {"name": "enhancing", "values": [3]}]},
     "Expected a list of 1 to 256 regions {'name': str, 'values': [int, ...]} with unique names and values from 1 to "
     "255. Received: regions[0]={'name': 'whole', 'values': [0, 1]}."),
    ({"regions": "whole"}, "Received: regions='whole'."),
    ({"regions": [{"name": "a", "values": [1]}, {"name": "a", "values": [2]}, {"name": "b", "values": [3]}]},
     "Received: regions=names ['a', 'a', 'b']."),
    ({"regions_class_order": [1, 2]},
     "Expected one class value from 1 to 3 (a value of classes) per region (3). Received: regions_class_order=[1, 2]."),
    ({"regions_class_order": None}, "Received: regions_class_order=None."),
    ({"output_activation": "softmax"},
     "Expected 'sigmoid' (a region bundle has one probability per region). Received: output_activation='softmax'."),
    ({"regions": None, "regions_class_order": None},
     "Expected 'softmax' (a bundle without regions has one probability per class). "
     "Received: output_activation='sigmoid'."),
    ({"regions": [{"name": "whole", "values": [1, 2, 3]}, {"name": "core", "values": [2, 3]}],
      "regions_class_order": [1, 2]},
     "Expected 2 input channel(s) and 2 regions (input_channels and regions of bundle.json). "
     "Received: architecture=in_channels=2, num_classes=3."),
    ({"ignore_label": 2},
     "Expected null or an integer from 4 to 255 (above every class value). Received: ignore_label=2."),
])
def test_a_bad_regions_key_in_bundle_json_is_a_clear_error(region_run, tmp_path, changes, message):
    bundle = _edited_bundle(region_run, tmp_path, **changes)
    with pytest.raises(BundleError) as info:
        read_bundle(bundle)
    assert str(info.value).startswith(f"{bundle / 'bundle.json'}: ") and message in str(info.value)


def test_an_ensemble_refuses_members_with_other_regions():
    from segpipe.export.ensemble import check_members_agree
    from segpipe.export.run_export import RunMember

    def member(name, regions, order):
        config = types.SimpleNamespace(data=types.SimpleNamespace(patch_size=[16, 16, 16]))
        return RunMember(Path(name), config, None, {"in_channels": 2}, PreprocessSettings(),
                         ["background", "label_1", "label_2", "label_3"], ["t1", "t2"], {}, regions=regions,
                         regions_class_order=order)

    nested = (Region("whole", (1, 2, 3)), Region("core", (2, 3)), Region("enhancing", (3,)))
    check_members_agree([member("a", nested, (1, 2, 3)), member("b", nested, (1, 2, 3))])  # the same: fine
    with pytest.raises(ValueError, match=r"Expected members that share regions .* Received: members\.regions=b: "
                                         r"\[\['whole', \[1, 2, 3\]\], \['core', \[2, 3\]\]\]\."):
        check_members_agree([member("a", nested, (1, 2, 3)), member("b", nested[:2], (1, 2))])
    with pytest.raises(ValueError, match=r"members\.regions_class_order=b: \[3, 2, 1\]"):
        check_members_agree([member("a", nested, (1, 2, 3)), member("b", nested, (3, 2, 1))])
    with pytest.raises(ValueError, match=r"members\.regions=b: \[\]"):  # a class network beside a region one
        check_members_agree([member("a", nested, (1, 2, 3)), member("b", None, None)])


def test_an_ensemble_of_region_runs_carries_the_regions(region_run, lesion_root, tmp_path):
    from segpipe.export.ensemble import export_ensemble

    # the run twice: the average of equal probabilities is the run's own, so its labels come back
    bundle_dir = export_ensemble([region_run, region_run], tmp_path / "ensemble")
    bundle = read_bundle(bundle_dir)
    assert bundle.regions == read_bundle(region_run / "bundle").regions and bundle.regions_class_order == (1, 2, 3)
    assert bundle.architecture["builder"] == "ensemble"
    cases = _val_cases(region_run)
    assert predict.main(["--model", str(bundle_dir), "--input", *_inputs(lesion_root, cases),
                         "--output", str(tmp_path / "out"), "--quiet"]) == 0
    for case in cases:
        ours = np.asarray(read_nifti(tmp_path / "out" / f"{case}.nii.gz").array)
        runs = np.asarray(read_nifti(region_run / "predictions" / f"{case}.nii.gz").array)
        assert float((ours == runs).mean()) >= 0.999


def test_a_single_region_network_has_one_output():
    from segpipe.models.architecture import check_architecture

    one = {"builder": "unet3d", "in_channels": 2, "num_classes": 1, "args": {"depth": 2, "base_filters": 2}}
    assert check_architecture({**one, "args": {**one["args"], "output": "sigmoid"}})["num_classes"] == 1
    with pytest.raises(ValueError,
                       match=r"Expected an integer from 2 \(1 only with args.output: sigmoid, one region\)\. "
                                         r"Received: architecture.num_classes=1\."):
        check_architecture(one)
