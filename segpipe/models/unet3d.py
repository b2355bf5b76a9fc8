"""A configurable 3D U-Net (Keras functional API, channels-last, any input size the depth divides).

Each level has two 3×3×3 convolutions with normalisation and LeakyReLU; the encoder halves the
resolution with a stride-2 convolution (as nnU-Net does, instead of max pooling) and the decoder
doubles it with a transposed convolution and concatenates the skip connection. The output is a
softmax over the classes, computed in float32 so mixed-precision training stays stable.

With ``deep_supervision`` the model returns a list of softmax outputs, full resolution first and
each next one at half the previous resolution (all decoder levels except the lowest).
"""
from __future__ import annotations

import keras
from keras import layers, ops

NORMS = ("batch", "instance", "none")


@keras.saving.register_keras_serializable(package="segpipe")
class DeepSupervisionModel(keras.Model):
    """A functional model with several outputs whose compiled loss sees all of them at once.

    Keras applies a compiled loss output by output; a deep-supervision loss
    (``segpipe.losses.DeepSupervisionLoss``) instead takes the full-resolution target and the whole
    list of outputs, so this model hands them over unchanged.
    """

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        if sample_weight is not None:
            raise ValueError("Expected no sample weights with deep supervision. Received: sample_weight")
        loss = self.loss(y, y_pred)
        if self.losses:  # regularisation terms added by layers
            loss = loss + ops.sum(self.losses)
        return loss


def _norm(x, norm: str, name: str, sync_batch_norm: bool = False):
    if norm == "batch":
        # synchronized: statistics over the global batch under tf.distribute (one all-reduce per layer)
        return layers.BatchNormalization(synchronized=sync_batch_norm, name=f"{name}_bn")(x)
    if norm == "instance":
        # GroupNormalization with one group per channel is instance normalisation.
        return layers.GroupNormalization(groups=-1, epsilon=1e-5, name=f"{name}_in")(x)
    return x


def _conv_block(x, filters: int, norm: str, name: str, first_stride: int = 1, sync_batch_norm: bool = False):
    for i, stride in enumerate((first_stride, 1)):
        x = layers.Conv3D(filters, 3, strides=stride, padding="same", use_bias=norm == "none", name=f"{name}_conv{i}")(x)
        x = _norm(x, norm, f"{name}_{i}", sync_batch_norm)
        x = layers.LeakyReLU(negative_slope=0.01, name=f"{name}_act{i}")(x)
    return x


def build_unet3d(
    in_channels: int,
    num_classes: int,
    *,
    depth: int = 4,
    base_filters: int = 16,
    max_filters: int = 320,
    norm: str = "batch",
    deep_supervision: bool = False,
    sync_batch_norm: bool = False,
    name: str = "unet3d",
) -> keras.Model:
    """Build a 3D U-Net taking (B, X, Y, Z, in_channels) and returning softmax (B, X, Y, Z, num_classes).

    Spatial sizes are dynamic; each must be divisible by ``2 ** (depth - 1)``.

    Args:
        in_channels: input channels (modalities).
        num_classes: output classes, background included.
        depth: resolution levels (1 = no down-sampling).
        base_filters: filters at full resolution; doubled per level up to ``max_filters``.
        norm: "batch", "instance" or "none".
        deep_supervision: also return softmax outputs of the lower decoder levels.
        sync_batch_norm: with norm="batch", compute batch statistics over all replicas of a
            tf.distribute strategy (``BatchNormalization(synchronized=True)``); without it each
            replica normalises with the statistics of its own slice of the batch.
    """
    if norm not in NORMS:
        raise ValueError(f"Expected norm to be one of {NORMS}. Received: norm={norm!r}")
    if depth < 1 or in_channels < 1 or num_classes < 2 or base_filters < 1:
        raise ValueError(
            "Expected depth >= 1, in_channels >= 1, num_classes >= 2, base_filters >= 1. "
            f"Received: depth={depth}, in_channels={in_channels}, num_classes={num_classes}, base_filters={base_filters}"
        )
    filters = [min(base_filters * 2**i, max_filters) for i in range(depth)]
    inputs = keras.Input(shape=(None, None, None, in_channels), name="image")

    skips = []
    x = inputs
    for level, f in enumerate(filters):
        x = _conv_block(x, f, norm, f"enc{level}", first_stride=1 if level == 0 else 2, sync_batch_norm=sync_batch_norm)
        skips.append(x)

    outputs = []
    for level in reversed(range(depth - 1)):
        x = layers.Conv3DTranspose(filters[level], 2, strides=2, name=f"up{level}")(x)
        x = layers.Concatenate(name=f"skip{level}")([x, skips[level]])
        x = _conv_block(x, filters[level], norm, f"dec{level}", sync_batch_norm=sync_batch_norm)
        if deep_supervision or level == 0:
            outputs.append(_head(x, num_classes, f"out{level}"))

    if depth == 1:
        outputs.append(_head(x, num_classes, "out0"))
    outputs.reverse()  # full resolution first
    if deep_supervision:
        return DeepSupervisionModel(inputs, outputs, name=name)
    return keras.Model(inputs, outputs[0], name=name)


def _head(x, num_classes: int, name: str):
    logits = layers.Conv3D(num_classes, 1, name=f"{name}_logits")(x)
    return layers.Activation("softmax", dtype="float32", name=name)(logits)
