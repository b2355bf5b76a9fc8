"""Prediction of raw scans: geometry of the output, predict.py against known answers, formats, post-processing."""
import importlib.util

import numpy as np
import pytest
from inference_helpers import (
    NON_RAS_AFFINE,
    PATCH,
    PREPROCESSING,
    phantom_scan,
    tiny_architecture,
    tiny_model,
    write_scan,
)
from nibabel.orientations import aff2axcodes

import predict
from segpipe.data.preprocess import PreprocessSettings
from segpipe.export.bundle import write_bundle
from segpipe.inference.postprocess import keep_largest_component
from segpipe.inference.segment import find_cases, segment_volume
from segpipe.inference.settings import InferenceSettings
from segpipe.io import read_nifti

HAVE_ONNX = all(importlib.util.find_spec(m) for m in ("tf2onnx", "onnx", "onnxruntime"))
ANISOTROPIC_RAS = np.diag([0.7, 1.2, 2.5, 1.0]) + np.array([[0, 0, 0, -5.0], [0, 0, 0, 3.0],
                                                            [0, 0, 0, 1.0], [0, 0, 0, 0]])


def threshold_network(x: np.ndarray) -> np.ndarray:
    """A translation- and mirror-equivariant 'network': class 1 where the (unnormalised) image > 200."""
    p = 1 / (1 + np.exp(-(x[..., 0] - 200.0) / 5.0))
    return np.stack([1 - p, p], -1).astype(np.float32)


@pytest.mark.parametrize("affine", [ANISOTROPIC_RAS, NON_RAS_AFFINE], ids=["anisotropic-RAS", "anisotropic-PSL"])
def test_output_is_on_the_input_grid_and_in_the_right_place(affine):
    image = phantom_scan((30, 22, 12))
    settings = PreprocessSettings(target_spacing_mm=(1.0, 1.0, 1.5), normalization="none", image_order=1)
    result = segment_volume(threshold_network, image, affine, preprocessing=settings, patch_size=(8, 8, 8),
                            return_probabilities=True)
    assert result.labels.shape == image.shape and result.labels.dtype == np.uint8
    np.testing.assert_array_equal(result.affine, affine)
    assert result.probabilities.shape == (*image.shape, 2)
    np.testing.assert_allclose(result.probabilities.sum(-1), 1.0, atol=1e-5)
    # Resampled there and back, the segmentation still lies where the bright ellipsoid is.
    truth = image > 200
    dice = 2 * (truth & (result.labels == 1)).sum() / (truth.sum() + (result.labels == 1).sum())
    assert dice > 0.95, dice  # mirrored along any axis it would be 0.45-0.76


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    model = tiny_model(depth=3, deep_supervision=True, seed=4)
    out = write_bundle(model, tmp_path_factory.mktemp("predict") / "bundle",
                       class_names=["background", "organ", "lesion"],
                       preprocessing=PREPROCESSING, patch_size=PATCH, onnx=HAVE_ONNX, verify=False,
                       # the segment signature has its own test (test_export.py)
                       segment=False, architecture=tiny_architecture(depth=3, deep_supervision=True))
    return model, out


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    """Two raw scans: anisotropic RAS, and anisotropic non-RAS with a multi-file name that is no channel set."""
    folder = tmp_path_factory.mktemp("scans")
    write_scan(folder / "a.nii.gz", phantom_scan((30, 22, 12), seed=1), ANISOTROPIC_RAS)
    write_scan(folder / "scan_2024.nii", phantom_scan((18, 26, 20), seed=2), NON_RAS_AFFINE)
    return folder


def threshold_model(scale: float = 20.0):
    """A hand-built network whose answer is known: class 1 exactly where the normalised image is > 0.

    A 1×1×1 convolution with logits (-scale·z, +scale·z) and a softmax: pointwise, so window placement,
    Gaussian blending and mirroring cannot change its output, and with z-scoring (z > 0 ⟺ value > mean)
    it labels the voxels brighter than the scan's mean.
    """
    import keras

    inputs = keras.Input((None, None, None, 1), name="image")
    logits = keras.layers.Conv3D(2, 1, name="threshold")(inputs)
    model = keras.Model(inputs, keras.layers.Softmax(name="probabilities")(logits))
    model.get_layer("threshold").set_weights([np.array([-scale, scale], np.float32).reshape(1, 1, 1, 1, 2),
                                              np.zeros(2, np.float32)])
    return model


