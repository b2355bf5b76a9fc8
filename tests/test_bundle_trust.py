"""A received bundle cannot run code: hostile bundles built from a real one, through predict.py.

Each hostile bundle carries code that would write a canary file if it ran. The sender controls the
whole folder, so each is built twice where it matters: with its ``bundle.json`` manifest rewritten to
match (a careful attacker) and without (a file swapped in). For the default format, ``auto`` and every
named format without ``--trust-bundle``: no canary appears, and the command either refuses with one
clear error or predicts with a format that cannot run code. With ``--trust-bundle`` the legitimate
bundle works in every format. docs/deployment.md ("Trust") has the table this tests.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from inference_helpers import (
    PATCH,
    PREPROCESSING,
    phantom_scan,
    rewrite_manifest,
    tiny_architecture,
    tiny_model,
    write_scan,
)

import predict
from segpipe.export.bundle import write_bundle

HAVE_ONNX = all(importlib.util.find_spec(m) for m in ("tf2onnx", "onnx", "onnxruntime"))
HAVE_OPENVINO = importlib.util.find_spec("openvino") is not None
NAMED = (["keras", "savedmodel"] + (["onnx"] if HAVE_ONNX else [])
         + (["openvino", "openvino-bf16"] if HAVE_OPENVINO else []))


@pytest.fixture(scope="module")
def legit(tmp_path_factory):
    root = tmp_path_factory.mktemp("trust")
    model = tiny_model(depth=2, deep_supervision=False)
    bundle = write_bundle(model, root / "bundle", class_names=["background", "organ", "lesion"],
                          preprocessing=PREPROCESSING,
                          patch_size=PATCH, architecture=tiny_architecture(depth=2, deep_supervision=False),
                          onnx=HAVE_ONNX, segment=False)
    scan = write_scan(root / "scans" / "a.nii.gz", phantom_scan((20, 14, 12), seed=1), np.diag([1.0, 1.0, 1.5, 1.0]))
    return bundle, scan


def _predict(bundle: Path, scan: Path, out: Path, *extra: str) -> int:
    return predict.main(["--model", str(bundle), "--input", str(scan), "--output", str(out), "--quiet", "--no-mirror",
                         *extra])


def _copy(legit_bundle: Path, tmp_path: Path) -> Path:
    bundle = tmp_path / "hostile"
    shutil.copytree(legit_bundle, bundle)
    return bundle


def _hostile_savedmodel(path: Path, canaries: Path) -> None:
    """A SavedModel with the serving signature's interface whose loading and calling write files."""
    import tensorflow as tf

    class Canary(tf.saved_model.experimental.TrackableResource):
        def __init__(self, target: str):
            self._target = target
            super().__init__()

        def _create_resource(self):
            return tf.raw_ops.VarHandleOp(dtype=tf.float32, shape=[], shared_name="")

        def _initialize(self):  # runs while tf.saved_model.load restores the resource
            return tf.io.write_file(self._target, "ran at load")

    class Hostile(tf.Module):
        def __init__(self):
            super().__init__()
            self.canary = Canary(str(canaries / "load.txt"))

        @tf.function(input_signature=[tf.TensorSpec([None, None, None, None, 1], tf.float32, name="image")])
        def serve(self, image):
            with tf.control_dependencies([tf.io.write_file(str(canaries / "call.txt"), "ran at call")]):
                return {"output_0": tf.one_hot(tf.zeros(tf.shape(image)[:-1], tf.int32), 3)}

    shutil.rmtree(path, ignore_errors=True)
    module = Hostile()
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})


def _keras_gadget(path: Path, savedmodel: Path) -> None:
    """A ``.keras`` archive whose Lambda layer names ``TFSMLayer`` (loading a SavedModel) as its function."""
    config = {"module": "keras", "class_name": "Sequential", "config": {"name": "gadget", "layers": [
        {"module": "keras.layers", "class_name": "InputLayer", "config": {"batch_shape": [None, None, None, None, 1]}},
        {"module": "keras.layers", "class_name": "Lambda", "config": {"name": "gadget", "function": {
            "module": "keras.layers", "class_name": "TFSMLayer", "registered_name": "TFSMLayer",
            "config": {"filepath": str(savedmodel), "call_endpoint": "serving_default"}}}}]}}
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("config.json", json.dumps(config))
        archive.writestr("metadata.json", json.dumps({"keras_version": "3.15.1"}))


def _h5_lambda(path: Path, canaries: Path) -> None:
    """A legacy H5 model whose Lambda layer holds Python bytecode that writes a file."""
    import keras

    target = str(canaries / "h5.txt")
    model = keras.Sequential([keras.Input((None, None, None, 1)),
                              keras.layers.Lambda(lambda x: (open(target, "w").write("ran"), x)[1])])
    model.save(path)
    Path(target).unlink()  # written while Keras built the layer here; the file's bytecode writes it again if run


def _set_files(bundle: Path, **files: str) -> None:
    meta = json.loads((bundle / "bundle.json").read_text())
    meta["files"].update(files)
    (bundle / "bundle.json").write_text(json.dumps(meta))


def _run_all_formats(bundle: Path, scan: Path, tmp_path: Path, canaries: Path, capsys) -> dict[str, tuple[int, str]]:
    """predict.py with the default format, auto and each named one, no --trust-bundle: exit code and error."""
    results = {}
    for fmt in [None, "auto", *NAMED]:
        extra = ["--format", fmt] if fmt else []
        code = _predict(bundle, scan, tmp_path / f"out_{fmt}", *extra)
        results[fmt or "default"] = (code, capsys.readouterr().err)
        assert not list(canaries.iterdir()), f"code ran with format {fmt}: {sorted(p.name for p in canaries.iterdir())}"
    return results


