"""Tests for segpipe.metrics.streaming.PerClassDice."""
import csv

import keras  # noqa: E402  (after segpipe, which sets the backend)
import numpy as np
import pytest

from segpipe.losses import get_loss
from segpipe.metrics.streaming import PerClassDice

NAMES = ["background", "liver", "tumour core", "vessel"]


def np_dice(batches, num_classes):
    """Hand computation: global hard Dice per class over all batches, 1.0 if TP+FP+FN = 0."""
    tp = np.zeros(num_classes)
    fp = np.zeros(num_classes)
    fn = np.zeros(num_classes)
    for y_true, y_pred in batches:
        t, p = y_true.argmax(-1).ravel(), y_pred.argmax(-1).ravel()
        for c in range(num_classes):
            tp[c] += np.sum((t == c) & (p == c))
            fp[c] += np.sum((t != c) & (p == c))
            fn[c] += np.sum((t == c) & (p != c))
    den = 2 * tp + fp + fn
    return np.where(den > 0, 2 * tp / np.maximum(den, 1), 1.0)


def make_batches(seed=0, n=3):
    """Class 3 ('vessel') never appears in reference or prediction; class 2 is predicted only in
    the last batch and never in the reference."""
    rng = np.random.default_rng(seed)
    batches = []
    for i in range(n):
        labels = rng.integers(0, 2, (2, 6, 5, 4))
        y_true = np.eye(4, dtype=np.float32)[labels]
        scores = rng.normal(size=y_true.shape).astype(np.float32) + 1.5 * y_true
        scores[..., 3] = -10.0
        scores[..., 2] = -10.0 if i < n - 1 else scores[..., 2]
        batches.append((y_true, keras.ops.convert_to_numpy(keras.ops.softmax(scores))))
    return batches


def test_matches_numpy_over_several_batches():
    batches = make_batches()
    metric = PerClassDice(NAMES)
    for y_true, y_pred in batches:
        metric.update_state(y_true, y_pred)
    result = {k: float(v) for k, v in metric.result().items()}
    expected = np_dice(batches, 4)
    assert expected[3] == 1.0 and expected[2] == 0.0  # the empty-class policies are exercised
    assert set(result) == {"dice_liver", "dice_tumour_core", "dice_vessel", "dice_fg_mean"}
    np.testing.assert_allclose(
        [result["dice_liver"], result["dice_tumour_core"], result["dice_vessel"]],
        expected[1:], rtol=1e-6)
    np.testing.assert_allclose(result["dice_fg_mean"], expected[1:].mean(), rtol=1e-6)


def test_background_list_inputs_and_reset():
    batches = make_batches(seed=1)
    metric = PerClassDice(NAMES, include_background=True, name="val")
    for y_true, y_pred in batches:
        low_res = y_pred[:, ::2, ::2, ::2]
        metric.update_state([y_true, y_true[:, ::2, ::2, ::2]], (y_pred, low_res))
    result = metric.result()
    expected = np_dice(batches, 4)
    np.testing.assert_allclose(float(result["val_background"]), expected[0], rtol=1e-6)
    np.testing.assert_allclose(float(result["val_fg_mean"]), expected[1:].mean(), rtol=1e-6)
    metric.reset_state()
    assert all(float(v) == 1.0 for v in metric.result().values())  # nothing seen: all empty


def test_config_round_trip_and_errors():
    metric = PerClassDice(NAMES, include_background=True, name="dsc")
    again = PerClassDice.from_config(metric.get_config())
    assert again.get_config() == metric.get_config()
    with pytest.raises(ValueError, match=r"y_pred.shape=\(1, 2, 2, 3\)"):
        metric.update_state(np.zeros((1, 2, 2, 3)), np.zeros((1, 2, 2, 3)))
    with pytest.raises(ValueError, match="class_names"):
        PerClassDice(["background"])
    with pytest.raises(ValueError, match="distinct"):
        PerClassDice(["background", "a b", "a_b"])


