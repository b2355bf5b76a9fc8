"""Deep supervision as a plain multi-output Keras model.

The network returns one output per decoder level, full resolution first, each next one at half
the previous resolution. It is compiled with one loss per output and ``loss_weights``::

    losses, weights = deep_supervision_losses(get_loss({"terms": ["dice", "ce"]}), num_outputs=3)
    model.compile(optimizer, loss=losses, loss_weights=weights)

and the data pipeline gives one target per output (:func:`deep_supervision_targets`), so Keras's
own ``compile``/``fit`` machinery (sample weights, reduction, replica scaling) applies unchanged;
no ``compute_loss`` override is needed.

Weights (nnU-Net): ``1/2^i`` for output i = 0 (full resolution) .. n-1, the lowest-resolution
output weighted 0, normalised to sum 1 (n = 1: [1]; n = 2: [1, 0]; n = 3: [2/3, 1/3, 0]).
"""
from __future__ import annotations

from collections.abc import Sequence

import keras
from keras import ops

from segpipe.errors import expected
from segpipe.losses.tensors import shape_str

__all__ = ["TARGET_DOWNSAMPLING", "deep_supervision_weights", "deep_supervision_losses",
           "downsample_target", "deep_supervision_targets"]

TARGET_DOWNSAMPLING = ("average", "nearest")


def deep_supervision_weights(num_outputs: int) -> list[float]:
    """nnU-Net's output weights: ``1/2^i``, the last (lowest-resolution) one 0, normalised.

    Examples
    --------
    >>> deep_supervision_weights(4)
    [0.5714285714285714, 0.2857142857142857, 0.14285714285714285, 0.0]
    """
    if not isinstance(num_outputs, int) or isinstance(num_outputs, bool) or num_outputs < 1:
        raise ValueError(expected("a positive integer", key="num_outputs", received=num_outputs))
    raw = [0.5 ** i for i in range(num_outputs)]
    if num_outputs > 1:
        raw[-1] = 0.0
    return [w / sum(raw) for w in raw]


def deep_supervision_losses(loss: keras.losses.Loss, num_outputs: int
                            ) -> tuple[list[keras.losses.Loss], list[float]]:
    """``(losses, loss_weights)`` for ``model.compile``: the same loss on every output and
    :func:`deep_supervision_weights`."""
    return [loss] * num_outputs, deep_supervision_weights(num_outputs)


def downsample_target(y_true, factors: Sequence[int], mode: str = "average"):
    """Down-sample a one-hot target (B, spatial..., C) by integer ``factors`` per spatial axis.

    ``"average"`` average-pools the one-hot target: soft targets equal to the class fractions of
    each block, so structures smaller than the stride do not vanish from the coarse targets and
    per-class volumes are preserved (up to the factor); it is the expectation of nearest sampling
    over sub-voxel offsets, and the region losses and CE accept soft targets as they are.
    ``"nearest"`` takes the centre voxel of each block (hard targets, as nnU-Net's
    nearest-neighbour down-sampling of the label map).
    """
    if mode not in TARGET_DOWNSAMPLING:
        raise ValueError(expected(f"one of {list(TARGET_DOWNSAMPLING)}", key="mode", received=mode))
    y_true = ops.convert_to_tensor(y_true)
    spatial = y_true.shape[1:-1]
    factors = tuple(int(f) for f in factors)
    if len(factors) != len(spatial) or any(f < 1 for f in factors):
        raise ValueError(expected(f"one positive factor per spatial axis of y_true.shape={shape_str(y_true)}",
                                  key="factors", received=factors))
    for n, f in zip(spatial, factors):
        if n is not None and n % f:
            raise ValueError(expected(f"every spatial size of y_true.shape={shape_str(y_true)} divisible by its "
                                      "factor", key="factors", received=factors))
    if all(f == 1 for f in factors):
        return y_true
    if mode == "average":
        return ops.average_pool(ops.cast(y_true, "float32"), pool_size=factors, strides=factors,
                                padding="valid", data_format="channels_last")
    centre = tuple(slice(f // 2, None, f) for f in factors)
    return y_true[(slice(None), *centre, slice(None))]


def deep_supervision_targets(y_true, num_outputs: int, mode: str = "average") -> tuple:
    """The targets of a deep-supervision model's outputs: ``y_true`` down-sampled by ``2^i`` for
    output i, full resolution first (a tuple, the structure of the model's outputs)."""
    deep_supervision_weights(num_outputs)  # validates num_outputs
    rank = len(ops.convert_to_tensor(y_true).shape) - 2
    return tuple(downsample_target(y_true, (2 ** i,) * rank, mode) for i in range(num_outputs))
