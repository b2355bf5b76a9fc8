"""Tensor helpers shared by the losses: input checks and activation, TP/FP/FN, sample weights and
Keras's reduction (written out here because Keras does not export it).

Everything is ``keras.ops`` except the two places that must talk to ``tf.distribute`` (the replica
count of the reduction and the all-reduce of pooled counts); they do nothing on other backends.
"""
from __future__ import annotations

from collections.abc import Sequence

import keras
from keras import ops

from segpipe.errors import Received, expected

__all__ = ["EPSILON", "REDUCTIONS", "shape_str", "split_target", "prepare", "region_stats", "power_from_zero",
           "per_class_vector", "class_mean", "split_sample_weight", "reduce_per_sample",
           "pool_over_replicas"]

EPSILON = 1e-7
"""Lower clip value for probabilities inside logarithms (as ``keras.backend.epsilon()``)."""

REDUCTIONS = ("sum_over_batch_size", "sum", "mean", "mean_with_sample_weight", "none", None)
"""The reductions of ``keras.losses.Loss`` (Keras 3: "mean" is "sum_over_batch_size")."""


def shape_str(x) -> str:
    return "(" + ", ".join("None" if d is None else str(d) for d in x.shape) + ")"


def split_target(y_true, y_pred, *, sigmoid: bool = False):
    """``(g, m)``: the class/region channels of ``y_true`` and the annotated-voxel weight ``m``.

    The ignore convention (docs/losses.md, "Ignored voxels"): a voxel nobody annotated weighs 0.

    * ``y_true`` may carry **one extra last channel, the ignore mask** (1 = not annotated; the other
      channels 0 there): then ``m = 1 - mask``. Region (sigmoid) targets use this form.
    * Otherwise, for softmax (one-hot) targets, ``m = sum_c g_c``: an **all-zero one-hot row** is a
      voxel without annotation (``tf.one_hot`` of an ignore value >= the class count gives it).
      Sigmoid targets without the extra channel have ``m = 1``.

    Down-sampled ("average") targets keep the meaning: ``m`` becomes the annotated fraction of the
    block, and the class channels sum to it. ``m`` has shape (B, spatial..., 1).
    """
    if isinstance(y_pred, (list, tuple)):
        raise ValueError(expected("a single `y_pred` tensor; a model with several outputs (deep supervision) is "
                                  "compiled with one loss per output", key="len(y_pred)", received=len(y_pred)))
    y_true = ops.convert_to_tensor(y_true)
    y_pred = ops.convert_to_tensor(y_pred)
    if len(y_pred.shape) < 3:
        raise ValueError(expected("`y_pred` of rank >= 3 (batch, spatial..., classes), channels last",
                                  key="y_pred.shape", received=Received(shape_str(y_pred))))
    with_mask = (len(y_true.shape) == len(y_pred.shape) and y_true.shape[-1] is not None
                 and y_pred.shape[-1] is not None and y_true.shape[-1] == y_pred.shape[-1] + 1)
    true_shape = tuple(y_true.shape[:-1]) + ((y_true.shape[-1] - 1,) if with_mask else (y_true.shape[-1],))
    if len(y_true.shape) != len(y_pred.shape) or any(
            a is not None and b is not None and a != b for a, b in zip(true_shape, y_pred.shape)):
        raise ValueError(expected("`y_true` (one-hot, or one-hot plus a last ignore-mask channel) and `y_pred` of "
                                  "the same shape", key="y_true.shape",
                                  received=Received(f"{shape_str(y_true)}, y_pred.shape={shape_str(y_pred)}")))
    g = ops.cast(y_true, "float32")
    if with_mask:
        return g[..., :-1], 1.0 - g[..., -1:]
    if sigmoid:
        return g, ops.ones_like(g[..., :1])
    return g, ops.sum(g, axis=-1, keepdims=True)


