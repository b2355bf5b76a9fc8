"""Prediction of raw scans: geometry of the output, predict.py round trip, formats, post-processing."""
import importlib.util

import numpy as np
import pytest
from inference_helpers import NON_RAS_AFFINE, PATCH, PREPROCESSING, phantom_scan, tiny_model, write_scan
from nibabel.orientations import aff2axcodes

import predict
from segpipe.data.preprocess import PreprocessSettings
from segpipe.export.bundle import write_bundle
from segpipe.inference.settings import InferenceSettings
from segpipe.io import read_nifti
from segpipe.inference.postprocess import keep_largest_component
from segpipe.inference.segment import find_cases, segment_volume
from segpipe.inference.sliding_window import keras_predict_fn

HAVE_ONNX = all(importlib.util.find_spec(m) for m in ("tf2onnx", "onnx", "onnxruntime"))
ANISOTROPIC_RAS = np.diag([0.7, 1.2, 2.5, 1.0]) + np.array([[0, 0, 0, -5.0], [0, 0, 0, 3.0], [0, 0, 0, 1.0], [0, 0, 0, 0]])


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
    out = write_bundle(model, tmp_path_factory.mktemp("predict") / "bundle", class_names=["background", "organ", "lesion"],
                       preprocessing=PREPROCESSING, patch_size=PATCH, onnx=HAVE_ONNX, verify=False)
    return model, out


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    """Two raw scans: anisotropic RAS, and anisotropic non-RAS with a multi-file name that is no channel set."""
    folder = tmp_path_factory.mktemp("scans")
    write_scan(folder / "a.nii.gz", phantom_scan((30, 22, 12), seed=1), ANISOTROPIC_RAS)
    write_scan(folder / "scan_2024.nii", phantom_scan((18, 26, 20), seed=2), NON_RAS_AFFINE)
    return folder


def test_predict_py_round_trip_equals_in_memory_inference(bundle, scans, tmp_path):
    model, bundle_dir = bundle
    out = tmp_path / "out"
    assert predict.main(["--model", str(bundle_dir), "--input", str(scans), "--output", str(out), "--quiet"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a.nii.gz", "scan_2024.nii.gz"]
    fn = keras_predict_fn(model)  # the trained (deep-supervision) model in memory
    for name, case in (("a.nii.gz", "a"), ("scan_2024.nii", "scan_2024")):
        scan = read_nifti(scans / name)
        written = read_nifti(out / f"{case}.nii.gz")
        assert written.array.shape == scan.array.shape and np.issubdtype(written.array.dtype, np.integer)
        np.testing.assert_allclose(written.affine, scan.affine, atol=1e-6)
        assert aff2axcodes(written.affine) == aff2axcodes(scan.affine)
        expected = segment_volume(fn, scan.array, scan.affine, preprocessing=PREPROCESSING, patch_size=PATCH)
        np.testing.assert_array_equal(written.array, expected.labels)


@pytest.mark.parametrize("fmt", ["savedmodel", "onnx"])
def test_formats_give_the_same_probabilities(bundle, scans, tmp_path, fmt):
    if fmt == "onnx" and not HAVE_ONNX:
        pytest.skip("onnx extra not installed")
    _, bundle_dir = bundle
    args = ["--model", str(bundle_dir), "--input", str(scans / "scan_2024.nii"), "--quiet", "--save-probabilities",
            "--no-mirror", "--batch-size", "2"]
    assert predict.main([*args, "--output", str(tmp_path / "keras")]) == 0
    assert predict.main([*args, "--output", str(tmp_path / fmt), "--format", fmt]) == 0
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
    assert "output folder other than the input folder" in capsys.readouterr().err
    two_channels = tmp_path / "two.nii.gz"
    write_scan(two_channels, np.zeros((8, 8, 8, 2), np.float32), np.eye(4))
    assert predict.main(["--model", str(bundle_dir), "--input", str(two_channels), "--output", str(tmp_path / "o")]) == 1
    assert "Expected 1 input channel(s) ['channel_0'] for case two. Received: 2 in two.nii.gz" in capsys.readouterr().err
    assert predict.main(["--model", str(tmp_path), "--input", str(scans), "--output", str(tmp_path / "o")]) == 1
    assert "bundle.json in the bundle. Received: no such file" in capsys.readouterr().err


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
