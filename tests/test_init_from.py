"""Starting from a trained network: weights copied by path and shape, the first convolution adapted to other
channels, new output heads for other classes, and the sources a run can start from."""
from __future__ import annotations

import json

import numpy as np
import pytest
from inference_helpers import PATCH, PREPROCESSING, make_run_dir, tiny_architecture, tiny_model

from segpipe.export.bundle import write_bundle
from segpipe.models.architecture import build_network
from segpipe.models.transfer import adapt_input_channels, transfer_weights, variable_arrays
from segpipe.training.init_from import initialise_from, source_weights


def _spec(in_channels, num_classes, depth=3, base_filters=4):
    return {"builder": "unet3d", "in_channels": in_channels, "num_classes": num_classes,
            "args": {"depth": depth, "base_filters": base_filters}}


def test_transfer_into_other_classes_and_channels_by_hand():
    import keras

    keras.utils.set_random_seed(1)
    source = build_network(_spec(1, 3))
    arrays = variable_arrays(source)
    keras.utils.set_random_seed(2)
    target = build_network(_spec(2, 4))
    untouched = variable_arrays(target)
    report = transfer_weights(target, arrays)
    after = variable_arrays(target)

    # by hand: every variable of the target, and what must have happened to it
    heads = {"out0_logits/kernel", "out0_logits/bias"}  # 4 classes instead of 3: re-initialised
    assert set(report["new"]) == heads and report["adapted"] == ["enc0_conv0/kernel"]
    assert set(report["loaded"]) == set(after) - heads - {"enc0_conv0/kernel"}
    for path in report["loaded"]:
        np.testing.assert_array_equal(after[path], arrays[path])
    for path in heads:
        np.testing.assert_array_equal(after[path], untouched[path])
    assert report["new_reasons"]["out0_logits/kernel"] == "shape (1, 1, 1, 4, 4) vs the source's (1, 1, 1, 4, 3)"
    # the first convolution: both input channels get the source's single filter, halved (equal channels
    # give the same pre-activation as the source's one channel)
    kernel = after["enc0_conv0/kernel"]
    assert kernel.shape == (3, 3, 3, 2, 4)
    np.testing.assert_allclose(kernel[..., 0, :], arrays["enc0_conv0/kernel"][..., 0, :] / 2, rtol=1e-6)
    np.testing.assert_allclose(kernel[..., 1, :], kernel[..., 0, :])
    x = np.random.default_rng(0).normal(size=(1, 8, 8, 8, 1)).astype(np.float32)
    first = lambda net, inputs: keras.Model(net.inputs, net.get_layer("enc0_conv0").output)(inputs)  # noqa: E731
    np.testing.assert_allclose(first(target, np.concatenate([x, x], -1)), first(source, x), atol=1e-5)


def test_adapting_from_more_channels_keeps_the_sum():
    kernel = np.random.default_rng(0).normal(size=(3, 3, 3, 4, 8))
    one = adapt_input_channels(kernel, 1)
    np.testing.assert_allclose(one[..., 0, :], kernel.sum(axis=-2))


def test_nothing_matching_is_refused():
    import keras

    other = keras.Sequential([keras.Input((None, None, None, 1)), keras.layers.Conv3D(2, 1, name="elsewhere")])
    with pytest.raises(ValueError, match=r"Expected a source network sharing layers \(path and shape\) with the one to "
                                         r"train\. Received: init_from=no match among 2 source variables"):
        transfer_weights(build_network(_spec(1, 3)), variable_arrays(other))


