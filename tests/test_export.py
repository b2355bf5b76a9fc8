"""Export bundles: contents, agreement of Keras / SavedModel / ONNX, clear errors for broken bundles."""
import importlib.util
import json
import shutil

import numpy as np
import pytest
from inference_helpers import PATCH, PREPROCESSING, make_run_dir, tiny_model

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
    assert predict.main(["export", str(run_dir), "--checkpoint", "last", "--out", str(out)]) == 0
    assert read_bundle(out).meta["source"]["checkpoint"] == "last"
    assert predict.main(["export", str(run_dir), "--out", str(out)]) == 1  # exists, no --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert predict.main(["export", str(run_dir), "--out", str(out), "--overwrite"]) == 0


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
    with pytest.raises(ValueError, match=r"Expected one class name per model output channel \(3\). Received: 2"):
        write_bundle(model, tmp_path / "b", class_names=["bg", "fg"], preprocessing=PREPROCESSING, patch_size=PATCH)
    assert not (tmp_path / "b").exists()


def _edit_json(key, value):
    def edit(bundle):
        meta = json.loads((bundle / "bundle.json").read_text())
        if value is _DELETE:
            del meta[key]
        else:
            meta[key] = value
        (bundle / "bundle.json").write_text(json.dumps(meta))
    return edit


_DELETE = object()


@pytest.mark.parametrize("break_it, message", [
    (lambda b: (b / "bundle.json").unlink(), r"Expected .*bundle.json in the bundle. Received: no such file"),
    (lambda b: (b / "bundle.json").write_text('{"format": "segpipe-bundle",'), r"Invalid JSON in .*bundle.json"),
    (lambda b: (b / "model.keras").unlink(), r"missing file model.keras \(listed as files.keras"),
    (lambda b: shutil.rmtree(b / "savedmodel"), r"missing file savedmodel/saved_model.pb"),
    (_edit_json("patch_size", _DELETE), r"bundle.json: missing required key 'patch_size'"),
    (_edit_json("preprocessing", _DELETE), r"missing required key 'preprocessing'"),
    (_edit_json("format_version", 2), r"'format_version': expected 1. Received: 2 \(written by a newer segpipe"),
    (_edit_json("format_version", "1"), r"'format_version': expected the integer 1. Received: '1'"),
    (_edit_json("format", "nnunet"), r"'format': expected 'segpipe-bundle'. Received: 'nnunet' \(not a segpipe bundle\)"),
    (_edit_json("classes", [{"value": 0, "name": "bg"}, {"value": 2, "name": "x"}]), r"'classes': expected at least 2 entries"),
    (_edit_json("patch_size", [16, 16]), r"'patch_size': expected 3 positive integers. Received: \[16, 16\]"),
    (_edit_json("orientation", "LPS"), r"'orientation': expected 'RAS'"),
    (_edit_json("inference", {"overlap": 1.5}), r"'inference': Expected a number in \[0, 0.95\]. Received: overlap=1.5"),
    (_edit_json("files", {"keras": "../model.keras"}), r"'files.keras': expected a path inside the bundle"),
    (_edit_json("preprocessing", {"normalization": "minmax"}), r"'preprocessing': Expected one of \(.*\)\. Received: normalization='minmax'\."),
    (_edit_json("preprocessing", {"spacing": [1, 1, 1]}), r"'preprocessing': Expected preprocessing settings out of \[.*\]. Received: spacing=\[1, 1, 1\]"),
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
    with pytest.raises(BundleError, match=r"Cannot load .*model.keras"):
        load_predictor(bundle, "keras")
    with pytest.raises(BundleError, match=r"expected a 'onnx' model \(export with onnx=True"):
        meta = json.loads((bundle / "bundle.json").read_text())
        meta["files"].pop("onnx", None)
        (bundle / "bundle.json").write_text(json.dumps(meta))
        load_predictor(bundle, "onnx")
    meta["classes"].append({"value": 3, "name": "extra"})
    (bundle / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=r"expected a network with 1 input channel\(s\) and 4 classes .* Received: 1 input channel\(s\), 3 output"):
        load_predictor(bundle, "savedmodel")
    with pytest.raises(BundleError, match="Expected a bundle folder. Received: .*nowhere"):
        read_bundle(tmp_path / "nowhere")