@pytest.mark.parametrize("manifest", ["rewritten", "stale"])
def test_a_savedmodel_with_extra_ops_never_runs_without_trust(legit, tmp_path, capsys, manifest):
    bundle, scan = legit
    hostile, canaries = _copy(bundle, tmp_path), tmp_path / "canaries"
    canaries.mkdir()
    _hostile_savedmodel(hostile / "savedmodel", canaries)
    assert not list(canaries.iterdir())
    if manifest == "rewritten":
        rewrite_manifest(hostile)
    results = _run_all_formats(hostile, scan, tmp_path, canaries, capsys)
    for fmt, (code, err) in results.items():
        if manifest == "stale":  # any file changed behind the manifest: the bundle is refused whatever the format
            assert code == 1 and "changed since it was written" in err and "savedmodel/" in err, (fmt, err)
        elif fmt == "savedmodel":
            assert code == 1 and err.count("error:") == 1, err
            assert "Expected a format that cannot run code" in err and "--trust-bundle" in err and "'savedmodel'" in err
        else:  # default, auto and the other formats never touch the SavedModel
            assert code == 0, (fmt, err)


def test_keras_gadgets_are_never_deserialised(legit, tmp_path, capsys):
    """A TFSMLayer Lambda gadget in model.keras and a Lambda with Python code in an .h5: named as the Keras
    file they are refused; swapped in as the weights file they are read as HDF5 arrays only."""
    bundle, scan = legit
    hostile, canaries = _copy(bundle, tmp_path), tmp_path / "canaries"
    canaries.mkdir()
    _hostile_savedmodel(hostile / "gadget_savedmodel", canaries)
    _keras_gadget(hostile / "model.keras", hostile / "gadget_savedmodel")
    _h5_lambda(hostile / "model.h5", canaries)
    assert not list(canaries.iterdir())
    rewrite_manifest(hostile)
    for name in ("model.keras", "model.h5"):
        _set_files(hostile, keras=name)
        for code, err in _run_all_formats(hostile, scan, tmp_path, canaries, capsys).values():
            assert code == 1 and (f"Expected 'model.weights.h5' (the one file name of the keras format). "
                                  f"Received: files.keras='{name}'") in err
    _set_files(hostile, keras="model.weights.h5")
    for gadget in ("model.keras", "model.h5"):  # the gadget under the weights file's name
        shutil.copy(hostile / gadget, hostile / "model.weights.h5")
        rewrite_manifest(hostile)
        code = _predict(hostile, scan, tmp_path / f"out_{gadget}", "--format", "keras")
        err = capsys.readouterr().err
        assert code == 1 and "files.keras=" in err and err.count("error:") == 1, err
        assert not list(canaries.iterdir())


def test_a_weights_file_that_reaches_outside_is_refused(legit, tmp_path, capsys):
    """HDF5 can link to other files and store data in them: refused before any array is read."""
    import h5py

    bundle, scan = legit
    hostile = _copy(bundle, tmp_path)
    outside = tmp_path / "outside.h5"
    with h5py.File(outside, "w") as f:
        f["secret"] = np.arange(4.0)
    with h5py.File(hostile / "model.weights.h5", "a") as f:
        f["leak"] = h5py.ExternalLink(str(outside), "/secret")
    rewrite_manifest(hostile)
    assert _predict(hostile, scan, tmp_path / "out", "--format", "keras") == 1
    err = capsys.readouterr().err
    assert "Expected a Keras weights file of plain numeric arrays. Received: files.keras=" in err
    assert "/leak is a ExternalLink" in err


@pytest.mark.skipif(not HAVE_ONNX, reason="onnx extra not installed")
def test_an_onnx_model_with_external_data_or_custom_ops_is_refused(legit, tmp_path, capsys):
    import onnx

    bundle, scan = legit
    hostile = _copy(bundle, tmp_path)
    model = onnx.load(str(hostile / "model.onnx"))
    tensor = model.graph.initializer[0]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.ClearField("raw_data")
    tensor.external_data.add(key="location", value="/etc/hostname")
    onnx.save(model, str(hostile / "model.onnx"))
    rewrite_manifest(hostile)
    assert _predict(hostile, scan, tmp_path / "out", "--format", "onnx") == 1
    err = capsys.readouterr().err
    assert "Expected an ONNX model of standard operators with its weights inside" in err and "external file" in err


@pytest.mark.skipif(not HAVE_OPENVINO, reason="openvino extra not installed")
def test_an_openvino_file_that_is_not_ir_is_refused(legit, tmp_path, capsys):
    bundle, scan = legit
    hostile = _copy(bundle, tmp_path)
    (hostile / "openvino" / "model.xml").write_text('<?xml version="1.0"?><!DOCTYPE net [<!ENTITY '
                                                    'x SYSTEM "/etc/passwd">]>'
                                                   "<net>&x;</net>")
    rewrite_manifest(hostile)
    assert _predict(hostile, scan, tmp_path / "out", "--format", "openvino") == 1
    assert "Expected OpenVINO IR (an XML <net> without DTD)" in capsys.readouterr().err


def test_the_legitimate_bundle_works_in_every_format_with_trust(legit, tmp_path, capsys):
    from segpipe.io import read_nifti

    bundle, scan = legit
    labels = {}
    for fmt in ["auto", *NAMED]:
        assert _predict(bundle, scan, tmp_path / fmt, "--format", fmt, "--trust-bundle") == 0, capsys.readouterr().err
        labels[fmt] = read_nifti(tmp_path / fmt / "a.nii.gz").array
    for fmt, array in labels.items():
        agreement = (array == labels["keras"]).mean()
        assert agreement >= (0.99 if fmt == "openvino-bf16" else 0.9999), (fmt, agreement)