def two_level_scan(shape, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(scan, object mask): an off-centre ellipsoid at 990-1010 on a 90-110 background, zero margin.

    The object fills 5-50 % of the voxels, so the scan's mean (with or without the zero margin)
    falls in the gap (110, 990) between the two levels, and "brighter than the mean" is the object.
    """
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"), -1)
    inside = (((grid - [0.25, -0.15, 0.1]) / [0.5, 0.6, 0.55]) ** 2).sum(-1) < 1
    image = np.where(inside, 1000.0, 100.0) + rng.uniform(-10, 10, shape)
    image[:2] = 0  # cropped away by crop_to_nonzero, background in the output
    inside[:2] = False
    assert 0.05 < inside.mean() < 0.5 and 130 < image.mean() < 600 and 130 < image[2:].mean() < 600
    return image.astype(np.float32), inside


# Voxel axes (P, S, L): reoriented to RAS the spacing is PREPROCESSING's target (1, 1, 1.5), so no resampling.
PERMUTED_AT_TARGET = np.array([[0, 0, -1.0, 20.0], [-1.0, 0, 0, 11.0], [0, 1.5, 0, -4.0], [0, 0, 0, 1]])


@pytest.fixture(scope="module")
def threshold_bundle(tmp_path_factory):
    return write_bundle(threshold_model(), tmp_path_factory.mktemp("threshold") / "bundle",
                        class_names=["background", "object"], preprocessing=PREPROCESSING, patch_size=PATCH,
                        verify=False, segment=False)  # no builder arguments: OpenVINO (auto) and SavedModel, no Keras


def test_predict_py_labels_a_scan_as_a_hand_built_network_must(threshold_bundle, tmp_path):
    """predict.py against answers known without segpipe: the object mask of each scan.

    On the target grid (RAS, or permuted and flipped) every voxel must be right: a wrong
    reorientation, crop or restore would move the off-centre object. With resampling (anisotropic,
    non-RAS; spacing 0.9-1.8 mm) the labels may differ only within 4 mm of the object's border
    (the image and the probabilities are each interpolated once, about a voxel each).
    """
    from scipy import ndimage

    scans = tmp_path / "scans"
    cases = {"ras": (np.diag([1.0, 1.0, 1.5, 1.0]), (26, 20, 14)), "permuted": (PERMUTED_AT_TARGET, (20, 14, 22)),
             "resampled": (NON_RAS_AFFINE, (36, 30, 24))}
    truths = {}
    for i, (name, (affine, shape)) in enumerate(cases.items()):
        image, truths[name] = two_level_scan(shape, seed=i)
        write_scan(scans / f"{name}.nii.gz", image, affine)
    out = tmp_path / "out"
    assert predict.main(["--model", str(threshold_bundle), "--input", str(scans), "--output", str(out), "--quiet",
                         "--format", "auto"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["permuted.nii.gz", "ras.nii.gz", "resampled.nii.gz"]
    for name, (affine, shape) in cases.items():
        written = read_nifti(out / f"{name}.nii.gz")
        assert written.array.shape == shape and np.issubdtype(written.array.dtype, np.integer)
        np.testing.assert_allclose(written.affine, affine, atol=1e-6)
        assert aff2axcodes(written.affine) == aff2axcodes(affine)
        labels, truth = written.array == 1, truths[name]
        if name != "resampled":
            np.testing.assert_array_equal(labels, truth, err_msg=name)
            continue
        spacing = np.linalg.norm(affine[:3, :3], axis=0)
        far = np.maximum(ndimage.distance_transform_edt(truth, sampling=spacing),
                         ndimage.distance_transform_edt(~truth, sampling=spacing)) > 4.0
        assert far.mean() > 0.5 and (far & truth).sum() > 100  # far inside and far outside
        np.testing.assert_array_equal(labels[far], truth[far])
        assert 2 * (labels & truth).sum() / (labels.sum() + truth.sum()) > 0.8


@pytest.mark.parametrize("fmt", ["savedmodel", "onnx", "openvino", "auto"])
def test_formats_give_the_same_probabilities(bundle, scans, tmp_path, fmt):
    if fmt == "onnx" and not HAVE_ONNX:
        pytest.skip("onnx extra not installed")
    if fmt == "openvino" and importlib.util.find_spec("openvino") is None:
        pytest.skip("openvino extra not installed")
    _, bundle_dir = bundle
    args = ["--model", str(bundle_dir), "--input", str(scans / "scan_2024.nii"), "--quiet", "--save-probabilities",
            "--probabilities-dtype", "float32",
            "--no-mirror", "--batch-size", "2"]
    assert predict.main([*args, "--output", str(tmp_path / "keras")]) == 0
    trust = ["--trust-bundle"] if fmt == "savedmodel" else []  # a SavedModel can run code: only when trusted
    assert predict.main([*args, "--output", str(tmp_path / fmt), "--format", fmt, *trust]) == 0
    reference = read_nifti(tmp_path / "keras" / "scan_2024_probabilities.nii.gz").array
    other = read_nifti(tmp_path / fmt / "scan_2024_probabilities.nii.gz").array
    assert reference.shape == (18, 26, 20, 3)
    assert np.abs(other - reference).max() <= 1e-4
    labels = [read_nifti(tmp_path / d / "scan_2024.nii.gz").array for d in ("keras", fmt)]
    top2 = np.sort(reference, -1)[..., -2:]
    decided = top2[..., 1] - top2[..., 0] > 1e-3  # where a 1e-4 difference cannot flip the argmax
    np.testing.assert_array_equal(labels[0][decided], labels[1][decided])


def test_predict_py_errors_are_clear(bundle, scans, tmp_path, capsys):
    _, bundle_dir = bundle
    assert predict.main(["--model", str(bundle_dir), "--input", str(tmp_path / "none"), "--output", str(tmp_path)]) == 1
    assert "Expected a NIfTI file or a folder of them. Received:" in capsys.readouterr().err
    assert predict.main(["--model", str(bundle_dir), "--input", str(scans), "--output", str(scans)]) == 1
    assert ("Expected an output folder other than an input folder (outputs would replace inputs). "
            f"Received: --output={scans} (holds 2 input(s): {scans / 'a.nii.gz'}, ") in capsys.readouterr().err
    two_channels = tmp_path / "two.nii.gz"
    write_scan(two_channels, np.zeros((8, 8, 8, 2), np.float32), np.eye(4))
    assert predict.main(["--model", str(bundle_dir), "--input", str(two_channels), "--output",
                         str(tmp_path / "o")]) == 1
    assert ("two.nii.gz: Expected 1 channel(s) ['channel_0'] (the model's input). Received: 2 channel(s) in two.nii.gz"
            in capsys.readouterr().err)  # checked before the network is loaded (segpipe.cli.predict.check_inputs)
    assert predict.main(["--model", str(tmp_path), "--input", str(scans), "--output", str(tmp_path / "o")]) == 1
    assert f"Expected bundle.json in the bundle folder (it is written last: without it the bundle is incomplete). " \
           f"Received: bundle.json={tmp_path / 'bundle.json'} (no such file)." in capsys.readouterr().err


def test_find_cases_groups_channel_files(tmp_path):
    for name in ("p_0000.nii.gz", "p_0001.nii.gz", "q.nii", "scan_2024.nii.gz"):
        (tmp_path / name).touch()
    cases = find_cases(tmp_path, input_channels=2)
    assert [(c.case_id, [p.name for p in c.image_paths]) for c in cases] == [
        ("p", ["p_0000.nii.gz", "p_0001.nii.gz"]), ("q", ["q.nii"]), ("scan_2024", ["scan_2024.nii.gz"])]
    assert [c.case_id for c in find_cases(tmp_path, input_channels=1)] == ["p_0000", "p_0001", "q", "scan_2024"]


def test_keep_largest_component_per_class():
    labels = np.zeros((12, 6, 6), np.uint8)
    labels[0:4, :3, :3] = 1     # 36 voxels: kept
    labels[6:7, 0, 0] = 1       # 1 voxel: removed
    labels[9:11, 4:, 4:] = 2    # class 2 is not processed: both blobs stay
    labels[11, 0, 0] = 2
    labels[5, 3, 3] = 1         # 1 voxel, two voxels away from the big blob: removed
    out = keep_largest_component(labels, [1])
    assert out.dtype == np.uint8
    assert (out == 1).sum() == 36 and (out == 2).sum() == (labels == 2).sum()
    corner = np.zeros((3, 3, 3), np.uint8)
    corner[0, 0, 0] = corner[1, 1, 1] = 1
    corner[2, 2, 2] = 0
    assert (keep_largest_component(corner, [1], connectivity=3) == 1).sum() == 2  # corner neighbours touch
    assert (keep_largest_component(corner, [1], connectivity=1) == 1).sum() == 1  # face neighbours only
    with pytest.raises(ValueError, match=r"^Expected an integer label map\. Received: labels\.dtype=float32\.$"):
        keep_largest_component(labels.astype(np.float32), [1])


def test_postprocessing_is_applied_to_predictions(tmp_path):
    # threshold network + two bright blobs: with post-processing only the larger one stays
    image = np.full((24, 16, 16), 100, np.float32)
    image[2:10, 2:10, 2:10] = 300
    image[16:19, 10:13, 10:13] = 300
    settings = PreprocessSettings(normalization="none", crop_to_nonzero=False)
    kwargs = dict(preprocessing=settings, patch_size=(8, 8, 8))
    plain = segment_volume(threshold_network, image, np.eye(4), settings=InferenceSettings(mirror_axes=()),
                           **kwargs).labels
    kept = segment_volume(threshold_network, image, np.eye(4), **kwargs,
                          settings=InferenceSettings(mirror_axes=(), postprocess_largest_component=(1,))).labels
    assert (plain == 1).sum() == 8**3 + 3**3 and (kept == 1).sum() == 8**3


def test_labels_without_probabilities_equal_the_argmax_of_the_probability_path():
    """The bounded-memory path (per-slab blending, rows mapped back one by one) gives the same labels."""
    image = phantom_scan((30, 22, 12), seed=3)
    network = lambda x: threshold_network(x * 40 + 200)  # noqa: E731  (z-scored input -> a soft threshold)
    for affine in (np.diag([1.0, 1.0, 1.5, 1.0]), ANISOTROPIC_RAS, NON_RAS_AFFINE):
        kwargs = dict(preprocessing=PREPROCESSING, patch_size=(8, 8, 8), settings=InferenceSettings(mirror_axes=(0,)))
        full = segment_volume(network, image, affine, return_probabilities=True, **kwargs)
        lean = segment_volume(network, image, affine, **kwargs)
        assert lean.probabilities is None and lean.labels.dtype == np.uint8 and lean.labels.shape == image.shape
        assert 0.05 < (full.labels == 1).mean() < 0.95  # not a constant map
        top2 = np.sort(full.probabilities, -1)[..., -2:]
        decided = top2[..., 1] - top2[..., 0] > 1e-5  # float rounding of the separable resampling
        np.testing.assert_array_equal(lean.labels[decided], full.labels[decided])
        assert (lean.labels == full.labels).mean() >= 0.9999


_MEMORY_SCRIPT = r"""
import sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from segpipe.data.preprocess import PreprocessSettings
from segpipe.inference.settings import InferenceSettings
from segpipe.inference.segment import segment_volume
assert "tensorflow" not in sys.modules
def network(x):  # pointwise softmax over 3 classes: costs nothing, so the blending is what is measured
    v = x[..., 0]
    logits = np.stack([v, -v, 0.5 * v * v], -1)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)
