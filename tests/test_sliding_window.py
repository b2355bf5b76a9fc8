"""Sliding-window prediction: window placement, Gaussian weighting, mirroring, padding."""
import numpy as np
import pytest

from segpipe.inference.settings import InferenceSettings
from segpipe.inference.sliding_window import (
    gaussian_importance_map,
    mirror_combinations,
    pad_to_window,
    sliding_window_predict,
    window_slices,
    window_starts,
)


def pointwise_softmax(x: np.ndarray) -> np.ndarray:
    """A 'network' whose output at a voxel depends only on that voxel: exact under any tiling."""
    logits = np.concatenate([x[..., :1], -x[..., :1], 0.5 * x[..., :1] ** 2], axis=-1)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("size, window, overlap", [
    (100, 32, 0.5), (33, 16, 0.5), (64, 32, 0.5), (17, 16, 0.0), (50, 8, 0.9), (16, 16, 0.5), (5, 16, 0.5),
])
def test_window_starts_cover_the_axis_with_the_requested_overlap(size, window, overlap):
    starts = window_starts(size, window, overlap)
    assert starts[0] == 0
    if size <= window:
        assert starts == [0]
        return
    assert starts[-1] + window == size  # the last window ends flush with the volume
    gaps = np.diff(starts)
    step = max(1.0, window * (1 - overlap))
    assert (gaps > 0).all() and (gaps <= np.ceil(step)).all()
    if len(starts) > 2:  # minimal: one window fewer would leave a wider gap
        assert (size - window) / (len(starts) - 2) > step


def test_gaussian_map_is_centred_symmetric_and_positive():
    w = gaussian_importance_map((16, 12, 9))
    assert w.shape == (16, 12, 9) and w.dtype == np.float32
    assert w.max() == pytest.approx(1.0, abs=1e-6) and (w > 0).all()
    for axis in range(3):
        np.testing.assert_allclose(w, np.flip(w, axis), rtol=1e-6)
    # sigma = window / 8 along each axis: one sigma off-centre along x on the odd axis's centre line
    line = gaussian_importance_map((9, 1, 1))[:, 0, 0]
    assert line[4] == pytest.approx(1.0) and line[5] == pytest.approx(np.exp(-0.5 / (9 / 8) ** 2), rel=1e-5)


def test_gaussian_map_replaces_underflow_by_the_smallest_positive_weight():
    w = gaussian_importance_map((64, 64, 64), sigma_scale=0.02)
    assert (w > 0).all()
    assert w.min() == w[0, 0, 0] and w.min() < 1e-30


@pytest.mark.parametrize("shape, window, overlap", [
    ((40, 33, 17), (16, 16, 16), 0.5),   # sides not divisible by the step
    ((31, 16, 50), (16, 16, 8), 0.25),
    ((10, 7, 20), (16, 16, 16), 0.5),    # smaller than the window: padded
    ((64, 64, 64), (32, 32, 32), 0.0),   # no overlap
])
def test_every_voxel_gets_a_positive_weight(shape, window, overlap):
    padded, crop = pad_to_window(np.zeros((*shape, 1), np.float32), window)
    weight = gaussian_importance_map(window)
    total = np.zeros(padded.shape[:3])
    for s in window_slices(padded.shape[:3], window, overlap):
        total[s] += weight
    assert (total[crop] > 0).all()
    assert padded[crop].shape[:3] == shape


@pytest.mark.parametrize("shape", [(40, 33, 17), (10, 7, 20), (16, 16, 16)])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_a_pointwise_network_is_reproduced_exactly(shape, batch_size):
    """Wrong window placement, weighting or cropping of the padding would break this equality."""
    image = np.random.default_rng(0).normal(size=(*shape, 1)).astype(np.float32)
    out = sliding_window_predict(pointwise_softmax, image, (16, 16, 8),
                                 settings=InferenceSettings(batch_size=batch_size))
    assert out.shape == (*shape, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, pointwise_softmax(image), atol=1e-6)


