import numpy as np
import pytest
from nibabel.orientations import aff2axcodes

from segpipe.data.layouts import load_dataset
from segpipe.data.preprocess import (
    PreprocessSettings,
    preprocess_case,
    preprocess_volume,
    resample,
    restore_to_original,
)

from . import make_case, make_dataset

# A non-RAS (P, S, L after the permutation), anisotropic, translated affine.
OBLIQUE_AXES = np.array([[0, 0, -3.0, 10], [-1.2, 0, 0, 5], [0, 0.8, 0, -2], [0, 0, 0, 1]])


def _world_to_voxel(affine_from, affine_to, index):
    """Voxel indices in grid ``affine_to`` of voxel centres ``index`` (N, 3) of grid ``affine_from``."""
    world = affine_from @ np.c_[index, np.ones(len(index))].T
    return (np.linalg.inv(affine_to) @ world)[:3].T


def test_reorientation_to_ras_keeps_world_positions():
    image, label = make_case(shape=(10, 12, 7))
    out = preprocess_volume(image, OBLIQUE_AXES, label, crop_to_nonzero=False)
    meta = out.meta
    assert meta["original_orientation"] == "".join(aff2axcodes(OBLIQUE_AXES)) == "PSL"
    assert aff2axcodes(np.array(meta["affine"])) == ("R", "A", "S")
    assert out.label.shape == (7, 10, 12)
    assert meta["spacing_mm"] == pytest.approx([3.0, 1.2, 0.8])
    # Each preprocessed voxel centre lands exactly on the original voxel with the same label.
    index = np.argwhere(np.ones(out.label.shape, bool))
    original = np.round(_world_to_voxel(np.array(meta["affine"]), OBLIQUE_AXES, index)).astype(int)
    np.testing.assert_array_equal(label[tuple(original.T)], out.label[tuple(index.T)])


@pytest.mark.parametrize("crop", [True, False])
@pytest.mark.parametrize("target", [None, (0.7, 0.7, 0.7), (1.0, 0.6, 0.4)])
def test_nearest_round_trip_is_exact_for_non_ras_anisotropic_input(crop, target):
    image, label = make_case(shape=(10, 12, 7))
    out = preprocess_volume(image, OBLIQUE_AXES, label, target_spacing_mm=target, crop_to_nonzero=crop,
                            label_interpolation="nearest")
    if target is not None:
        assert out.meta["shape"] != out.meta["cropped_shape"]
    back = restore_to_original(out.label, out.meta, order=0)
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, label)


def test_image_round_trip_without_resampling_is_exact_up_to_normalisation():
    image, label = make_case(shape=(9, 8, 6))
    out = preprocess_volume(image, OBLIQUE_AXES, label, normalization="none")
    back = restore_to_original(out.image, out.meta, order=1)
    np.testing.assert_array_equal(back, image)


def test_probabilities_go_back_with_linear_interpolation_and_background_fill():
    image, label = make_case(shape=(10, 12, 7))
    out = preprocess_volume(image, OBLIQUE_AXES, label, target_spacing_mm=(1.5, 1.5, 1.5))
    probabilities = np.eye(3, dtype=np.float32)[out.label]
    back = restore_to_original(probabilities, out.meta, order=1, fill_value=[1.0, 0.0, 0.0])
    assert back.shape == (10, 12, 7, 3) and back.dtype == np.float32
    np.testing.assert_allclose(back.sum(-1), 1.0, atol=1e-5)
    assert np.mean(back.argmax(-1) == label) > 0.8  # downsampling by 1.5-5x loses detail, not geometry


def test_resampled_geometry_matches_world_coordinates():
    image, label = make_case(shape=(10, 12, 7))
    out = preprocess_volume(image, OBLIQUE_AXES, label, target_spacing_mm=(0.5, 0.5, 0.5), label_interpolation="nearest")
    index = np.argwhere(np.ones(out.label.shape, bool))
    original = np.round(_world_to_voxel(np.array(out.meta["affine"]), OBLIQUE_AXES, index)).astype(int)
    inside = np.all((original >= 0) & (original < label.shape), axis=1)
    assert inside.all()  # edge-aligned grids cover the same extent
    np.testing.assert_array_equal(label[tuple(original.T)], out.label[tuple(index.T)])
    expected = np.array(out.meta["cropped_shape"]) * np.array([3.0, 1.2, 0.8]) / np.array(out.meta["shape"])
    assert out.meta["spacing_mm"] == pytest.approx(expected.tolist())