def prepare(y_true, y_pred, *, from_logits: bool, include_background: bool,
            label_smoothing: float = 0.0, with_log: bool = False, sigmoid: bool = False):
    """Check shapes, cast to float32, apply softmax (sigmoid) / smoothing, drop background.

    Returns ``(g, p, log_p, m)``; ``log_p`` is ``None`` unless ``with_log``; ``m`` (B, spatial..., 1)
    is the annotated-voxel weight of :func:`split_target` (1 everywhere without ignored voxels).
    With ``from_logits`` ``log_p`` is ``log_softmax(logits)`` (``log_sigmoid`` with ``sigmoid``;
    stable for any logit size), otherwise ``log(clip(p))``. With ``sigmoid`` every channel is an
    independent region probability and there is no background channel to drop.
    """
    g, m = split_target(y_true, y_pred, sigmoid=sigmoid)
    logits_or_p = ops.cast(ops.convert_to_tensor(y_pred), "float32")
    if label_smoothing:
        num_classes = ops.cast(ops.shape(g)[-1], "float32")
        g = g * (1.0 - label_smoothing) + label_smoothing * m / num_classes
    log_p = None
    if from_logits:
        log_act = ops.log_sigmoid(logits_or_p) if sigmoid else ops.log_softmax(logits_or_p, axis=-1)
        p = ops.exp(log_act)
        if with_log:
            log_p = log_act
    else:
        p = logits_or_p
        if with_log:
            log_p = ops.log(ops.clip(p, EPSILON, 1.0))
    if not include_background and not sigmoid:
        g, p = g[..., 1:], p[..., 1:]
        log_p = None if log_p is None else log_p[..., 1:]
    return g, p, log_p, m


def _spatial_sum(x):
    """(B, spatial..., C) -> (B, C)."""
    return ops.sum(x, axis=tuple(range(1, len(x.shape) - 1)))


def region_stats(y_true, y_pred, *, from_logits: bool, include_background: bool, batch: bool,
                 pool_weights=None, squares: bool = False, sigmoid: bool = False):
    """Per-sample counts ``TP, FP, FN`` (and ``sum p^2, sum g^2`` with ``squares``), each (B, C).

    Only annotated voxels count: ``TP = sum p g``, ``FP = sum p (m - g)``, ``FN = sum (1 - p) g``
    and ``sum m p^2`` with ``m`` the annotated weight of :func:`split_target` (``m = 1`` without
    ignored voxels, which gives the usual counts); ``g`` is 0 on ignored voxels.

    With ``batch`` they are pooled over the batch, each sample scaled by ``pool_weights`` (B,) if
    given, and summed over the replicas of a ``tf.distribute`` strategy (:func:`pool_over_replicas`), so
    every replica gets the counts of the whole global batch; the result then has shape (1, C).
    """
    g, p, _, m = prepare(y_true, y_pred, from_logits=from_logits,
                         include_background=include_background, sigmoid=sigmoid)
    stats = [_spatial_sum(p * g), _spatial_sum(p * (m - g)), _spatial_sum((1.0 - p) * g)]
    if squares:
        stats += [_spatial_sum(m * p * p), _spatial_sum(g * g)]
    if batch:
        if pool_weights is None:
            w = ops.ones((ops.shape(stats[0])[0], 1), dtype="float32")
        else:
            w = ops.reshape(ops.cast(pool_weights, "float32"), (-1, 1))
        stats = pool_over_replicas([ops.sum(s * w, axis=0, keepdims=True) for s in stats],
                                   ops.sum(w))
    return stats


def power_from_zero(x, gamma: float):
    """``max(x, 0) ** gamma`` with 0 ** gamma = 0 and a finite (zero) gradient there.

    A plain power has an infinite derivative at 0 when gamma < 1; the double ``where`` keeps the
    gradient finite. In float32, 1 - p and 1 - TI are 0 or >= 6e-8, so the power's derivative is
    bounded elsewhere.
    """
    x = ops.maximum(x, 0.0)
    positive = x > 0
    safe = ops.where(positive, x, ops.ones_like(x))
    return ops.where(positive, ops.power(safe, gamma), ops.zeros_like(x))


def per_class_vector(values: Sequence[float], num_scored: int | None, *, what: str,
                     include_background: bool):
    """Convert a per-scored-class option to a float32 vector, checking its length."""
    if num_scored is not None and len(values) != num_scored:
        raise ValueError(expected(f"`{what}` with one entry per scored class: {num_scored} "
                                  f"(include_background={include_background})", key=what, received=list(values)))
    return ops.convert_to_tensor([float(v) for v in values], dtype="float32")


def class_mean(loss_bc, class_weights, include_background: bool):
    """(B|1, C) per-class losses -> (B|1,) (weighted) class mean ``sum_c w_c l_c / sum_c w_c``."""
    if class_weights is None:
        return ops.mean(loss_bc, axis=-1)
    w = per_class_vector(class_weights, loss_bc.shape[-1], what="class_weights",
                         include_background=include_background)
    return ops.sum(loss_bc * w, axis=-1) / ops.sum(w)


def broadcast_to_batch(value, like):
    """(1,) or (B,) ``value`` -> (B,), B the batch size of ``like``."""
    return value + ops.zeros((ops.shape(like)[0],), dtype=value.dtype)