def test_mirroring_averages_the_flipped_back_predictions():
    # A 'network' that ignores its input and favours class 1 towards high x: not mirror-invariant.
    window = (8, 6, 4)
    ramp = np.linspace(-2, 2, window[0])[:, None, None] * np.ones(window)
    fixed = np.stack([1 / (1 + np.exp(ramp)), 1 / (1 + np.exp(-ramp))], -1).astype(np.float32)
    calls = []

    def network(x):
        calls.append(x.copy())
        return np.broadcast_to(fixed, (len(x), *fixed.shape)).copy()

    image = np.arange(np.prod(window), dtype=np.float32).reshape(*window, 1)
    out = sliding_window_predict(network, image, window, settings=InferenceSettings(mirror_axes=(0, 2)))
    # flipping along x turns the ramp around; along z it changes nothing: mean of fixed and flip_x(fixed)
    np.testing.assert_allclose(out, (fixed + np.flip(fixed, 0)) / 2, atol=1e-6)
    assert len(calls) == 4
    np.testing.assert_array_equal(calls[1][0], np.flip(image, 0))  # the network saw the mirrored input


def test_mirror_combinations():
    assert mirror_combinations([]) == [()]
    assert len(mirror_combinations([0, 1, 2])) == 8
    assert mirror_combinations([2, 0]) == [(), (0,), (2,), (0, 2)]


def test_single_window_equals_direct_prediction_of_a_keras_model():
    import keras

    from segpipe.models.unet3d import build_unet3d

    keras.utils.set_random_seed(1)
    model = build_unet3d(1, 3, depth=2, base_filters=4)
    image = np.random.default_rng(1).normal(size=(16, 16, 16, 1)).astype(np.float32)
    direct = model.predict_on_batch(image[None])[0]
    out = sliding_window_predict(model.predict_on_batch, image, (16, 16, 16),
                                 settings=InferenceSettings(mirror_axes=()))
    np.testing.assert_allclose(out, direct, atol=1e-6)
    # with mirroring: the mean of the eight flipped-back direct predictions
    mirrored = sliding_window_predict(model.predict_on_batch, image, (16, 16, 16),
                                      settings=InferenceSettings(mirror_axes=(0, 1, 2)))
    flips = mirror_combinations([0, 1, 2])
    expected = np.mean([np.flip(model.predict_on_batch(np.flip(image, a)[None].copy())[0], a) for a in flips], 0)
    np.testing.assert_allclose(mirrored, expected, atol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    ({"overlap": 1.0}, "Expected a number in [0, 0.95]. Received: overlap=1.0."),
    ({"overlap": -0.1}, "Expected a number in [0, 0.95]. Received: overlap=-0.1."),
    ({"mirror_axes": (0, 3)},
     "Expected distinct spatial axes out of [0, 1, 2] ([] = no mirroring). Received: mirror_axes=[0, 3]."),
    ({"mirror_axes": (1, 1)},
     "Expected distinct spatial axes out of [0, 1, 2] ([] = no mirroring). Received: mirror_axes=[1, 1]."),
    ({"batch_size": 0}, "Expected an integer >= 1. Received: batch_size=0."),
    ({"sigma_scale": 0}, "Expected a number > 0. Received: sigma_scale=0."),
])
def test_bad_settings_are_named(kwargs, message):
    """The sliding window takes the one InferenceSettings, so its options fail where it is built."""
    with pytest.raises(ValueError) as info:
        InferenceSettings(**kwargs)
    assert str(info.value) == message


@pytest.mark.parametrize("image, window, settings, error, message", [
    (np.zeros((8, 8, 8, 1)), (16, 16), InferenceSettings(), ValueError,
     "Expected a window of 3 positive sizes. Received: window=(16, 16)."),
    (np.zeros((8, 8, 8)), (8, 8, 8), InferenceSettings(), ValueError,
     "Expected a channels-last image (X, Y, Z, C). Received: image.shape=(8, 8, 8)."),
    (np.zeros((8, 8, 8, 1)), (8, 8, 8), {"overlap": 0.5}, TypeError,
     "Expected an InferenceSettings. Received: settings=dict."),
])
def test_bad_arguments_are_named(image, window, settings, error, message):
    with pytest.raises(error) as info:
        sliding_window_predict(pointwise_softmax, image, window, settings=settings)
    assert str(info.value) == message


def test_a_network_returning_the_wrong_shape_is_named():
    with pytest.raises(ValueError, match=r"^Expected the network to return probabilities of shape \(1, 8, 8, 8\) "
                                         r"\+ \(classes,\)\. Received: output\.shape=\(1, 4, 8, 8, 1\)\.$"):
        sliding_window_predict(lambda x: x[:, :4], np.zeros((8, 8, 8, 1), np.float32), (8, 8, 8))