def test_onehot_linear_labels_keep_classes_and_agree_with_nearest():
    image, label = make_case(shape=(16, 16, 10))
    affine = np.diag([1.0, 1.0, 3.0, 1.0])
    smooth = preprocess_volume(image, affine, label, target_spacing_mm=(1, 1, 1)).label
    nearest = preprocess_volume(image, affine, label, target_spacing_mm=(1, 1, 1), label_interpolation="nearest").label
    assert smooth.shape == nearest.shape == (15, 16, 30)  # x cropped by the zero slab, z upsampled 3x
    assert set(np.unique(smooth)) == {0, 1, 2}
    assert np.mean(smooth == nearest) > 0.9


def test_crop_keeps_nonzero_and_labelled_voxels():
    image, label = make_case(shape=(12, 10, 8))
    image[:, :, -2:] = 0
    label[5, 5, 7] = 1  # labelled voxel in a zero region is kept
    out = preprocess_volume(image, np.eye(4), label)
    assert out.meta["crop_box"] == [[1, 12], [0, 10], [0, 8]]
    assert out.label.sum() == label[1:].sum()


@pytest.mark.parametrize("scheme", ["zscore", "zscore_nonzero", "ct", "none"])
def test_normalisation_schemes(scheme):
    image, label = make_case(shape=(12, 10, 8))
    stats = ({"mean": 60.0, "std": 10.0, "percentile_00_5": 45.0, "percentile_99_5": 70.0},)
    settings = PreprocessSettings(normalization=scheme, crop_to_nonzero=False,
                                  intensity_stats=stats if scheme == "ct" else None)
    out = preprocess_volume(image, np.eye(4), label, settings).image[..., 0]
    nonzero = image[..., 0] != 0
    if scheme == "zscore":
        assert out.mean() == pytest.approx(0, abs=1e-5) and out.std() == pytest.approx(1, abs=1e-4)
    elif scheme == "zscore_nonzero":
        assert np.all(out[~nonzero] == 0)
        assert out[nonzero].mean() == pytest.approx(0, abs=1e-5) and out[nonzero].std() == pytest.approx(1, abs=1e-4)
    elif scheme == "ct":
        assert out.min() == pytest.approx(-1.5) and out.max() <= 1.0 + 1e-6
    else:
        np.testing.assert_array_equal(out, image[..., 0])


def test_per_channel_normalisation_and_multichannel_case(tmp_path):
    make_dataset(tmp_path, "nnunet", channels=2, num_cases=1)
    case = load_dataset(tmp_path).cases[0]
    out = preprocess_case(case, normalization=("zscore", "none"), target_spacing_mm=(0.5, 1.0, 1.0))
    assert out.image.shape[-1] == 2 and out.image.dtype == np.float32 and out.label.dtype == np.uint8
    assert out.image.shape[:3] == out.label.shape
    assert [n["scheme"] for n in out.meta["normalization"]] == ["zscore", "none"]
    assert abs(float(out.image[..., 0].mean())) < 0.1 and out.image[..., 1].max() > 40
    assert out.meta["case_id"] == "case_000"


def test_resample_maps_edges_to_edges():
    ramp = np.arange(4, dtype=np.float32)[:, None, None] * np.ones((1, 2, 2), np.float32)
    up = resample(ramp, (8, 2, 2), order=1)
    np.testing.assert_allclose(up[:, 0, 0], [0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3])


def test_invalid_settings_name_the_key():
    with pytest.raises(ValueError, match="Expected one of .*Received: normalization='minmax'"):
        PreprocessSettings(normalization="minmax")
    with pytest.raises(ValueError, match=r"^Expected dataset statistics \(from the fingerprint\) for normalization='ct'\. Received: intensity_stats=None\.$"):
        PreprocessSettings(normalization="ct")
    with pytest.raises(ValueError, match="Received: target_spacing_mm=\\(1, 0\\)"):
        PreprocessSettings(target_spacing_mm=(1, 0))
    with pytest.raises(ValueError, match="Expected an array of shape"):
        restore_to_original(np.zeros((2, 2, 2)), preprocess_volume(np.ones((3, 3, 3)), np.eye(4)).meta, order=0)
