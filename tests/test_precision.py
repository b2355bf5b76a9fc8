"""train.precision: float32 and Keras's mixed policies train a tiny U-Net with float32 losses, outputs,
variables and normalisation statistics; a mixed step's loss matches float32's; a bf16 run resumes
with an identical history; mixed precision under MirroredStrategy."""
from __future__ import annotations

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from process_helpers import assert_same_history, read_history, running, start

import train
from segpipe.config import ConfigError, load_config
from segpipe.models.precision import PRECISIONS, model_dtype, resolve_precision
from segpipe.training.checkpoints import RunCheckpoint
from segpipe.training.train import build_model, compile_model

CLASSES = ["background", "a", "b"]
# The loss of one training-mode forward pass at the same weights, mixed against float32 (Dice + CE, a 16³
# batch of 2, batch norm): measured 2.0e-5 (bf16) and 1.8e-5 (fp16) relative here. bfloat16 keeps 8
# significant bits (rounding 2^-9 ≈ 0.2 % per operation, mostly averaging out over the voxels), float16
# 11 bits; the tolerances allow ~50× the measured error:
LOSS_RTOL = {"mixed_bfloat16": 2e-3, "mixed_float16": 1e-3}


def _config(precision: str, *extra: str):
    return load_config(None, [f"train.precision={precision}", "model.depth=3", "model.base_filters=4",
                              "model.norm=batch", "train.epochs=1", "train.steps_per_epoch=5",
                              'loss={"terms": [{"name": "dice", "include_background": false}, {"name": "ce"}]}',
                              *extra])


def _batch(seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2, 16, 16, 16, 1)).astype("float32")
    labels = (x[..., 0] > 0.5).astype(int) + (x[..., 0] > 1.2).astype(int)
    return x, np.eye(3, dtype="float32")[labels]


def _model(precision: str, *extra: str):
    config = _config(precision, *extra)
    keras.utils.set_random_seed(0)
    model = build_model(config, 1, 3)
    compile_model(model, config, CLASSES)
    model.optimizer.build(model.trainable_variables)  # as the training loop does
    return model


def _step(model, x, y):
    """One training step as the loop runs it (scaled loss, unscaled gradients); the loss and the gradients."""
    with tf.GradientTape() as tape:
        y_pred = model(x, training=True)
        loss = model.compute_loss(x=x, y=y, y_pred=y_pred, training=True)
        scaled = model.optimizer.scale_loss(loss)
    gradients = tape.gradient(scaled, model.trainable_variables)
    scale = (float(model.optimizer.dynamic_scale) if isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
             else 1.0)
    model.optimizer.apply_gradients(zip(gradients, model.trainable_variables))
    return float(loss), [np.asarray(g, dtype=np.float64) / scale for g in gradients], y_pred


def test_the_setting_is_checked_and_auto_without_a_plan_is_float32():
    assert resolve_precision("auto") == "float32" and model_dtype("float32") is None
    with pytest.raises(ConfigError, match=r"train.precision"):
        load_config(None, ["train.precision=bfloat16"])
    with pytest.raises(ValueError, match=r"Received: train.precision='half'"):
        resolve_precision("half")


@pytest.mark.parametrize("precision", PRECISIONS)
def test_each_precision_trains_with_finite_loss_and_gradients_in_float32_where_it_matters(precision):
    model = _model(precision, "model.deep_supervision=true")
    compute = {"float32": "float32", "mixed_bfloat16": "bfloat16", "mixed_float16": "float16"}[precision]
    assert model.get_layer("enc0_conv0").compute_dtype == compute
    assert all(v.dtype == "float32" for v in model.weights)  # variables, BN moving statistics included
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer) == (precision == "mixed_float16")
    x, y = _batch()
    targets = [keras.ops.convert_to_tensor(t) for t in _targets(y, len(model.outputs))]
    losses = []
    for _ in range(3):
        loss, gradients, y_pred = _step(model, x, targets)
        losses.append(loss)
        assert np.isfinite(loss) and all(np.isfinite(g).all() for g in gradients)
        assert any(np.abs(g).max() > 0 for g in gradients)
    assert all(keras.backend.standardize_dtype(p.dtype) == "float32" for p in y_pred)  # every deep-supervision head
    assert losses[-1] < losses[0]  # it learns