def test_sources_a_bundle_a_run_and_a_keras_file(tmp_path, phantom_root):
    model = tiny_model(depth=3, deep_supervision=True, seed=5)
    x = np.random.default_rng(2).normal(size=(1, 16, 16, 16, 1)).astype(np.float32)
    bundle = write_bundle(model, tmp_path / "bundle", class_names=["bg", "a", "b"], preprocessing=PREPROCESSING,
                          patch_size=PATCH, architecture=tiny_architecture(depth=3, deep_supervision=True),
                          verify=False, openvino=False, segment=False)
    run_dir = make_run_dir(tmp_path, model, phantom_root, depth=3)
    sources = {"bundle": bundle, "run": run_dir, "keras": run_dir / "model.keras"}
    for kind, path in sources.items():
        arrays, described = source_weights(path)
        assert described["kind"] == kind
        target = build_network(tiny_architecture(depth=3, deep_supervision=True))
        record = initialise_from(target, path)
        assert record["source"]["kind"] == kind and record["adapted"] == []
        if kind == "bundle":  # the bundle holds the inference network: the lower deep-supervision head is new
            assert record["new"] == ["out1_logits/bias", "out1_logits/kernel"]
        else:
            assert record["new"] == []
        np.testing.assert_allclose(target.predict_on_batch(x)[0], model.predict_on_batch(x)[0], atol=1e-6)
        json.dumps(record)  # what run_info.json keeps
    with pytest.raises(ValueError, match=r"Expected a segpipe bundle folder, a run directory or a \.keras file\. "
                                         r"Received: train\.init_from=.*nowhere \(no such file or folder\)"):
        source_weights(tmp_path / "nowhere")


def test_a_fine_tuned_run_records_its_source_and_resumes_identically(tiny_run, tiny_overrides, tmp_path, monkeypatch,
                                                                     capsys):
    """A run started from the tiny run's bundle: run_info.json names what was loaded, and a run stopped in its
    second epoch and resumed (from its own checkpoint, not the source again) ends with the same history."""
    import os
    import signal

    from process_helpers import assert_same_history, read_history

    import train
    from segpipe.training.checkpoints import RunCheckpoint

    source, _ = tiny_run
    # a warm-up and an encoder frozen for the first epoch: the resume (in the second epoch) releases it again
    args = ["--set", *tiny_overrides, f"train.init_from={source / 'bundle'}", "name=ft", "train.warmup_epochs=1",
            "train.freeze_encoder_epochs=1"]
    assert train.main([*args, f"output_dir={tmp_path / 'a'}"]) == 0
    assert "Started from" in capsys.readouterr().out
    record = json.loads((tmp_path / "a" / "ft" / "run_info.json").read_text())["init_from"]
    assert record["source"]["kind"] == "bundle" and record["adapted"] == []
    assert len(record["loaded"]) > 10 and all(path.startswith("out") for path in record["new"])

    def interrupt_in_second_epoch(self, batch, logs=None):
        if len(self.rows) == 1 and batch == 1:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(RunCheckpoint, "on_train_batch_end", interrupt_in_second_epoch, raising=False)
    assert train.main([*args, f"output_dir={tmp_path / 'b'}"]) == 128 + signal.SIGINT
    monkeypatch.undo()
    assert train.main(["--resume", str(tmp_path / "b" / "ft")]) == 0
    assert_same_history(read_history(tmp_path / "a" / "ft"), read_history(tmp_path / "b" / "ft"))
    info = json.loads((tmp_path / "b" / "ft" / "run_info.json").read_text())
    assert info["init_from"] == record and len(info["resumes"]) == 1


def test_warm_up_ramps_the_wrapped_schedule_and_survives_a_checkpoint():
    import keras

    from segpipe.training.budget import AnytimeDecay, anytime_schedule
    from segpipe.training.fine_tune import LinearWarmup

    decay = AnytimeDecay(0.01, 100)
    ramp = LinearWarmup(decay, 10)
    for step in (0, 4, 9, 10, 50):  # by hand: lr0 · (1 − s/100)^0.9 · min(1, (s + 1)/10)
        expected_lr = 0.01 * (1 - step / 100) ** 0.9 * min(1.0, (step + 1) / 10)
        assert float(ramp(step)) == pytest.approx(expected_lr, rel=1e-5)
    optimizer = keras.optimizers.Adam(ramp)
    assert anytime_schedule(optimizer) is decay  # the time limit still re-fits the decay inside the ramp
    again = keras.optimizers.schedules.deserialize(keras.optimizers.schedules.serialize(ramp))  # a checkpoint's
    assert isinstance(again, LinearWarmup) and isinstance(again.schedule, AnytimeDecay)
    assert [float(again(s)) for s in (0, 5, 30)] == pytest.approx([float(ramp(s)) for s in (0, 5, 30)])
    with pytest.raises(ValueError, match=r"Received: warmup_steps=0"):
        LinearWarmup(0.1, 0)


