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


def _only(name: str, **options) -> Augmenter:
    settings = AugmentSettings.disabled().to_dict()
    settings[name].update(p=1.0, **options)
    return Augmenter(AugmentSettings.from_dict(settings))


def test_brightness_multiplies_each_channel_by_one_factor_in_its_range():
    image = np.random.default_rng(1).uniform(1.0, 2.0, size=(6, 7, 8, 3)).astype(np.float32)
    for seed in range(5):
        out, _ = _only("brightness", range=[0.8, 0.9])(image, None, np.random.default_rng(seed))
        ratio = out / image
        per_channel = ratio.reshape(-1, 3)
        np.testing.assert_allclose(per_channel, per_channel[:1].repeat(len(per_channel), 0), rtol=1e-6)
        assert np.all((0.8 <= per_channel[0]) & (per_channel[0] <= 0.9))


def test_noise_adds_zero_mean_noise_with_a_variance_from_its_range():
    image = np.zeros((32, 32, 32, 1), np.float32)
    for seed in range(5):
        out, _ = _only("noise", variance=[0.04, 0.09])(image, None, np.random.default_rng(seed))
        assert abs(float(out.mean())) < 0.01
        assert 0.04 * 0.95 <= float(out.var()) <= 0.09 * 1.05  # 32768 samples: ±3 % sampling error


def test_blur_is_a_gaussian_filter_with_a_sigma_from_its_range():
    from scipy import ndimage

    image = np.random.default_rng(2).normal(size=(12, 12, 12, 2)).astype(np.float32)
    for seed in range(3):
        out, _ = _only("blur", sigma_vox=[0.6, 0.9])(image, None, np.random.default_rng(seed))
        sigmas = np.linspace(0.4, 1.1, 71)
        errors = [np.abs(out[..., 0] - ndimage.gaussian_filter(image[..., 0], s)).max() for s in sigmas]
        best = sigmas[int(np.argmin(errors))]
        assert min(errors) < 0.01 and 0.6 - 0.01 <= best <= 0.9 + 0.01
        np.testing.assert_allclose(out[..., 1], ndimage.gaussian_filter(image[..., 1], best), atol=0.02)  # same sigma


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
    with pytest.raises(ValueError, match=r"^Expected a key of augment settings \(mirror, .*, order\)\. "
                                         r"Received: rotate=\{'p': 1\}\. Did you mean 'rotation'\?$"):
        AugmentSettings.from_dict({"rotate": {"p": 1}})
    with pytest.raises(ValueError, match=r"^Expected a key of noise \(p, variance\)\. Received: noise\.prob=1\.$"):
        AugmentSettings.from_dict({"noise": {"prob": 1}})
    with pytest.raises(ValueError, match=r"^Expected a probability in \[0, 1\]\. Received: gamma\.p=2\.$"):
        AugmentSettings.from_dict({"gamma": {"p": 2}})
    with pytest.raises(ValueError, match=r"^Expected \[low, high\] with 0 < low <= high\. Received: scaling\.range=\[1\.2, 0\.8\]\.$"):
        AugmentSettings.from_dict({"scaling": {"range": [1.2, 0.8]}})
    assert AugmentSettings.from_dict({"rotation": {"range_deg": [-15, 15]}}).rotation.range_deg == (-15.0, 15.0)
    assert AugmentSettings.from_dict(None) == AugmentSettings()