# --------------------------------------------------------------------------------------------
# Sample weights and reduction (as keras.losses.Loss)
# --------------------------------------------------------------------------------------------
def split_sample_weight(sample_weight, y_pred, *, loss_name: str, voxel_ok: bool):
    """Standardise ``sample_weight``: returns ``(per_sample, per_voxel)``, at most one not None.

    ``per_sample`` has shape (B,) (from (B,) or (B, 1)); ``per_voxel`` has the spatial shape of
    ``y_pred`` with the batch axis, (B, X, Y, Z) (from that or (B, X, Y, Z, 1)); voxel weights are
    accepted only when ``voxel_ok`` (voxel losses), otherwise a ``ValueError`` names the loss.
    """
    if sample_weight is None:
        return None, None
    w = ops.cast(ops.convert_to_tensor(sample_weight), "float32")
    rank, pred_rank = len(w.shape), len(ops.convert_to_tensor(y_pred).shape)
    if rank == 0:
        return ops.zeros((ops.shape(y_pred)[0],)) + w, None
    if rank == 2 and w.shape[-1] == 1 and pred_rank > 3:
        w = ops.squeeze(w, axis=-1)
        rank = 1
    if rank == 1:
        return w, None
    if rank == pred_rank and w.shape[-1] == 1:
        w = ops.squeeze(w, axis=-1)
        rank -= 1
    if rank == pred_rank - 1:
        if not voxel_ok:
            raise ValueError(expected(
                f"`sample_weight` of shape (batch,) for the region loss '{loss_name}' (one Dice-like value per "
                "sample has no voxels to weight); voxel weights are for the voxel losses (cross_entropy, focal)",
                key="sample_weight.shape", received=Received(shape_str(w))))
        return None, w
    shapes = "(batch,) or (batch, spatial...)" if voxel_ok else "(batch,)"
    raise ValueError(expected(
        f"`sample_weight` of shape {shapes} for loss '{loss_name}' with y_pred.shape="
        f"{shape_str(ops.convert_to_tensor(y_pred))}", key="sample_weight.shape", received=Received(shape_str(w))))


def reduce_per_sample(values, weights, reduction: str | None):
    """Keras's reduction of per-sample ``values`` (B,) with sample ``weights`` (B,) or None.

    As ``keras.losses.Loss``: the values are multiplied by the weights, then ``None``/"none" returns
    them, "sum" sums them, "sum_over_batch_size" and "mean" divide the sum by B,
    "mean_with_sample_weight" by the sum of the weights; the two means are then divided by the
    number of replicas in sync, because ``tf.distribute`` sums the replicas' gradients.
    """
    values = ops.cast(values, "float32")
    if weights is not None:
        values = values * ops.cast(weights, "float32")
    if reduction is None or reduction == "none":
        return values
    total = ops.sum(values)
    if reduction == "sum":
        return total
    if reduction == "mean_with_sample_weight" and weights is not None:
        divisor = ops.sum(ops.cast(weights, "float32"))
    else:
        divisor = ops.cast(ops.shape(values)[0], "float32")
    return _scale_for_replicas(ops.divide_no_nan(total, divisor))


def _tf_distribute():
    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf  # only on the TensorFlow backend (the losses are backend-agnostic)
    return tf.distribute


def _scale_for_replicas(value):
    distribute = _tf_distribute()
    if distribute is not None:
        replicas = distribute.get_strategy().num_replicas_in_sync
        if replicas > 1:
            value = value * (1.0 / replicas)
    return value


def pool_over_replicas(pooled: list, weight_sum):
    """Counts pooled over this replica's samples -> counts of the whole global batch.

    Outside a ``tf.distribute`` replica context, with one replica or on other backends: unchanged.
    Otherwise the forward value is the sum over replicas (one all-reduce, no gradient through it:
    a differentiable all-reduce adds collectives in the backward pass that MirroredStrategy may
    order differently on each replica, which deadlocks or fails). The gradient w.r.t. the local
    counts is scaled by ``global weight sum / local weight sum`` (R without sample weights): each
    replica back-propagates only into its own slice, and the replicas' objectives, summed by the
    optimizer, must give the one-process gradient of the batch value, which depends on every
    slice. A replica whose samples all have weight 0 contributes no gradient.
    """
    distribute = _tf_distribute()
    if distribute is None:
        return pooled
    context = distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return pooled
    constant = [ops.stop_gradient(s) for s in pooled]
    *total, total_weight = context.all_reduce("SUM", [*constant, ops.stop_gradient(weight_sum)])
    factor = ops.stop_gradient(ops.divide_no_nan(total_weight, weight_sum))
    return [t + factor * (s - c) for t, s, c in zip(total, pooled, constant)]
