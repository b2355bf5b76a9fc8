"""Export bundles: contents, agreement of Keras / SavedModel / ONNX, clear errors for broken bundles."""
import importlib.util
import json
import shutil

import numpy as np
import pytest
from inference_helpers import DELETE, PATCH, PREPROCESSING, edit_bundle_json, make_run_dir, tiny_model

import predict
from segpipe.inference.settings import InferenceSettings
from segpipe.export.bundle import BundleError, export_run, load_predictor, read_bundle, write_bundle

HAVE_ONNX = all(importlib.util.find_spec(m) for m in ("tf2onnx", "onnx", "onnxruntime"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, phantom_root):
    """A deep-supervision model (two outputs), its hand-made run directory and its bundle."""
    root = tmp_path_factory.mktemp("export")
    model = tiny_model(depth=3, deep_supervision=True)
    assert len(model.outputs) == 2
    run_dir = make_run_dir(root, model, phantom_root, depth=3)
    bundle_dir = export_run(run_dir, onnx=HAVE_ONNX, inference={"batch_size": 2, "postprocess_largest_component": [1]})
    return model, run_dir, bundle_dir


def test_bundle_holds_everything_prediction_needs(trained):
    import keras

    model, run_dir, bundle_dir = trained
    assert bundle_dir == run_dir / "bundle"
    meta = json.loads((bundle_dir / "bundle.json").read_text())
    assert meta["format"] == "segpipe-bundle" and meta["format_version"] == 1
    assert meta["classes"] == [{"value": 0, "name": "background"}, {"value": 1, "name": "organ"},
                               {"value": 2, "name": "lesion"}]
    assert meta["input_channels"] == 1 and meta["orientation"] == "RAS"
    assert meta["patch_size"] == PATCH
    assert meta["preprocessing"]["target_spacing_mm"] == [1.0, 1.0, 1.5]
    assert meta["preprocessing"]["normalization"] == "zscore"
    assert meta["inference"] == {"overlap": 0.5, "mirror_axes": [0, 1, 2], "batch_size": 2, "sigma_scale": 0.125,
                                 "postprocess_largest_component": [1]}
    assert {"segpipe", "tensorflow", "keras", "numpy", "python"} <= set(meta["versions"])
    assert meta["training_config"]["model"]["depth"] == 3 and meta["training_config"]["name"] == "hand"
    assert meta["source"]["checkpoint"] == "best"
    assert (bundle_dir / "savedmodel" / "saved_model.pb").is_file()
    assert meta["verification"]["savedmodel_max_abs_diff"] <= 1e-4

    bundle = read_bundle(bundle_dir)
    assert bundle.preprocessing == PREPROCESSING
    assert bundle.class_names == ("background", "organ", "lesion") and bundle.patch_size == (16, 16, 16)
    assert bundle.inference == InferenceSettings(batch_size=2, postprocess_largest_component=(1,))

    # model.keras: a plain functional model (no segpipe class needed) with the full-resolution output only
    net = keras.models.load_model(bundle_dir / "model.keras", compile=False, safe_mode=True)
    assert type(net) is keras.Model or type(net).__name__ == "Functional"
    assert len(net.outputs) == 1
    x = np.random.default_rng(0).normal(size=(1, 16, 16, 16, 1)).astype(np.float32)
    np.testing.assert_array_equal(net.predict_on_batch(x), model.predict_on_batch(x)[0])


@pytest.mark.parametrize("fmt", ["savedmodel", "onnx"])
def test_exported_formats_agree_with_keras_on_any_spatial_size(trained, fmt):
    if fmt == "onnx":
        pytest.importorskip("tf2onnx")
        pytest.importorskip("onnxruntime")
    _, _, bundle_dir = trained
    keras_fn = load_predictor(bundle_dir, "keras")
    other_fn = load_predictor(bundle_dir, fmt)
    x = np.random.default_rng(1).normal(size=(2, 16, 24, 32, 1)).astype(np.float32)  # not the patch size
    reference = keras_fn(x)
    out = other_fn(x)
    assert out.shape == reference.shape == (2, 16, 24, 32, 3)
    assert np.abs(out - reference).max() <= 1e-4


def test_export_cli_from_the_last_checkpoint(trained, tmp_path, capsys):
    _, run_dir, _ = trained
    out = tmp_path / "b"
    out.mkdir()  # an earlier export's folder (one export in this test: each costs seconds)
    (out / "bundle.json").write_text("{}")
    assert predict.main(["export", str(run_dir), "--checkpoint", "last", "--out", str(out)]) == 1  # no --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "bundle.json").read_text() == "{}"  # refused before any work: untouched
    assert predict.main(["export", str(run_dir), "--checkpoint", "last", "--out", str(out), "--overwrite"]) == 0
    assert read_bundle(out).meta["source"]["checkpoint"] == "last"


def test_export_names_what_a_run_lacks(trained, tmp_path, capsys):
    _, run_dir, _ = trained
    bare = tmp_path / "bare"
    shutil.copytree(run_dir, bare, ignore=shutil.ignore_patterns("bundle", "preprocessing.json"))
    assert predict.main(["export", str(bare)]) == 1
    assert "preprocessing.json" in capsys.readouterr().err
    (bare / "checkpoints" / "best.keras").unlink()
    with pytest.raises(FileNotFoundError, match=r"Expected the 'best' model at .*best.keras. Received: model='best' \(no such file\)"):
        export_run(bare, preprocessing=PREPROCESSING)


def test_write_bundle_checks_names_against_the_model(tmp_path):
    model = tiny_model(depth=2, deep_supervision=False)
    with pytest.raises(ValueError, match=r"Expected one class name per model output channel \(3\)\. Received: class_names=\['bg', 'fg'\]\."):
        write_bundle(model, tmp_path / "b", class_names=["bg", "fg"], preprocessing=PREPROCESSING, patch_size=PATCH)
    assert not (tmp_path / "b").exists()


def _edit_json(key, value):
    return edit_bundle_json(**{key: value})


@pytest.mark.parametrize("break_it, message", [
    (lambda b: (b / "bundle.json").unlink(), r"Expected bundle.json in the bundle folder .*Received: bundle.json=.*bundle.json \(no such file\)"),
    (lambda b: (b / "bundle.json").write_text('{"format": "segpipe-bundle",'), r"bundle.json: Expected valid JSON\. Received: contents=invalid JSON"),
    (lambda b: (b / "model.keras").unlink(), r"bundle.json: Expected every model file bundle.json lists\. Received: files.keras=model.keras \(missing: model.keras;"),
    (lambda b: shutil.rmtree(b / "savedmodel"), r"Received: files.savedmodel=savedmodel \(missing: savedmodel/saved_model.pb;"),
    (_edit_json("patch_size", DELETE), r"bundle.json: Expected 3 positive integers\. Received: patch_size=<missing>\."),
    (_edit_json("preprocessing", DELETE), r"Expected the preprocessing settings\. Received: preprocessing=<missing>\."),
    (_edit_json("format_version", 2), r"Expected format version 1\. Received: format_version=2\. Written by a newer segpipe"),
    (_edit_json("format_version", "1"), r"Expected the integer 1\. Received: format_version='1'\."),
    (_edit_json("format", "nnunet"), r"Expected the string 'segpipe-bundle' \(a segpipe bundle\)\. Received: format='nnunet'\."),
    (_edit_json("classes", [{"value": 0, "name": "bg"}, {"value": 2, "name": "x"}]), r"Expected at least 2 entries .*Received: classes=\["),
    (_edit_json("patch_size", [16, 16]), r"Expected 3 positive integers\. Received: patch_size=\[16, 16\]\."),
    (_edit_json("orientation", "LPS"), r"Expected 'RAS' .*Received: orientation='LPS'\."),
    (_edit_json("inference", {"overlap": 1.5}), r"bundle.json: Expected a number in \[0, 0.95\]\. Received: inference.overlap=1.5\."),
    (_edit_json("files", {"keras": "../model.keras"}), r"Expected a path inside the bundle\. Received: files.keras='../model.keras'\."),
    (_edit_json("preprocessing", {"normalization": "minmax"}), r"bundle.json: Expected one of \['zscore', 'zscore_nonzero', 'ct', 'none'\]\. Received: preprocessing.normalization='minmax'\.$"),
    (_edit_json("preprocessing", {"spacing": [1, 1, 1]}), r"bundle.json: Expected a key of preprocessing \(target_spacing_mm, .*\)\. Received: preprocessing.spacing=\[1, 1, 1\]\.$"),
])
def test_a_broken_bundle_is_a_clear_error(trained, tmp_path, break_it, message):
    bundle = tmp_path / "bundle"
    shutil.copytree(trained[2], bundle)
    break_it(bundle)
    with pytest.raises(BundleError, match=message):
        read_bundle(bundle)


def test_a_corrupt_or_mismatched_model_file_is_a_clear_error(trained, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(trained[2], bundle)
    (bundle / "model.keras").write_bytes(b"not a zip file")
    with pytest.raises(BundleError, match=r"bundle.json: Expected a model file that loads with format='keras'\. Received: files.keras=.*model.keras \(cannot load: "):
        load_predictor(bundle, "keras")
    with pytest.raises(BundleError, match=r"Expected a 'onnx' model in the bundle \(export with onnx=True"):
        meta = json.loads((bundle / "bundle.json").read_text())
        meta["files"].pop("onnx", None)
        (bundle / "bundle.json").write_text(json.dumps(meta))
        load_predictor(bundle, "onnx")
    meta["classes"].append({"value": 3, "name": "extra"})
    (bundle / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=r"Expected a network with 1 input channel\(s\) and 4 classes \(from bundle.json\)\. Received: network=1 input channel\(s\), 3 output"):
        load_predictor(bundle, "savedmodel")
    with pytest.raises(BundleError, match="Expected a bundle folder. Received: .*nowhere"):
        read_bundle(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------- runtimes

HAVE_OPENVINO = importlib.util.find_spec("openvino") is not None


def trained_tiny_model():
    """A tiny U-Net trained for a few seconds to find the bright ellipsoid of phantom scans, so its
    label maps have two sizeable classes (an untrained one predicts one class almost everywhere)."""
    import keras
    from inference_helpers import phantom_scan
    from scipy import ndimage

    from segpipe.data.preprocess import preprocess_volume

    model = tiny_model(depth=3, deep_supervision=False, seed=4)
    xs, ys = [], []
    for seed in (10, 11):
        image = preprocess_volume(phantom_scan((34, 30, 20), seed=seed), np.eye(4), None, PREPROCESSING).image[:32, :24, :12]
        bright = image[..., 0] > 1.0
        rim = ndimage.binary_dilation(bright, iterations=2) & ~bright
        ys.append(np.eye(3, dtype=np.float32)[np.where(bright, 1, np.where(rim, 2, 0))])
        xs.append(image)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="categorical_crossentropy")
    model.fit(np.stack(xs), np.stack(ys), epochs=60, batch_size=2, verbose=0)
    return model


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory):
    model = trained_tiny_model()
    out = write_bundle(model, tmp_path_factory.mktemp("segment") / "bundle", class_names=["background", "organ", "lesion"],
                       preprocessing=PREPROCESSING, patch_size=PATCH, inference={"mirror_axes": [0, 1, 2], "batch_size": 2})
    return model, out


_SEGMENT_SCRIPT = r"""
import sys
import nibabel as nib
import numpy as np
import tensorflow as tf
bundle, scan, out = sys.argv[1:4]
image = nib.load(scan)
ras = nib.as_closest_canonical(image)  # the signature expects RAS voxel axes; reorientation stays outside
spacing = np.linalg.norm(ras.affine[:3, :3], axis=0)
data = np.asarray(ras.dataobj, dtype=np.float32)[..., None]
segment = tf.saved_model.load(bundle + "/savedmodel").signatures["segment"]
labels = segment(image=tf.constant(data), spacing_mm=tf.constant(spacing, tf.float64))["labels"].numpy()
back = nib.orientations.ornt_transform(nib.orientations.io_orientation(ras.affine), nib.orientations.io_orientation(image.affine))
np.save(out, nib.orientations.apply_orientation(labels, back))
assert not [m for m in sys.modules if m.split(".")[0] == "segpipe"], "segpipe was imported"
"""


def test_segment_signature_runs_without_segpipe_and_matches_predict_py(segmenter, tmp_path):
    import subprocess
    import sys

    from inference_helpers import NON_RAS_AFFINE, phantom_scan, write_scan

    from segpipe.io import read_nifti

    _, bundle_dir = segmenter
    scan = write_scan(tmp_path / "scan.nii.gz", phantom_scan((18, 26, 20), seed=2), NON_RAS_AFFINE)  # P, S, L; 0.9/1.3/1.8 mm
    assert predict.main(["--model", str(bundle_dir), "--input", str(scan), "--output", str(tmp_path / "out"), "--quiet"]) == 0
    expected = read_nifti(tmp_path / "out" / "scan.nii.gz").array
    # a fresh interpreter whose import path has no segpipe at all (not even this checkout)
    proc = subprocess.run([sys.executable, "-I", "-c", _SEGMENT_SCRIPT, str(bundle_dir), str(scan), str(tmp_path / "labels.npy")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    labels = np.load(tmp_path / "labels.npy")
    assert labels.shape == expected.shape == (18, 26, 20) and labels.dtype == np.uint8
    assert 0.05 < (expected == 1).mean() < 0.95  # two sizeable classes: agreement is not trivial
    assert (labels == expected).mean() >= 0.999
    meta = read_bundle(bundle_dir).meta
    assert meta["signatures"] == ["serving_default", "segment"]


def test_formats_not_written_are_recorded_and_named(tmp_path, monkeypatch):
    from segpipe.export import runtimes

    model = tiny_model(depth=2, deep_supervision=False)
    installed = runtimes.is_installed
    monkeypatch.setattr(runtimes, "is_installed", lambda name: False if name.startswith("openvino") else installed(name))
    out = write_bundle(model, tmp_path / "b", class_names=["bg", "a", "b"], preprocessing=PREPROCESSING, patch_size=PATCH,
                       segment=False)
    bundle = read_bundle(out)
    assert "openvino" not in bundle.files
    assert "openvino is not installed" in bundle.meta["formats_not_written"]["openvino"]
    with pytest.raises(BundleError, match=r"Expected a 'openvino' model in the bundle .*Not written: openvino is not installed"):
        load_predictor(bundle, "openvino")
    with pytest.raises(ImportError, match=r'Expected openvino installed for the OpenVINO export\. Received: openvino=True\. Install the openvino extra: pip install "segpipe\[openvino\]"'):
        write_bundle(model, tmp_path / "c", class_names=["bg", "a", "b"], preprocessing=PREPROCESSING, patch_size=PATCH,
                     openvino=True)
    assert not (tmp_path / "c").exists()
    # a format whose runtime is missing at prediction time is an error, never a silent fallback
    monkeypatch.setattr(runtimes, "is_installed", lambda name: False if name == "onnx" else installed(name))
    with pytest.raises(ImportError, match=r"Expected tf2onnx \(and onnxruntime to check it\) installed for the ONNX export\. Received: onnx=True\."):
        write_bundle(model, tmp_path / "d", class_names=["bg", "a", "b"], preprocessing=PREPROCESSING, patch_size=PATCH, onnx=True)
    unchecked = write_bundle(model, tmp_path / "e", class_names=["bg", "a", "b"], preprocessing=PREPROCESSING,
                             patch_size=PATCH, verify=False, openvino=False, segment=False)
    meta = read_bundle(unchecked).meta
    assert meta["verification"] == {"run": False}
    assert meta["formats_not_written"] == {"savedmodel:segment": "segment=False"}


def test_auto_picks_the_first_installed_format_of_the_documented_order(monkeypatch):
    from segpipe.export import runtimes

    every = {"keras", "savedmodel", "onnx", "openvino"}
    monkeypatch.setattr(runtimes, "is_installed", lambda name: True)
    assert runtimes.choose_format(every) == runtimes.AUTO_ORDER[0] == "openvino"
    assert runtimes.choose_format({"keras", "savedmodel"}) == "savedmodel"
    monkeypatch.setattr(runtimes, "is_installed", lambda name: not name.startswith("openvino"))
    assert runtimes.choose_format(every) == "savedmodel"
    with pytest.raises(ImportError, match=r"Expected openvino installed to predict with it\. Received: format='openvino'\. Install the openvino extra: pip install \"segpipe\[openvino\]\""):
        runtimes.choose_format(every, "openvino")
    with pytest.raises(ValueError, match=r"Expected one of \('auto', 'keras'"):
        runtimes.choose_format(every, "tflite")


@pytest.mark.skipif(not HAVE_OPENVINO, reason="openvino extra not installed")
def test_openvino_agrees_with_keras_and_bf16_is_checked_at_export(segmenter):
    _, bundle_dir = segmenter
    bundle = read_bundle(bundle_dir)
    assert bundle.files["openvino"] == "openvino/model.xml"
    verification = bundle.meta["verification"]
    assert verification["openvino_max_abs_diff"] <= 1e-4
    assert verification["openvino-bf16_max_abs_diff"] <= 2e-2
    x = np.random.default_rng(1).normal(size=(2, 16, 24, 32, 1)).astype(np.float32)  # not the patch size
    reference = load_predictor(bundle, "keras")(x)
    fn = load_predictor(bundle, "auto")
    assert fn.format == "openvino"
    assert np.abs(fn(x) - reference).max() <= 1e-4
    assert np.abs(fn(x[:1]) - reference[:1]).max() <= 1e-4  # a second shape compiles a second model


def test_bfloat16_out_of_tolerance_is_refused_when_asked_for(tmp_path, monkeypatch):
    """bf16 is a precision mode of the openvino file: a network whose bf16 probabilities drifted past the
    tolerance at export keeps its float32 formats, and asking for bf16 names the recorded difference."""
    import dataclasses

    from segpipe.export import runtimes
    from segpipe.export.bundle import Bundle

    monkeypatch.setattr(runtimes, "is_installed", lambda name: True)
    bundle = Bundle(tmp_path, ("background", "fg"), 1, ("t1",), PREPROCESSING, "RAS", PATCH, InferenceSettings(),
                    {"keras": "model.keras", "openvino": "openvino/model.xml"}, {}, {},
                    {"verification": {"openvino-bf16_max_abs_diff": 0.0216, "openvino-bf16_within_tolerance": False}})
    with pytest.raises(BundleError, match=r"bundle.json: Expected bfloat16 probabilities within .* Received: "
                                          r"format='openvino-bf16'. This network differs by 0.0216"):
        load_predictor(bundle, "openvino-bf16")
    ok = dataclasses.replace(bundle, meta={"verification": {"openvino-bf16_within_tolerance": True}})
    with pytest.raises(BundleError, match=r"Expected a model file that loads with format='openvino-bf16'\. Received: files.openvino="):  # passes the check, then finds no file here
        load_predictor(ok, "openvino-bf16")
