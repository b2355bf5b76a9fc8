"""A configurable 3D U-Net (Keras functional API, channels-last, any input size the depth divides).

Each level has two 3×3×3 convolutions with normalisation and LeakyReLU; the encoder halves the
resolution with a stride-2 convolution (as nnU-Net does, instead of max pooling) and the decoder
doubles it with a transposed convolution and concatenates the skip connection. The head is a
1×1×1 convolution to the class logits followed by the output activation (``output``), in float32
so mixed-precision training stays stable: "softmax" (probabilities, the default) or "logits" (a
linear float32 activation; train with ``from_logits=True`` losses, which use a log-softmax).
:func:`probability_model` gives the full-resolution probabilities of either kind, which is what
inference and every export format use.

With ``deep_supervision`` the model is a plain multi-output ``keras.Model``: a list of outputs,
full resolution first and each next one at half the previous resolution (all decoder levels
except the lowest), compiled with one loss per output and ``loss_weights``
(``segpipe.losses.deep_supervision_losses``) and trained on one target per output.
"""
from __future__ import annotations

import keras
from keras import layers

NORMS = ("batch", "instance", "none")
OUTPUTS = ("softmax", "logits")


@keras.saving.register_keras_serializable(package="segpipe")
class DeepSupervisionModel(keras.Model):
    """Only so that models saved before deep supervision became a plain ``keras.Model`` still load.

    It adds nothing to ``keras.Model`` (its former ``compute_loss`` override handed all outputs to
    one loss); :func:`build_unet3d` no longer creates it.
    """


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
    output: str = "softmax",
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
        deep_supervision: also return outputs of the lower decoder levels (a list, full
            resolution first).
        output: "softmax" (probabilities) or "logits" (float32 logits; see :func:`probability_model`).
        sync_batch_norm: with norm="batch", compute batch statistics over all replicas of a
            tf.distribute strategy (``BatchNormalization(synchronized=True)``); without it each
            replica normalises with the statistics of its own slice of the batch.
    """
    if output not in OUTPUTS:
        raise ValueError(f"Expected output to be one of {OUTPUTS}. Received: output={output!r}")
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
            outputs.append(_head(x, num_classes, f"out{level}", output))

    if depth == 1:
        outputs.append(_head(x, num_classes, "out0", output))
    outputs.reverse()  # full resolution first
    return keras.Model(inputs, outputs if deep_supervision else outputs[0], name=name)


def _head(x, num_classes: int, name: str, output: str = "softmax"):
    logits = layers.Conv3D(num_classes, 1, name=f"{name}_logits")(x)
    # "linear" keeps the logits (in float32); the layer name stays the output's name either way
    return layers.Activation("softmax" if output == "softmax" else "linear", dtype="float32", name=name)(logits)


def outputs_logits(model: keras.Model) -> bool:
    """True if the model's first (full-resolution) output is a logits head (a linear activation).

    Any other last layer, e.g. a softmax or a plain convolution with a softmax activation, counts as
    probabilities.
    """
    last = _output_layer(model)
    return isinstance(last, layers.Activation) and last.activation is keras.activations.linear


def probability_model(model: keras.Model) -> keras.Model:
    """The network with one output, the full-resolution class probabilities, as a functional model.

    Deep-supervision outputs are dropped; a logits head gets a float32 softmax (a model that already
    outputs probabilities keeps its output tensor as it is). Inference and every export use this.
    """
    if not getattr(model, "inputs", None) or not getattr(model, "outputs", None):
        raise ValueError(f"Expected a functional Keras model (with inputs and outputs). Received: {type(model).__name__}")
    output = model.outputs[0]
    if outputs_logits(model):
        output = layers.Softmax(axis=-1, dtype="float32", name="probabilities")(output)
    return keras.Model(model.inputs, output, name=model.name)


def _output_layer(model: keras.Model):
    first = model.outputs[0]
    for layer in reversed(model.layers):
        try:
            if any(node_output is first for node_output in keras.tree.flatten(layer.output)):
                return layer
        except (AttributeError, ValueError):  # a layer without a single output node
            continue
    return None