def _targets(y, n):
    from segpipe.losses import deep_supervision_targets

    return deep_supervision_targets(y, n) if n > 1 else y


@pytest.mark.parametrize("precision", ["mixed_bfloat16", "mixed_float16"])
def test_a_mixed_step_gives_the_float32_loss_within_tolerance(precision):
    x, y = _batch(1)
    reference = _model("float32")
    mixed = _model(precision)
    mixed.set_weights(reference.get_weights())
    loss_32, grads_32, _ = _step(reference, x, y)
    loss_mixed, grads_mixed, _ = _step(mixed, x, y)
    assert loss_mixed == pytest.approx(loss_32, rel=LOSS_RTOL[precision])
    # the gradients point the same way (cosine similarity over all weights)
    a, b = np.concatenate([g.ravel() for g in grads_32]), np.concatenate([g.ravel() for g in grads_mixed])
    assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) > 0.99


def test_a_bfloat16_run_resumes_with_an_identical_history(crash_overrides, tmp_path, monkeypatch):
    overrides = [*crash_overrides, "train.precision=mixed_bfloat16", "train.epochs=3", "train.steps_per_epoch=3"]
    assert train.main(["--set", *overrides, f"output_dir={tmp_path}", "name=straight"]) == 0
    straight = read_history(tmp_path / "straight")

    original = RunCheckpoint.on_epoch_end

    def crash_after_first_epoch(self, epoch, logs=None):
        original(self, epoch, logs)
        if epoch == 0:
            raise KeyboardInterrupt("simulated crash after the first checkpoint")

    monkeypatch.setattr(RunCheckpoint, "on_epoch_end", crash_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        train.main(["--set", *overrides, f"output_dir={tmp_path}", "name=resumed"])
    monkeypatch.undo()
    assert train.main(["--resume", str(tmp_path / "resumed")]) == 0
    assert_same_history(straight, read_history(tmp_path / "resumed"))
    assert len(straight) == 3
    info = (tmp_path / "resumed" / "run_info.json").read_text()
    assert '"precision": "mixed_bfloat16"' in info


MIRRORED = """
import sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import segpipe.training.distributed as distributed
distributed.make_strategy = lambda name, *timeout: tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
import train
sys.exit(train.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("precision", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_trains_under_two_mirrored_replicas(precision, crash_overrides, tmp_path):
    driver = tmp_path / "mirrored.py"
    driver.write_text(MIRRORED)
    log = tmp_path / "mirrored.log"
    with running(start([str(driver), "--set", *crash_overrides, f"train.precision={precision}", "train.epochs=1",
                        "train.steps_per_epoch=3", "train.distribute=mirrored", f"output_dir={tmp_path}", "name=two"],
                       log)) as (proc,):
        assert proc.wait(timeout=240) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert "2 replica(s) on 1 worker(s)" in text and f"Precision: {precision}" in text
    rows = read_history(tmp_path / "two")
    assert len(rows) == 1 and np.isfinite(float(rows[0]["loss"])) and np.isfinite(float(rows[0]["val_loss"]))


def test_a_bfloat16_model_exports_float32_probabilities_equal_to_keras(tmp_path):
    """The export path of a mixed-precision network: ``write_bundle`` given the bf16 network itself writes its
    float32 copy (``float32_model``, through ``inference_model``); each format's probabilities are float32 and
    equal to the Keras float32 copy's, and the bf16 network's own probabilities are within bf16's rounding."""
    from segpipe.data.preprocess import PreprocessSettings
    from segpipe.export.bundle import inference_model, write_bundle
    from segpipe.inference.bundle import read_bundle
    from segpipe.inference.runtimes import load_predictor
    from segpipe.models.architecture import architecture_from_model_config
    from segpipe.models.precision import float32_model

    config = _config("mixed_bfloat16", "model.depth=2")
    mixed = _model("mixed_bfloat16", "model.depth=2")
    x, y = _batch(2)
    for _ in range(2):
        _step(mixed, x, y)
    plain = float32_model(mixed)
    assert all(layer.dtype_policy.name == "float32" for layer in plain.layers)
    assert all(np.array_equal(a, b) for a, b in zip(mixed.get_weights(), plain.get_weights()))
    assert all(layer.dtype_policy.name == "float32" for layer in inference_model(mixed).layers)
    expected = np.asarray(plain.predict_on_batch(x[:1]))
    assert np.abs(np.asarray(mixed.predict_on_batch(x[:1])) - expected).max() < 0.05  # bf16 against float32

    settings = PreprocessSettings(target_spacing_mm=(1.0, 1.0, 1.0), normalization=("zscore",), crop_to_nonzero=False)
    architecture = architecture_from_model_config(config.model, in_channels=1, num_classes=3)
    bundle = write_bundle(mixed, tmp_path / "bundle", class_names=CLASSES, preprocessing=settings,
                          patch_size=[16, 16, 16], architecture=architecture, onnx=True, segment=False)
    files = read_bundle(bundle).files
    assert {"keras", "savedmodel", "onnx"} <= set(files)
    for fmt in files:
        probabilities = np.asarray(load_predictor(bundle, fmt, trust_bundle=True)(x[:1]))
        assert probabilities.dtype == np.float32, fmt
        assert np.abs(probabilities - expected).max() < 1e-4, fmt


def test_two_workers_train_in_float16_with_loss_scaling_and_the_anytime_schedule(crash_overrides, tmp_path):
    """multi_worker with mixed_float16 (LossScaleOptimizer's state mirrored over workers) and a time limit,
    whose anytime schedule the workers agree on every epoch (a collective mean of their clocks)."""
    from process_helpers import TRAIN, free_port, tf_config

    ports = [free_port(), free_port()]
    args = [str(TRAIN), "--set", *crash_overrides, "train.precision=mixed_float16", "train.epochs=2",
            "train.steps_per_epoch=2", "train.max_train_minutes=60", "train.distribute=multi_worker",
            f"output_dir={tmp_path / 'runs'}", "name=mw"]
    procs = []
    for i in range(2):
        (tmp_path / f"tmp{i}").mkdir()
        procs.append(start(args, tmp_path / f"w{i}.log", TF_CONFIG=tf_config(ports, i),
                           TMPDIR=str(tmp_path / f"tmp{i}")))
    with running(*procs):
        codes = [proc.wait(timeout=300) for proc in procs]
    logs = [(tmp_path / f"w{i}.log").read_text() for i in range(2)]
    assert codes == [0, 0], "\n\n".join(log[-3000:] for log in logs)
    assert "2 replica(s) on 2 worker(s)" in logs[0] and "Precision: mixed_float16" in logs[0]
    rows = read_history(tmp_path / "runs" / "mw")
    assert len(rows) == 2 and all(np.isfinite(float(row[key])) for row in rows for key in ("loss", "val_loss"))
    state = json.loads((tmp_path / "runs" / "mw" / "checkpoints" / "last" / "state.json").read_text())
    assert state["time_limit"]["final_epoch"] == 2 and state["time_limit"]["schedule"]["rate"] == pytest.approx(1 / 4)


def test_a_bfloat16_run_ends_with_a_float32_bundle(crash_overrides, tmp_path):
    from segpipe.inference.bundle import read_bundle
    from segpipe.inference.runtimes import load_predictor

    overrides = [*crash_overrides, "train.precision=mixed_bfloat16", "train.epochs=1", "train.steps_per_epoch=2",
                 "train.export_bundle=true", f"output_dir={tmp_path}", "name=bf16"]
    assert train.main(["--set", *overrides]) == 0
    run = tmp_path / "bf16"
    bundle = read_bundle(run / "bundle")
    assert bundle.meta["source"]["model_file"].endswith("best.keras")  # the checkpoint as trained, converted on export
    assert not list((run / "checkpoints").glob("*.float32.keras"))  # no float32 copy beside it any more
    x = np.zeros((1, 16, 16, 16, 1), np.float32)
    for fmt in bundle.files:
        assert np.asarray(load_predictor(bundle, fmt, trust_bundle=True)(x)).dtype == np.float32, fmt
