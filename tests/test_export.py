"""Export bundles: contents, agreement of Keras / SavedModel / ONNX, clear errors for broken bundles."""
import importlib.util
import json
import shutil

import numpy as np
import pytest
from inference_helpers import (
    DELETE,
    PATCH,
    PREPROCESSING,
    edit_bundle_json,
    make_run_dir,
    rewrite_manifest,
    tiny_architecture,
    tiny_model,
)

import predict
from segpipe.export.bundle import write_bundle
from segpipe.export.run_export import export_run
from segpipe.inference.bundle import BundleError, read_bundle
from segpipe.inference.runtimes import load_predictor
from segpipe.inference.settings import InferenceSettings

HAVE_ONNX = all(importlib.util.find_spec(m) for m in ("tf2onnx", "onnx", "onnxruntime"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, phantom_root):
    """A deep-supervision model (two outputs), its hand-made run directory and its bundle."""
    root = tmp_path_factory.mktemp("export")
    model = tiny_model(depth=3, deep_supervision=True)
    assert len(model.outputs) == 2
    run_dir = make_run_dir(root, model, phantom_root, depth=3)
    bundle_dir = export_run(run_dir, onnx=HAVE_ONNX,
                            inference={"batch_size": 2, "postprocess_largest_component": [1],
                                       "postprocess_largest_foreground": False})
    return model, run_dir, bundle_dir


def test_bundle_holds_everything_prediction_needs(trained):
    model, run_dir, bundle_dir = trained
    assert bundle_dir == run_dir / "bundle"
    meta = json.loads((bundle_dir / "bundle.json").read_text())
    assert meta["format"] == "segpipe-bundle" and meta["format_version"] == 2
    assert meta["classes"] == [{"value": 0, "name": "background"}, {"value": 1, "name": "organ"},
                               {"value": 2, "name": "lesion"}]
    assert meta["input_channels"] == 1 and meta["orientation"] == "RAS"
    assert meta["patch_size"] == PATCH
    assert meta["preprocessing"]["target_spacing_mm"] == [1.0, 1.0, 1.5]
    assert meta["preprocessing"]["normalization"] == "zscore"
    assert meta["inference"] == {"overlap": 0.5, "mirror_axes": [0, 1, 2], "batch_size": 2, "sigma_scale": 0.125,
                                 "postprocess_largest_component": [1], "postprocess_largest_foreground": False}
    assert {"segpipe", "tensorflow", "keras", "numpy", "python"} <= set(meta["versions"])
    assert meta["training_config"]["model"]["depth"] == 3 and meta["training_config"]["name"] == "hand"
    assert meta["source"]["checkpoint"] == "best"
    assert (bundle_dir / "savedmodel" / "saved_model.pb").is_file()
    assert meta["verification"]["savedmodel_max_abs_diff"] <= 1e-4

    bundle = read_bundle(bundle_dir)
    assert bundle.preprocessing == PREPROCESSING
    assert bundle.class_names == ("background", "organ", "lesion") and bundle.patch_size == (16, 16, 16)
    assert bundle.inference == InferenceSettings(batch_size=2, postprocess_largest_component=(1,))

    # Keras: weight arrays only, the network rebuilt from its builder arguments, full-resolution output only
    assert meta["files"]["keras"] == "model.weights.h5" and not (bundle_dir / "model.keras").exists()
    assert meta["architecture"] == {"builder": "unet3d", "in_channels": 1, "num_classes": 3, "args": {
        "depth": 3, "base_filters": 4, "max_filters": 320, "norm": "batch",
        "deep_supervision": True, "output": "softmax",
        "convs_per_stage": 2}}
    assert (set(meta["manifest"]) >= {"model.weights.h5", "savedmodel/saved_model.pb"}
            and ".segpipe" not in meta["manifest"])
    assert meta["verification"]["keras_max_abs_diff"] == 0.0
    x = np.random.default_rng(0).normal(size=(1, 16, 16, 16, 1)).astype(np.float32)
    np.testing.assert_array_equal(load_predictor(bundle, "keras")(x), model.predict_on_batch(x)[0])


@pytest.mark.parametrize("fmt", ["savedmodel", "onnx"])
def test_exported_formats_agree_with_keras_on_any_spatial_size(trained, fmt):
    if fmt == "onnx":
        pytest.importorskip("tf2onnx")
        pytest.importorskip("onnxruntime")
    _, _, bundle_dir = trained
    keras_fn = load_predictor(bundle_dir, "keras")
    other_fn = load_predictor(bundle_dir, fmt, trust_bundle=True)
    x = np.random.default_rng(1).normal(size=(2, 16, 24, 32, 1)).astype(np.float32)  # not the patch size
    reference = keras_fn(x)
    out = other_fn(x)
    assert out.shape == reference.shape == (2, 16, 24, 32, 3)
    assert np.abs(out - reference).max() <= 1e-4


def test_export_cli_from_the_last_checkpoint(trained, segmenter, tmp_path, capsys):
    _, run_dir, _ = trained
    from segpipe.ownership import write_marker

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "important.txt").write_text("not segpipe's")
    assert predict.main(["export", str(run_dir), "--out", str(foreign), "--overwrite"]) == 1  # never replaced
    assert "important.txt" in capsys.readouterr().err and (foreign / "important.txt").read_text() == "not segpipe's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # refused before any work: nothing written
    out = tmp_path / "b"
    out.mkdir()  # an earlier export's folder
    (out / "bundle.json").write_text("{}")
    write_marker(out, "bundle")
    assert predict.main(["export", str(run_dir), "--checkpoint", "last", "--out", str(out)]) == 1  # no --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "bundle.json").read_text() == "{}"  # refused before any work: untouched
    # with --overwrite (the same command on a folder like this one): the segmenter fixture's export, so that
    # this test costs no export of its own
    _, exported = segmenter
    assert read_bundle(exported).meta["source"]["checkpoint"] == "last"


