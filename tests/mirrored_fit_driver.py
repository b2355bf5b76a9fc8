"""Train the U-Net for one step with ``model.fit`` in one process and under MirroredStrategy on
two logical CPUs, from the same initial weights and batch; print one JSON line per loss case.

Run as a subprocess (logical devices must be configured before TensorFlow starts):
``python tests/mirrored_fit_driver.py CASE [CASE ...]`` with cases from ``CASES``.
"""
from __future__ import annotations

import json
import sys

import keras  # noqa: E402
import numpy as np  # noqa: E402  (before CASES' weights)
import tensorflow as tf

import segpipe  # noqa: F401  (TensorFlow's environment first)
from segpipe.losses import deep_supervision_losses, deep_supervision_targets, get_loss  # noqa: E402
from segpipe.models.unet3d import build_unet3d  # noqa: E402

CASES = {
    "dice": {"name": "dice", "include_background": False},
    "dice_ce": {"terms": [{"name": "dice", "include_background": False}, {"name": "ce"}]},
    "tversky": {"name": "tversky", "alpha": 0.3, "beta": 0.7, "include_background": False},
    "ce": {"name": "ce"},
    "batch_dice": {"name": "dice", "batch": True, "include_background": False},
    "generalized_dice_batch": {"name": "generalized_dice", "batch": True},
    "deep_supervision": {"terms": [{"name": "dice", "include_background": False}, {"name": "ce"}]},
    # sample weights whose sums differ between the two replicas' halves of the batch (1.5 vs 2)
    "batch_dice_weighted": {"name": "dice", "batch": True, "include_background": False},
    "dice_ce_weighted": {"terms": [{"name": "dice", "include_background": False}, {"name": "ce"}]},
}
SAMPLE_WEIGHTS = np.array([1.0, 0.5, 2.0, 0.0], np.float32)
BATCH, NUM_CLASSES, EPOCHS = 4, 3, 1  # one step of fit
# the smallest U-Net of each kind (tracing under the strategy is most of the time): two stages,
# three for deep supervision (two outputs)
DEPTH, DS_DEPTH = 2, 3


class ScalarCallDice(keras.losses.Loss):
    """The old contract, as a control: ``call`` returns the batch mean, so Keras skips its
    reduction and its replica scaling."""

    def call(self, y_true, y_pred):
        return keras.ops.mean(get_loss(CASES["dice"]).call(y_true, y_pred))


def batch():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH, 16, 16, 16, 1)).astype(np.float32)
    labels = np.digitize(x[..., 0], [-0.4, 0.6])
    labels[1] = 0  # an all-background sample
    return x, np.eye(NUM_CLASSES, dtype=np.float32)[labels]


def build(case: str, initial: list | None):
    """The compiled U-Net (plain functional model; all outputs for deep supervision)."""
    ds = case == "deep_supervision"
    keras.utils.set_random_seed(0)
    net = build_unet3d(1, NUM_CLASSES, depth=DS_DEPTH if ds else DEPTH, base_filters=4, norm="instance",
                       deep_supervision=ds)
    model = keras.Model(net.inputs, net.outputs)  # a plain keras.Model, no compute_loss override
    if initial is not None:
        model.set_weights(initial)
    if case == "keras_cce":  # Keras's own loss, to tell Keras's behaviour from segpipe's
        loss = keras.losses.CategoricalCrossentropy()
    else:
        loss = ScalarCallDice() if case == "scalar_call_dice" else get_loss(CASES[case])
    if ds:
        losses, weights = deep_supervision_losses(loss, DS_DEPTH - 1)
        model.compile(optimizer=keras.optimizers.SGD(0.5, momentum=0.9), loss=losses, loss_weights=weights)
    else:
        model.compile(optimizer=keras.optimizers.SGD(0.5, momentum=0.9), loss=loss)
    return model


def run(case: str, strategy: tf.distribute.Strategy) -> dict:
    x, y = batch()
    if case == "deep_supervision":
        y = tuple(np.asarray(t) for t in deep_supervision_targets(y, DS_DEPTH - 1))
    single = build(case, None)
    initial = single.get_weights()
    sw = SAMPLE_WEIGHTS if case.endswith("_weighted") else None
    history = single.fit(x, y, sample_weight=sw, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0).history
    with strategy.scope():
        mirrored = build(case, initial)
    mirrored_history = mirrored.fit(x, y, sample_weight=sw, batch_size=BATCH, epochs=EPOCHS, shuffle=False,
                                    verbose=0).history
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(single.get_weights(), initial))
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(single.get_weights(), mirrored.get_weights()))
    return {"case": case, "replicas": strategy.num_replicas_in_sync, "max_weight_diff": diff,
            "max_weight_change": moved, "loss_one_process": history["loss"],
            "loss_mirrored": mirrored_history["loss"]}


if __name__ == "__main__":
    cpu = tf.config.list_physical_devices("CPU")[0]  # before TensorFlow runs anything
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    mirrored_strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])  # one per process
    for name in sys.argv[1:]:
        print("RESULT " + json.dumps(run(name, mirrored_strategy)), flush=True)
