"""The U-Net's output head: softmax or logits (model.output), deep supervision as a plain
multi-output model, and the full-resolution probabilities every inference path and export uses."""
import keras
import numpy as np
import pytest

from segpipe.export.bundle import inference_model
from segpipe.models.unet3d import build_unet3d, outputs_logits, probability_model


def _pair(deep_supervision: bool):
    """The same weights with a softmax and with a logits head."""
    keras.utils.set_random_seed(0)
    soft = build_unet3d(1, 3, depth=3, base_filters=4, deep_supervision=deep_supervision)
    logits = build_unet3d(1, 3, depth=3, base_filters=4, deep_supervision=deep_supervision, output="logits")
    logits.set_weights(soft.get_weights())
    return soft, logits


@pytest.mark.parametrize("deep_supervision", [False, True])
def test_logits_head_gives_the_softmax_models_probabilities_through_probability_model(deep_supervision):
    soft, logits = _pair(deep_supervision)
    x = np.random.default_rng(0).normal(size=(1, 16, 16, 8, 1)).astype("float32")
    raw = logits.predict_on_batch(x)
    raw = raw[0] if deep_supervision else raw
    assert not np.allclose(raw.sum(-1), 1.0, atol=1e-3)  # logits, not probabilities
    expected = soft.predict_on_batch(x)
    expected = expected[0] if deep_supervision else expected
    assert (outputs_logits(soft), outputs_logits(logits)) == (False, True)
    for convert in (probability_model, inference_model):
        for model in (soft, logits):
            net = convert(model)
            assert len(net.outputs) == 1 and net.outputs[0].dtype == "float32"
            np.testing.assert_allclose(net.predict_on_batch(x), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(raw, np.log(expected) - np.log(expected).mean(-1, keepdims=True)
                               + raw.mean(-1, keepdims=True), atol=1e-4)


def test_probability_model_round_trips_through_a_saved_file(tmp_path):
    _, logits = _pair(True)
    net = probability_model(logits)
    net.save(tmp_path / "net.keras")
    again = keras.saving.load_model(tmp_path / "net.keras", compile=False)
    x = np.random.default_rng(1).normal(size=(1, 8, 8, 8, 1)).astype("float32")
    np.testing.assert_allclose(again.predict_on_batch(x), net.predict_on_batch(x), rtol=1e-6)
    np.testing.assert_allclose(again.predict_on_batch(x).sum(-1), 1.0, atol=1e-5)


def test_deep_supervision_is_a_plain_keras_model():
    model = build_unet3d(1, 3, depth=3, base_filters=4, deep_supervision=True)
    assert type(model).compute_loss is keras.Model.compute_loss  # no override
    assert type(model).train_step is type(keras.Model(model.inputs, model.outputs)).train_step
    assert [o.name for o in model.outputs] != [] and len(model.outputs) == 2


def test_unknown_output_is_refused():
    with pytest.raises(ValueError, match=r"Received: output='tanh'"):
        build_unet3d(1, 3, output="tanh")


def test_sigmoid_head_for_regions():
    """One sigmoid per region (a single region allowed); the probability model keeps it as it is."""
    from segpipe.models.unet3d import outputs_sigmoid

    model = build_unet3d(2, 1, depth=2, base_filters=4, output="sigmoid")
    x = np.random.default_rng(0).normal(size=(1, 8, 8, 8, 2)).astype("float32")
    p = np.asarray(model(x))
    assert p.shape == (1, 8, 8, 8, 1) and outputs_sigmoid(model) and not outputs_logits(model)
    assert np.all((p > 0) & (p < 1))
    assert probability_model(model).outputs[0] is model.outputs[0]


@pytest.mark.parametrize("output, dtype", [("softmax", "mixed_bfloat16"), ("logits", "float32"),
                                           ("sigmoid", "float32")])
def test_output_channels_counts_what_the_inference_model_outputs_without_a_copy(output, dtype):
    """What export reads to count a run's classes or regions: the channels inference_model gives."""
    from segpipe.models.unet3d import output_channels

    model = build_unet3d(1, 2, depth=2, base_filters=4, deep_supervision=True, output=output, dtype=dtype)
    assert output_channels(model) == int(inference_model(model).outputs[0].shape[-1]) == 2
    with pytest.raises(ValueError, match="a functional Keras model"):
        output_channels(keras.Sequential())