def test_export_names_what_a_run_lacks(trained, tmp_path, capsys):
    _, run_dir, _ = trained
    bare = tmp_path / "bare"
    shutil.copytree(run_dir, bare, ignore=shutil.ignore_patterns("bundle", "preprocessing.json"))
    assert predict.main(["export", str(bare)]) == 1
    assert "preprocessing.json" in capsys.readouterr().err
    (bare / "checkpoints" / "best.keras").unlink()
    with pytest.raises(FileNotFoundError,
                       match=r"Expected the 'best' model at .*best.keras. Received: model='best' \(no such file\)"):
        export_run(bare, preprocessing=PREPROCESSING)


def test_write_bundle_checks_names_against_the_model(tmp_path):
    model = tiny_model(depth=2, deep_supervision=False)
    with pytest.raises(ValueError,
                       match=r"Expected one class name per model output channel \(3\)\. Received: "
                             r"class_names=\['bg', 'fg'\]\."):
        write_bundle(model, tmp_path / "b", class_names=["bg", "fg"], preprocessing=PREPROCESSING, patch_size=PATCH,
                     architecture=tiny_architecture(depth=2, deep_supervision=False))
    assert not (tmp_path / "b").exists()


def _edit_json(key, value):
    return edit_bundle_json(**{key: value})


def _write(name, data=b"x", mode=0o644):
    def write(b):
        (b / name).write_bytes(data)
        (b / name).chmod(mode)
    return write


def _symlink_out(b):
    (b / "model.weights.h5").unlink()
    (b / "model.weights.h5").symlink_to("/etc/hostname")


def _outside_entry(b):
    meta = json.loads((b / "bundle.json").read_text())
    meta["manifest"]["../outside.txt"] = {"bytes": 1, "sha256": "0" * 64}
    (b / "bundle.json").write_text(json.dumps(meta))


PATCH_WHAT = r"Expected 3 integers from 1 to 1024, at most 16777216 voxels in all\."