def test_fit_logs_per_class_and_foreground_mean(tmp_path):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 8, 8, 8, 1)).astype(np.float32)
    y = np.eye(3, dtype=np.float32)[np.digitize(x[..., 0], [-0.4, 0.6])]
    inputs = keras.Input((8, 8, 8, 1))
    h = keras.layers.Conv3D(4, 3, padding="same", activation="relu")(inputs)
    model = keras.Model(inputs, keras.layers.Conv3D(3, 1, activation="softmax")(h))
    model.compile(optimizer=keras.optimizers.Adam(0.02), loss=get_loss("dice"),
                  metrics=[PerClassDice(["background", "liver", "tumour core"])],
                  jit_compile=False)
    log_file = tmp_path / "history.csv"
    history = model.fit(x, y, validation_data=(x, y), epochs=2, batch_size=2, verbose=0,
                        callbacks=[keras.callbacks.CSVLogger(str(log_file))])
    for key in ("dice_liver", "dice_tumour_core", "dice_fg_mean",
                "val_dice_liver", "val_dice_tumour_core", "val_dice_fg_mean"):
        assert key in history.history and len(history.history[key]) == 2, history.history.keys()
    with open(log_file) as f:
        header = next(csv.reader(f))
    assert {"val_dice_fg_mean", "val_dice_liver", "val_dice_tumour_core"} <= set(header)
    # The last validation values equal a hand computation on the final weights.
    expected = np_dice([(y, model.predict(x, verbose=0))], 3)
    np.testing.assert_allclose(history.history["val_dice_liver"][-1], expected[1], rtol=1e-5)
    np.testing.assert_allclose(history.history["val_dice_fg_mean"][-1], expected[1:].mean(),
                               rtol=1e-5)


def test_ignored_voxels_count_nowhere_hand_computed():
    """1-D case, 3 classes; voxel 3 is unannotated (all-zero row) and predicted as class 1.
    reference: [1, 1, 0, -, 2]; prediction: [1, 0, 0, 1, 2] -> class 1: TP 1, FP 0, FN 1 -> 2/3;
    class 2: TP 1 -> 1. Counting voxel 3 (as background) would make class 1's FP 1 (Dice 1/2)."""
    y_true = np.zeros((1, 5, 3), "float32")
    for v, c in enumerate([1, 1, 0, None, 2]):
        if c is not None:
            y_true[0, v, c] = 1
    y_pred = np.eye(3, dtype="float32")[[1, 0, 0, 1, 2]][None]
    for target in (y_true, np.concatenate([y_true, (y_true.sum(-1, keepdims=True) == 0)], -1)):
        metric = PerClassDice(["bg", "a", "b"])
        metric.update_state(target, y_pred)
        result = {k: float(v) for k, v in metric.result().items()}
        assert result["dice_a"] == pytest.approx(2 / 3)
        assert result["dice_b"] == pytest.approx(1.0)
        assert result["dice_fg_mean"] == pytest.approx(5 / 6)


def test_region_dice_hand_computed():
    """Two nested regions over 4 voxels; voxel 3 ignored (mask channel).
    whole: ref [1,1,0,-], pred [1,1,1,1] -> TP 2, FP 1 -> 4/5; core: ref [0,1,0,-], pred [0,0,0,1] -> 0."""
    y_true = np.array([[[1, 0, 0], [1, 1, 0], [0, 0, 0], [0, 0, 1]]], "float32")
    y_pred = np.array([[[0.9, 0.2], [0.8, 0.4], [0.6, 0.1], [0.7, 0.9]]], "float32")
    metric = PerClassDice(["whole", "core"], regions=True)
    metric.update_state(y_true, y_pred)
    result = {k: float(v) for k, v in metric.result().items()}
    assert result == pytest.approx({"dice_whole": 0.8, "dice_core": 0.0, "dice_fg_mean": 0.4})
