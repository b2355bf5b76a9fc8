import numpy as np
import pytest

from segpipe.data.augment import Augmenter, AugmentSettings
from segpipe.data.sampling import ArrayCase, PatchSampler

SPATIAL_ONLY = {
    "gamma": {"p": 0.0, "invert_p": 0.0}, "brightness": {"p": 0.0}, "contrast": {"p": 0.0},
    "noise": {"p": 0.0}, "blur": {"p": 0.0},
}
ALL_SPATIAL = {
    **SPATIAL_ONLY, "mirror": {"p": 0.5}, "rot90": {"p": 1.0}, "rotation": {"p": 1.0, "range_deg": [-30, 30]},
    "scaling": {"p": 1.0}, "elastic": {"p": 1.0, "magnitude_vox": [1, 3], "sigma_vox": [3, 4]},
}


def _blobs(shape=(16, 16, 12), seed=0):
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, np.uint8)
    for value in (1, 2, 3):
        centre = rng.integers(3, np.array(shape) - 3)
        label[tuple(slice(c - 2, c + 3) for c in centre)] = value
    return label


@pytest.mark.parametrize("seed", range(5))
def test_spatial_transforms_keep_image_and_label_aligned(seed):
    label = _blobs(seed=seed)
    image = np.stack([label.astype(np.float32), np.ones(label.shape, np.float32)], axis=-1)
    augmenter = Augmenter(AugmentSettings.from_dict({**ALL_SPATIAL, "order": 0}))
    out_image, out_label = augmenter(image, label, np.random.default_rng(seed))
    assert out_image.shape == image.shape and out_label.shape == label.shape
    # Same coordinates, same nearest-neighbour rule: the image channel equals the label exactly.
    np.testing.assert_array_equal(out_image[..., 0], out_label)
    assert out_label.any() and not np.array_equal(out_label, label)


def test_spline_image_stays_aligned_with_nearest_label():
    label = _blobs((20, 20, 20))
    image = label[..., None].astype(np.float32)
    augmenter = Augmenter(AugmentSettings.from_dict({**ALL_SPATIAL, "order": 3}))
    out_image, out_label = augmenter(image, label, np.random.default_rng(1))
    agree = np.mean(np.round(out_image[..., 0]) == out_label)
    assert agree > 0.95


def test_patches_from_volumes_stay_aligned():
    label = _blobs((24, 24, 24))
    case = ArrayCase.from_arrays(label[..., None].astype(np.float32), label)
    settings = AugmentSettings.from_dict({**ALL_SPATIAL, "order": 0})
    sampler = PatchSampler([case], (12, 12, 12), augmenter=Augmenter(settings), foreground_fraction=1.0, seed=4)
    for index in range(8):
        image, patch_label = sampler(index)
        np.testing.assert_array_equal(image[..., 0], patch_label)


@pytest.mark.parametrize("name", ["gamma", "brightness", "contrast", "noise", "blur"])
def test_each_intensity_transform_changes_only_the_image(name):
    label = _blobs()
    image = np.random.default_rng(0).normal(size=label.shape + (2,)).astype(np.float32) + label[..., None]
    options = AugmentSettings.disabled().to_dict()
    options[name]["p"] = 1.0
    augmenter = Augmenter(AugmentSettings.from_dict({k: v for k, v in options.items()}))
    out_image, out_label = augmenter(image, label, np.random.default_rng(0))
    assert out_image.shape == image.shape and out_image.dtype == np.float32
    assert not np.allclose(out_image, image)
    np.testing.assert_array_equal(out_label, label)
    if name == "gamma":  # mean and std are retained
        np.testing.assert_allclose(out_image.mean(axis=(0, 1, 2)), image.mean(axis=(0, 1, 2)), atol=1e-4)
        np.testing.assert_allclose(out_image.std(axis=(0, 1, 2)), image.std(axis=(0, 1, 2)), rtol=1e-4)
    if name == "contrast":
        assert out_image.min() >= image.min() - 1e-6 and out_image.max() <= image.max() + 1e-6


def test_disabled_is_identity_and_draws_no_spatial_transform():
    label = _blobs()
    image = label[..., None].astype(np.float32)
    augmenter = Augmenter(AugmentSettings.disabled())
    assert augmenter.spatial_coords((8, 8, 8), np.random.default_rng(0)) is None
    out_image, out_label = augmenter(image, label, np.random.default_rng(0))
    np.testing.assert_array_equal(out_image, image)
    np.testing.assert_array_equal(out_label, label)


def test_mirror_and_rot90():
    label = _blobs((10, 10, 8))
    image = label[..., None].astype(np.float32)
    flip = Augmenter(AugmentSettings.from_dict({**SPATIAL_ONLY, "rotation": {"p": 0}, "scaling": {"p": 0},
                                                "mirror": {"p": 1.0, "axes": [1]}}))
    _, out = flip(image, label, np.random.default_rng(0))
    np.testing.assert_array_equal(out, label[:, ::-1])
    rot = Augmenter(AugmentSettings.from_dict({**SPATIAL_ONLY, "rotation": {"p": 0}, "scaling": {"p": 0},
                                               "mirror": {"p": 0.0}, "rot90": {"p": 1.0}}))
    _, out = rot(image, label, np.random.default_rng(0))
    assert out.shape == label.shape  # only the (0, 1) plane has equal sides
    assert any(np.array_equal(out, np.rot90(label, k, axes=(0, 1))) for k in (1, 2, 3))


def test_same_seed_same_result():
    label = _blobs()
    image = np.random.default_rng(0).normal(size=label.shape + (1,)).astype(np.float32)
    augmenter = Augmenter(AugmentSettings.from_dict({"rotation": {"p": 0.5}, "elastic": {"p": 0.5}, "noise": {"p": 0.5}}))
    results = [augmenter(image, label, np.random.default_rng(11)) for _ in range(2)]
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])
    different = augmenter(image, label, np.random.default_rng(12))
    assert not np.array_equal(different[0], results[0][0])


def test_settings_validation_names_the_key():
    with pytest.raises(ValueError, match="Unknown augmentation 'rotate'. Expected one of"):
        AugmentSettings.from_dict({"rotate": {"p": 1}})
    with pytest.raises(ValueError, match=r"Unknown key\(s\) \['prob'\] in augmentation 'noise'"):
        AugmentSettings.from_dict({"noise": {"prob": 1}})
    with pytest.raises(ValueError, match=r"`gamma.p`. Expected a probability in \[0, 1\]. Received: p=2"):
        AugmentSettings.from_dict({"gamma": {"p": 2}})
    with pytest.raises(ValueError, match=r"`scaling.range`. Expected \[low, high\] with 0 < low <= high"):
        AugmentSettings.from_dict({"scaling": {"range": [1.2, 0.8]}})
    assert AugmentSettings.from_dict({"rotation": {"range_deg": [-15, 15]}}).rotation.range_deg == (-15.0, 15.0)
    assert AugmentSettings.from_dict(None) == AugmentSettings()