@pytest.mark.parametrize("break_it, message", [
    (lambda b: (b / "bundle.json").unlink(),
     r"Expected bundle.json in the bundle folder .*Received: bundle.json=.*bundle.json \(no such file\)"),
    (lambda b: (b / "bundle.json").write_text('{"format": "segpipe-bundle",'),
     r"bundle.json: Expected valid JSON\. Received: contents=invalid JSON"),
    (lambda b: (b / "model.weights.h5").unlink(),
     r"bundle.json: Expected every file the manifest lists\. Received: manifest.model.weights.h5=.*model.weights.h5 "
     r"\(missing; incomplete bundle\?\)"),
    (lambda b: shutil.rmtree(b / "savedmodel"),
     r"Expected every file the manifest lists\. Received: manifest.savedmodel/"),
    (_write("model.weights.h5", b"changed"),
     r"Expected \d+ bytes\. Received: manifest.model.weights.h5=.*\(7 bytes: changed since it was written\)"),
    (_write("notes.txt"),
     r"Expected only the files the manifest lists\. Received: manifest=.*notes.txt \(an extra file\)"),
    (_symlink_out,
     r"Expected no symbolic link in the folder \(a link can point outside it\)\. Received: "
     r"files=.*model.weights.h5 -> /etc/hostname"),
    (lambda b: (b / "model.onnx" if (b / "model.onnx").exists() else b / "model.weights.h5").chmod(0o755),
     r"Expected no executable file\. Received: manifest.model"),
    (_outside_entry,
     r"Expected relative paths inside the folder, in normal form\. Received: manifest='../outside.txt'\."),
    (_edit_json("patch_size", DELETE), PATCH_WHAT + r" Received: patch_size=<missing>\."),
    (_edit_json("patch_size", [16, 16]), PATCH_WHAT + r" Received: patch_size=\[16, 16\]\."),
    (_edit_json("patch_size", [100000] * 3), PATCH_WHAT + r" Received: patch_size=\[100000, 100000, 100000\]\."),
    (_edit_json("patch_size", [1024, 1024, 64]), PATCH_WHAT + r" Received: patch_size=\[1024, 1024, 64\]\."),
    (_edit_json("inference", {"batch_size": 10**9}),
     r"Expected an integer from 1 to 256\. Received: inference.batch_size=1000000000\."),
    (_edit_json("preprocessing", {"target_spacing_mm": [1e-6, 1, 1]}),
     r"Expected 3 voxel sizes from 0.001 to 1000.0 mm \(or null\)\. Received: "
     r"preprocessing.target_spacing_mm=\[1e-06, 1.0, 1.0\]\."),
    (_edit_json("input_channels", 10**6), r"Expected an integer from 1 to 64\. Received: input_channels=1000000\."),
    (_edit_json("classes", [{"value": v, "name": str(v)} for v in range(300)]),
     r"Expected 2 to 256 entries .*Received: classes=\["),
    (_edit_json("architecture", {"builder": "unet3d", "in_channels": 1, "num_classes": 3, "args": {"depth": 100}}),
     r"Expected an integer from 1 to 8\. Received: architecture.args.depth=100\."),
    (_edit_json("architecture", {"builder": "unet3d", "in_channels": 1, "num_classes": 3,
                                 "args": {"base_filters": 1024, "max_filters": 1024, "depth": 8}}),
     r"Expected a network of at most 300,000,000 parameters\. Received: architecture.args=about [\d,]+ parameters\."),
    (_edit_json("architecture", {"builder": "keras.layers.Lambda", "in_channels": 1, "num_classes": 3, "args": {}}),
     r"Expected one of \['unet3d', 'resenc_unet'\]\. Received: architecture.builder='keras.layers.Lambda'\."),
    (_edit_json("architecture", {"builder": "unet3d", "in_channels": 1, "num_classes": 3,
                                 "args": {"function": "os.system"}}),
     r"Expected arguments of unet3d among .* Received: architecture.args.function='function'\."),
    (_edit_json("activation_bytes_per_voxel", 10**12),
     r"Expected an integer from 0 to 1048576\. Received: activation_bytes_per_voxel=1000000000000\."),
    (_edit_json("preprocessing", DELETE), r"Expected the preprocessing settings\. Received: preprocessing=<missing>\."),
    (_edit_json("format_version", 3),
     r"Expected format version 2\. Received: format_version=3\. Written by a newer segpipe"),
    (_edit_json("format_version", 1),
     r"Expected format version 2\. Received: format_version=1\. Version 1 bundles hold a serialised "
     r"model.keras .* re-export the run"),
    (_edit_json("format_version", "2"), r"Expected the integer 2\. Received: format_version='2'\."),
    (_edit_json("format", "nnunet"),
     r"Expected the string 'segpipe-bundle' \(a segpipe bundle\)\. Received: format='nnunet'\."),
    (_edit_json("classes", [{"value": 0, "name": "bg"}, {"value": 2, "name": "x"}]),
     r"Expected 2 to 256 entries .*Received: classes=\["),
    (_edit_json("orientation", "LPS"), r"Expected 'RAS' .*Received: orientation='LPS'\."),
    (_edit_json("inference", {"overlap": 1.5}),
     r"bundle.json: Expected a number in \[0, 0.95\]\. Received: inference.overlap=1.5\."),
    (_edit_json("files", {"keras": "../model.keras"}),
     r"Expected 'model.weights.h5' \(the one file name of the keras format\)\. Received: "
     r"files.keras='../model.keras'\."),
    (_edit_json("files", {"keras": "model.h5"}),
     r"Expected 'model.weights.h5' \(the one file name of the keras format\)\. Received: files.keras='model.h5'\."),
    (_edit_json("preprocessing", {"normalization": "minmax"}),
     r"bundle.json: Expected one of \['zscore', 'zscore_nonzero', 'ct', 'none'\]\. Received: "
     r"preprocessing.normalization='minmax'\.$"),
    (_edit_json("preprocessing", {"spacing": [1, 1, 1]}),
     r"bundle.json: Expected a key of preprocessing \(target_spacing_mm, .*\)\. Received: "
     r"preprocessing.spacing=\[1, 1, 1\]\.$"),
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
    (bundle / "model.weights.h5").write_bytes(b"not an HDF5 file")
    rewrite_manifest(bundle)  # past the manifest: the file itself is what is wrong
    with pytest.raises(BundleError,
                       match=r"bundle.json: Expected a model file that loads with format='keras'\. Received: "
                             r"files.keras=.*model.weights.h5 \(cannot load: "):
        load_predictor(bundle, "keras")
    with pytest.raises(BundleError, match=r"Expected a 'onnx' model in the bundle \(export with onnx=True"):
        meta = json.loads((bundle / "bundle.json").read_text())
        meta["files"].pop("onnx", None)
        (bundle / "bundle.json").write_text(json.dumps(meta))
        load_predictor(bundle, "onnx")
    meta["classes"].append({"value": 3, "name": "extra"})
    (bundle / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError,
                       match=r"Expected 1 input channel\(s\) and 4 classes \(input_channels and classes of "
                             r"bundle.json\)\. Received: architecture=in_channels=1, num_classes=3"):
        read_bundle(bundle)
    meta["architecture"]["num_classes"] = 4
    (bundle / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError,
                       match=r"Expected a network with 1 input channel\(s\) and 4 classes \(from bundle.json\)\. "
                             r"Received: network=1 input channel\(s\), 3 output"):
        load_predictor(bundle, "savedmodel", trust_bundle=True)
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
        image = preprocess_volume(phantom_scan((34, 30, 20), seed=seed), np.eye(4), None,
                                  PREPROCESSING).image[:32, :24, :12]
        bright = image[..., 0] > 1.0
        rim = ndimage.binary_dilation(bright, iterations=2) & ~bright
        ys.append(np.eye(3, dtype=np.float32)[np.where(bright, 1, np.where(rim, 2, 0))])
        xs.append(image)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="categorical_crossentropy")
    model.fit(np.stack(xs), np.stack(ys), epochs=60, batch_size=2, verbose=0)
    return model


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory, phantom_root):
    """:func:`trained_tiny_model` in a hand-made run directory, exported by ``predict.py export --checkpoint
    last --overwrite`` over an earlier export's folder: one bundle for the export command's test and the
    segment-signature and OpenVINO tests (each export writes and verifies every format: seconds)."""
    from segpipe.ownership import write_marker

    model = trained_tiny_model()
    root = tmp_path_factory.mktemp("segment")
    # the run's config gives the bundle its settings: no deep supervision, mirroring on every axis (the
    # default), two windows per batch; classes from the phantom dataset (background, organ, lesion)
    run_dir = make_run_dir(root, model, phantom_root, depth=3,
                           overrides=("model.deep_supervision=false", "inference.batch_size=2"))
    out = root / "bundle"
    out.mkdir()  # an earlier export's folder, which --overwrite replaces
    (out / "bundle.json").write_text("{}")
    write_marker(out, "bundle")
    assert predict.main(["export", str(run_dir), "--checkpoint", "last", "--out", str(out), "--overwrite"]) == 0
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
"""  # noqa: E501 (a script run as is; its orientation line is long)


def test_segment_signature_runs_without_segpipe_and_matches_predict_py(segmenter, tmp_path):
    import subprocess
    import sys

    from inference_helpers import NON_RAS_AFFINE, phantom_scan, write_scan

    from segpipe.io import read_nifti

    _, bundle_dir = segmenter
    scan = write_scan(tmp_path / "scan.nii.gz", phantom_scan((18, 26, 20), seed=2),
                      NON_RAS_AFFINE)  # P, S, L; 0.9/1.3/1.8 mm
    assert predict.main(["--model", str(bundle_dir), "--input", str(scan), "--output",
                         str(tmp_path / "out"), "--quiet"]) == 0
    expected = read_nifti(tmp_path / "out" / "scan.nii.gz").array
    # a fresh interpreter whose import path has no segpipe at all (not even this checkout)
    proc = subprocess.run([sys.executable, "-I", "-c", _SEGMENT_SCRIPT, str(bundle_dir), str(scan),
                           str(tmp_path / "labels.npy")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    labels = np.load(tmp_path / "labels.npy")
    assert labels.shape == expected.shape == (18, 26, 20) and labels.dtype == np.uint8
    assert 0.05 < (expected == 1).mean() < 0.95  # two sizeable classes: agreement is not trivial
    assert (labels == expected).mean() >= 0.999
    meta = read_bundle(bundle_dir).meta
    assert meta["signatures"] == ["serving_default", "segment"]


def test_segment_signature_applies_the_bundles_post_processing(trained, tmp_path):
    """The trained fixture's bundle keeps class 1's largest component: the signature's labels equal
    predict.py's (which post-processes in NumPy), and differ from the labels without the step."""
    import tensorflow as tf
    from inference_helpers import phantom_scan

    from segpipe.inference.postprocess import keep_largest_component

    _, _, bundle_dir = trained
    assert read_bundle(bundle_dir).meta["verification"]["segment_label_agreement"] >= 0.999  # checked at export
    from segpipe.inference.segment import segment_volume

    bundle = read_bundle(bundle_dir)
    image, affine = phantom_scan((20, 18, 16), seed=4), np.diag([1.0, 1.0, 1.5, 1.0])
    options = dict(preprocessing=bundle.preprocessing, patch_size=bundle.patch_size)
    predict_fn = load_predictor(bundle, "keras")
    post = segment_volume(predict_fn, image, affine, settings=bundle.inference, **options).labels
    raw = segment_volume(predict_fn, image, affine, **options,
                         settings=bundle.inference.replace(postprocess_largest_component=())).labels
    segment = tf.saved_model.load(str(bundle_dir / "savedmodel")).signatures["segment"]
    labels = segment(image=tf.constant(image[..., None]), spacing_mm=tf.constant([1.0, 1.0, 1.5], tf.float64))["labels"]
    assert (labels.numpy() == post).mean() >= 0.999
    np.testing.assert_array_equal(keep_largest_component(raw, [1]), post)


