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
