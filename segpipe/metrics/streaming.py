"""Streaming Keras metrics for training and validation logs.

:class:`PerClassDice` accumulates hard TP/FP/FN counts per class over an epoch (``argmax`` of the
prediction against ``argmax`` of the one-hot reference) and reports the Dice of each class plus the
foreground mean. Its ``result()`` is a dict, which Keras 3 flattens into the logs, so with
validation data ``model.fit`` logs ``val_dice_<class>`` and ``val_dice_fg_mean`` (History,
``CSVLogger``, TensorBoard).
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import keras
from keras import ops

from segpipe.errors import Received, expected

__all__ = ["PerClassDice"]


@keras.saving.register_keras_serializable(package="segpipe")
class PerClassDice(keras.metrics.Metric):
    """Per-class hard Dice accumulated over the epoch, ``2 TP / (2 TP + FP + FN)`` per class.

    Counts are summed over all voxels of all batches since the last ``reset_state()`` (a
    "global" Dice per class, not the mean of per-case Dice).

    Empty-class policy: a class absent from both the reference and the prediction over the whole
    epoch (TP + FP + FN = 0) scores 1.0 (the model correctly predicts nothing), so every value is
    finite and safe to monitor. A class that is only predicted, or only in the reference, scores 0.

    ``result()`` returns ``{f"{name}_{class}": dice_c, ..., f"{name}_fg_mean": mean}``; the
    per-class entries cover the foreground classes (and the background with
    ``include_background=True``); ``fg_mean`` is always the plain mean over the foreground classes
    (channels 1..C-1) of the values reported, and is what "best checkpoint" should monitor.

    Parameters
    ----------
    class_names
        one name per output channel, background (channel 0) first, e.g. the labels of
        ``dataset.json``. Characters other than letters, digits, ``_``, ``-`` and ``.`` are
        replaced by ``_`` in the log keys.
    include_background
        also report channel 0. Defaults to False.
    name
        prefix of the log keys. Defaults to "dice".

    Notes
    -----
    Ignored voxels (docs/losses.md, "Ignored voxels") count nowhere: an all-zero one-hot row of
    ``y_true``, or a 1 in its extra last ignore-mask channel.

    With ``regions=True`` the channels are regions (one sigmoid each, no background channel;
    ``class_names`` then names the regions): a voxel belongs to region c where ``y_pred_c > 0.5``
    (probabilities) and ``y_true_c >= 0.5``; every region is reported and ``fg_mean`` is their mean.

    ``update_state(y_true, y_pred)`` takes one-hot ``y_true`` (optionally with the ignore-mask
    channel) and probabilities/logits ``y_pred`` (channels last, any rank >= 3). If ``y_pred`` (or
    ``y_true``) is a list or tuple, e.g. deep-supervision outputs, only the first (full-resolution) element is used.
    ``sample_weight`` is not supported.
    """

    def __init__(self, class_names: Sequence[str], include_background: bool = False,
                 name: str = "dice", dtype=None, *, regions: bool = False):
        super().__init__(name=name, dtype=dtype)
        if not isinstance(regions, bool):
            raise ValueError(expected("a boolean", key="regions", received=regions))
        least = 1 if regions else 2
        if isinstance(class_names, str) or not isinstance(class_names, Sequence) or len(
                class_names) < least or not all(isinstance(c, str) and c for c in class_names):
            what = "region names" if regions else "names, background first"
            raise ValueError(expected(f"a list of at least {least} non-empty {what}", key="class_names",
                                      received=class_names))
        self.regions = regions
        keys = [re.sub(r"[^A-Za-z0-9_.\-]", "_", c) for c in class_names]
        if len(set(keys)) != len(keys) or "fg_mean" in keys:
            raise ValueError(expected("distinct class names (after replacing special characters) other than 'fg_mean'",
                                      key="class_names", received=list(class_names)))
        if not isinstance(include_background, bool):
            raise ValueError(expected("a boolean", key="include_background", received=include_background))
        self.class_names = list(class_names)
        self.include_background = include_background
        self._keys = keys
        n = len(class_names)
        # float64 counts stay exact far beyond the 2^24 voxels where float32 would start rounding.
        self.true_positives, self.false_positives, self.false_negatives = (
            self.add_variable(shape=(n,), initializer="zeros", dtype="float64", name=var)
            for var in ("true_positives", "false_positives", "false_negatives"))

    def update_state(self, y_true, y_pred, sample_weight=None):
        if sample_weight is not None:
            raise ValueError(expected("None (PerClassDice does not support sample weights)", key="sample_weight",
                                      received=Received("a weight")))
        if isinstance(y_pred, (list, tuple)):
            y_pred = y_pred[0]
        if isinstance(y_true, (list, tuple)):
            y_true = y_true[0]
        y_true, y_pred = ops.convert_to_tensor(y_true), ops.convert_to_tensor(y_pred)
        n = len(self.class_names)
        if (len(y_true.shape) != len(y_pred.shape) or y_pred.shape[-1] != n
                or y_true.shape[-1] not in (n, n + 1)):
            raise ValueError(expected(f"y_true (one-hot, optionally plus an ignore-mask channel) and y_pred with {n} "
                                      "channels (one per class name), channels last",
                                      key="y_pred.shape", received=Received(f"{tuple(y_pred.shape)} "
                                                                            f"(y_true.shape={tuple(y_true.shape)})")))
        y_true = ops.cast(y_true, "float32")
        if y_true.shape[-1] == n + 1:
            annotated = ops.cast(y_true[..., -1:] < 0.5, "int32")
            y_true = y_true[..., :n]
        elif self.regions:
            annotated = ops.ones_like(ops.cast(y_true[..., :1], "int32"))
        else:
            annotated = ops.cast(ops.sum(y_true, axis=-1, keepdims=True) > 0, "int32")
        if self.regions:
            true_1h = ops.cast(y_true >= 0.5, "int32") * annotated
            pred_1h = ops.cast(ops.cast(y_pred, "float32") > 0.5, "int32") * annotated
        else:
            true_1h = ops.one_hot(ops.argmax(y_true, axis=-1), n, dtype="int32") * annotated
            pred_1h = ops.one_hot(ops.argmax(y_pred, axis=-1), n, dtype="int32") * annotated
        axes = tuple(range(len(true_1h.shape) - 1))
        tp = ops.sum(true_1h * pred_1h, axis=axes)
        n_pred, n_true = ops.sum(pred_1h, axis=axes), ops.sum(true_1h, axis=axes)
        self.true_positives.assign_add(ops.cast(tp, "float64"))
        self.false_positives.assign_add(ops.cast(n_pred - tp, "float64"))
        self.false_negatives.assign_add(ops.cast(n_true - tp, "float64"))

    def per_class(self):
        """Dice per channel (all C, background included), 1.0 where TP + FP + FN = 0."""
        tp = self.true_positives
        denominator = 2.0 * tp + self.false_positives + self.false_negatives
        safe = ops.where(denominator > 0, denominator, ops.ones_like(denominator))
        return ops.cast(ops.where(denominator > 0, 2.0 * tp / safe, ops.ones_like(tp)), self.dtype)

    def result(self) -> dict[str, Any]:
        dice = self.per_class()
        first = 0 if self.include_background or self.regions else 1
        out = {f"{self.name}_{self._keys[c]}": dice[c] for c in range(first, len(self._keys))}
        out[f"{self.name}_fg_mean"] = ops.mean(dice if self.regions else dice[1:])
        return out

    def reset_state(self):
        for variable in (self.true_positives, self.false_positives, self.false_negatives):
            variable.assign(ops.zeros(variable.shape, dtype=variable.dtype))

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "class_names": self.class_names,
                "include_background": self.include_background, "regions": self.regions}