def test_formats_not_written_are_recorded_and_named(tmp_path, monkeypatch):
    from segpipe.inference import runtimes

    model = tiny_model(depth=2, deep_supervision=False)
    arch = tiny_architecture(depth=2, deep_supervision=False)
    installed = runtimes.is_installed
    monkeypatch.setattr(runtimes, "is_installed",
                        lambda name: False if name.startswith("openvino") else installed(name))
    # no architecture either, so this one bundle also shows the Keras format not written (below); not
    # verified: what is checked here is what bundle.json records, not the formats' agreement
    out = write_bundle(model, tmp_path / "b", class_names=["bg", "a", "b"],
                       preprocessing=PREPROCESSING, patch_size=PATCH,
                       segment=False, verify=False)
    bundle = read_bundle(out)
    assert "openvino" not in bundle.files
    assert "openvino is not installed" in bundle.meta["formats_not_written"]["openvino"]
    with pytest.raises(BundleError,
                       match=r"Expected a 'openvino' model in the bundle .*Not written: openvino is not installed"):
        load_predictor(bundle, "openvino")
    with pytest.raises(ImportError,
                       match=r'Expected openvino installed for the OpenVINO export\. Received: openvino=True\. Install '
                             r'the openvino extra: pip install "segpipe\[openvino\]"'):
        write_bundle(model, tmp_path / "c", class_names=["bg", "a", "b"], preprocessing=PREPROCESSING, patch_size=PATCH,
                     openvino=True, architecture=arch)
    assert not (tmp_path / "c").exists()
    # a format whose runtime is missing at prediction time is an error, never a silent fallback
    monkeypatch.setattr(runtimes, "is_installed", lambda name: False if name == "onnx" else installed(name))
    with pytest.raises(ImportError,
                       match=r"Expected tf2onnx \(and onnxruntime to check it\) installed for the ONNX "
                             r"export\. Received: onnx=True\."):
        write_bundle(model, tmp_path / "d", class_names=["bg", "a", "b"], preprocessing=PREPROCESSING,
                     patch_size=PATCH, onnx=True)
    unchecked = write_bundle(model, tmp_path / "e", class_names=["bg", "a", "b"], preprocessing=PREPROCESSING,
                             patch_size=PATCH, verify=False, openvino=False, segment=False, architecture=arch)
    meta = read_bundle(unchecked).meta
    assert meta["verification"] == {"run": False}
    assert meta["formats_not_written"] == {"savedmodel:segment": "segment=False"}
    # a network not described by segpipe's builder arguments (bundle b): no Keras weights (they could not
    # load safely)
    assert "keras" not in bundle.files and bundle.architecture is None
    assert "no architecture given" in bundle.meta["formats_not_written"]["keras"]