shape, spacing, probabilities = (160, 160, 120), float(sys.argv[2]), sys.argv[3] == "1"
image = np.random.default_rng(0).normal(100, 20, size=shape).astype(np.float32)
def peak_kib():  # VmHWM: this process's own peak (ru_maxrss would start at the forking parent's)
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1])
before = peak_kib()
result = segment_volume(network, image, np.diag([spacing] * 3 + [1.0]),
                        preprocessing=PreprocessSettings(target_spacing_mm=(1.0, 1.0, 1.0), image_order=1),
                        patch_size=(32, 32, 32), settings=InferenceSettings(mirror_axes=(), batch_size=4),
                        return_probabilities=probabilities)
assert result.labels.shape == shape
print((peak_kib() - before) * 1024 / image.size)
"""


def _peak_bytes_per_voxel(spacing: float, probabilities: bool) -> float:
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parent.parent)
    out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, root, str(spacing), str(int(probabilities))],
                         capture_output=True, text=True, check=True, timeout=300)
    return float(out.stdout.strip().splitlines()[-1])


def test_peak_memory_per_voxel_of_a_large_volume_without_probabilities():
    """3.1 M voxels, 3 classes, in a fresh process: the peak RSS growth beyond the input image.

    Without probabilities the peak is preprocessing's (the normalised copy and its temporaries,
    ~11 B per voxel) and blending adds a window-thick slab; a float32 array of every class at full
    size would add 12 B per voxel (and its mapped-back copy 12 more), which the probability path shows.
    """
    same_grid = _peak_bytes_per_voxel(1.0, probabilities=False)
    resampled = _peak_bytes_per_voxel(0.8, probabilities=False)  # preprocessed grid ~half the voxels
    with_probabilities = _peak_bytes_per_voxel(1.0, probabilities=True)
    assert same_grid <= 14.0, same_grid
    assert resampled <= 18.0, resampled
    assert with_probabilities >= same_grid + 8.0, (with_probabilities, same_grid)
