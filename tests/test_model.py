import numpy as np
import pytest

from segpipe.models.unet3d import build_unet3d


@pytest.mark.parametrize("norm", ["batch", "instance", "none"])
def test_output_is_softmax_of_the_input_size(norm):
    model = build_unet3d(2, 3, depth=3, base_filters=4, norm=norm)
    x = np.random.default_rng(0).normal(size=(2, 16, 8, 24, 2)).astype("float32")
    y = model.predict_on_batch(x)
    assert y.shape == (2, 16, 8, 24, 3)
    np.testing.assert_allclose(y.sum(-1), 1.0, atol=1e-5)


def test_filters_double_per_level_up_to_the_cap():
    model = build_unet3d(1, 2, depth=4, base_filters=8, max_filters=32)
    assert [model.get_layer(f"enc{i}_conv1").filters for i in range(4)] == [8, 16, 32, 32]


def test_deep_supervision_returns_outputs_at_halving_resolution():
    model = build_unet3d(1, 3, depth=4, base_filters=4, deep_supervision=True)
    outputs = model.predict_on_batch(np.zeros((1, 32, 32, 16, 1), "float32"))
    assert [o.shape for o in outputs] == [(1, 32, 32, 16, 3), (1, 16, 16, 8, 3), (1, 8, 8, 4, 3)]


def test_invalid_options_name_the_argument():
    with pytest.raises(ValueError, match="norm=.*'group'"):
        build_unet3d(1, 2, norm="group")
    with pytest.raises(ValueError, match="num_classes=1"):
        build_unet3d(1, 1)


def test_the_unet_learns_a_voxelwise_rule_that_needs_its_context():
    """Skip connections and the decoder carry information: a small U-Net fits "label = 1 where the
    smoothed input is positive" on a fixed batch to a Dice far above chance."""
    import keras
    from scipy import ndimage

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 16, 16, 16, 1)).astype("float32")
    target = np.stack([ndimage.gaussian_filter(v[..., 0], 2.0) > 0 for v in x])
    y = np.eye(2, dtype="float32")[target.astype(int)]
    model = build_unet3d(1, 2, depth=2, base_filters=8, norm="instance")
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="categorical_crossentropy")
    before = float(model.evaluate(x, y, verbose=0))
    # At most 60 epochs (one full-batch step each), as before, checked every 5: the test ends as soon as
    # both goals are met instead of always running all 60. Successive fit calls continue the same optimizer
    # state (Adam's step count included), so the trajectory is that of one 60-epoch fit, up to the order
    # of the four samples in the batch, which fit shuffles every epoch either way.
    for _ in range(12):
        model.fit(x, y, epochs=5, batch_size=4, verbose=0)
        predicted = model.predict_on_batch(x).argmax(-1).astype(bool)
        dice = 2 * np.sum(predicted & target) / (predicted.sum() + target.sum())
        loss = float(model.evaluate(x, y, verbose=0))
        if loss < 0.5 * before and dice > 0.85:
            break
    assert loss < 0.5 * before, (loss, before)
    assert dice > 0.85, dice


def test_same_seed_same_initial_weights():
    import keras

    weights = []
    for _ in range(2):
        keras.utils.set_random_seed(3)
        weights.append(build_unet3d(1, 2, depth=2, base_filters=2).get_weights())
    for a, b in zip(*weights):
        np.testing.assert_array_equal(a, b)