@pytest.mark.parametrize("precision,mirrored", [("float32", False), ("mixed_float16", False),
                                               ("mixed_bfloat16", False), ("float32", True)])
def test_a_frozen_encoder_does_not_train_and_trains_again_when_unfrozen(precision, mirrored):
    """In every precision (mixed_float16: through the loss-scale optimizer) and under a distribution strategy."""
    import keras
    import tensorflow as tf

    from segpipe.models.precision import model_dtype, wrap_optimizer
    from segpipe.training.distributed import WorkerInfo
    from segpipe.training.fine_tune import encoder_layers
    from segpipe.training.loop import TrainingLoop

    keras.utils.set_random_seed(0)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"]) if mirrored else tf.distribute.get_strategy()
    with strategy.scope():
        model = build_network(_spec(1, 2, depth=2), dtype=model_dtype(precision))
        model.compile(optimizer=wrap_optimizer(keras.optimizers.Adam(0.01), precision), loss="categorical_crossentropy")
    loop = TrainingLoop(model, strategy, WorkerInfo(None, 0, 1, True), ["bg", "fg"], verbose=0,
                        freeze_encoder_epochs=1)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 8, 8, 8, 1)).astype(np.float32)
    y = np.eye(2, dtype=np.float32)[rng.integers(0, 2, size=(2, 8, 8, 8))]
    assert all(layer.name.startswith("enc") for layer in encoder_layers(model))
    encoder = {p for p in variable_arrays(model) if p.startswith("enc")}

    def step_changes(frozen):
        loop._freeze_encoder(frozen)
        before = variable_arrays(model)
        loop._train_step((x, y))
        after = variable_arrays(model)
        return {p for p in before if not np.array_equal(before[p], after[p])}

    changed = step_changes(True)
    assert changed and not changed & encoder  # the decoder and head train, the encoder does not
    changed = step_changes(False)
    assert encoder <= changed  # every encoder weight trains again (the optimizer had slots for them)


def test_freezing_needs_a_source():
    from segpipe.config import Config, ConfigError

    with pytest.raises(ConfigError,
                       match=r"Expected 0 without train\.init_from .* Received: train\.freeze_encoder_epochs=2"):
        Config.from_dict({"train": {"freeze_encoder_epochs": 2}})


@pytest.mark.parametrize("precision", ["mixed_bfloat16", "mixed_float16"])
def test_float32_weights_load_into_a_mixed_precision_network(precision):
    """A mixed policy keeps float32 variables: every source weight loads unchanged, and the network computes in
    the policy's dtype with float32 probabilities."""
    import keras

    from segpipe.models.precision import model_dtype

    keras.utils.set_random_seed(1)
    arrays = variable_arrays(build_network(_spec(1, 3)))
    target = build_network(_spec(1, 3), dtype=model_dtype(precision))
    report = transfer_weights(target, arrays)
    assert report["new"] == [] and report["adapted"] == [] and len(report["loaded"]) == len(arrays)
    after = variable_arrays(target)
    for path in arrays:
        np.testing.assert_array_equal(after[path], arrays[path])
    out = target(np.zeros((1, 8, 8, 8, 1), np.float32))
    assert keras.backend.standardize_dtype(out.dtype) == "float32"