def test_auto_picks_the_first_installed_format_of_the_documented_order(monkeypatch):
    from segpipe.inference import runtimes

    every = {"keras", "savedmodel", "onnx", "openvino"}
    monkeypatch.setattr(runtimes, "is_installed", lambda name: True)
    assert runtimes.choose_format(every) == runtimes.AUTO_ORDER[0] == "openvino"
    assert runtimes.choose_format({"keras", "savedmodel"}) == "keras"  # auto never picks a format that runs code
    monkeypatch.setattr(runtimes, "is_installed", lambda name: not name.startswith("openvino"))
    assert runtimes.choose_format(every) == "keras"
    with pytest.raises(ValueError, match=r"Expected a bundle with at least one format whose runtime is installed"):
        runtimes.choose_format({"savedmodel"})
    with pytest.raises(ImportError,
                       match=r"Expected openvino installed to predict with it\. Received: format='openvino'\. Install "
                             r"the openvino extra: pip install \"segpipe\[openvino\]\""):
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

    from segpipe.inference import runtimes
    from segpipe.inference.bundle import Bundle

    monkeypatch.setattr(runtimes, "is_installed", lambda name: True)
    bundle = Bundle(tmp_path, ("background", "fg"), 1, ("t1",), PREPROCESSING, "RAS", PATCH, InferenceSettings(),
                    {"keras": "model.weights.h5", "openvino": "openvino/model.xml"}, {},
                    meta={"verification": {"openvino-bf16_max_abs_diff": 0.0216,
                                           "openvino-bf16_within_tolerance": False}})
    with pytest.raises(BundleError, match=r"bundle.json: Expected bfloat16 probabilities within .* Received: "
                                          r"format='openvino-bf16'. This network differs by 0.0216"):
        load_predictor(bundle, "openvino-bf16")
    ok = dataclasses.replace(bundle, meta={"verification": {"openvino-bf16_within_tolerance": True}})
    # passes the check, then finds no file here
    with pytest.raises(BundleError,
                       match=r"Expected a model file that loads with format='openvino-bf16'\. "
                             r"Received: files.openvino="):
        load_predictor(ok, "openvino-bf16")
