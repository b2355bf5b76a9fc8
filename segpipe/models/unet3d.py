"""A configurable 3D U-Net (Keras functional API, channels-last, any input size the depth divides).

Each level has two 3×3×3 convolutions with normalisation and LeakyReLU; the encoder halves the
resolution with a stride-2 convolution (as nnU-Net does, instead of max pooling) and the decoder
doubles it with a transposed convolution and concatenates the skip connection. The head is a
1×1×1 convolution to the class logits followed by the output activation (``output``), in float32
so mixed-precision training stays stable: "softmax" (probabilities, the default) or "logits" (a
linear float32 activation; train with ``from_logits=True`` losses, which use a log-softmax), or
"sigmoid" (region-based training: one independent probability per region, no background channel;
``num_classes`` is then the number of regions, and the losses run with ``sigmoid=True``).
:func:`probability_model` gives the full-resolution probabilities of either kind, which is what
inference and every export format use.

With ``deep_supervision`` the model is a plain multi-output ``keras.Model``: a list of outputs,
full resolution first and each next one at half the previous resolution (all decoder levels
except the lowest), compiled with one loss per output and ``loss_weights``
(``segpipe.losses.deep_supervision_losses``) and trained on one target per output.

For planned (anisotropic) networks the builder also takes per-stage ``strides`` and
``kernel_sizes`` (e.g. stride 2×2×1 and kernel 3×3×1 while the slices are much thicker than the
in-plane spacing), ``features`` and ``convs_per_stage``, He initialisation (``init="he_normal"``),
and a residual encoder (``blocks_per_stage``; see ``segpipe.models.resenc_unet``). Left at their
defaults, these options build exactly the network (layers, names and initial weights) built before.
"""
from __future__ import annotations

import keras
from keras import layers

from segpipe.errors import Received, SettingError, expected

NORMS = ("batch", "instance", "none")
INITS = ("glorot_uniform", "he_normal")
OUTPUTS = ("softmax", "logits", "sigmoid")


@keras.saving.register_keras_serializable(package="segpipe")
class DeepSupervisionModel(keras.Model):
    """Only so that models saved before deep supervision became a plain ``keras.Model`` still load.

    It adds nothing to ``keras.Model`` (its former ``compute_loss`` override handed all outputs to
    one loss); :func:`build_unet3d` no longer creates it.
    """


def _norm(x, norm: str, name: str, sync_batch_norm: bool = False, dtype=None):
    # Under a mixed policy both layers compute their statistics in float32 and keep float32
    # variables (Keras upcasts the inputs), then return the compute dtype.
    if norm == "batch":
        # synchronized: statistics over the global batch under tf.distribute (one all-reduce per layer)
        return layers.BatchNormalization(synchronized=sync_batch_norm, name=f"{name}_bn", dtype=dtype)(x)
    if norm == "instance":
        # GroupNormalization with one group per channel is instance normalisation.
        return layers.GroupNormalization(groups=-1, epsilon=1e-5, name=f"{name}_in", dtype=dtype)(x)
    return x


def _conv_block(x, filters: int, norm: str, name: str, first_stride=1, sync_batch_norm: bool = False, *,
                kernel_size=3, convs: int = 2, init: dict | None = None, dtype=None):
    """``convs`` × (convolution, normalisation, LeakyReLU); the first convolution has ``first_stride``."""
    for i in range(convs):
        stride = first_stride if i == 0 else 1
        x = layers.Conv3D(filters, kernel_size, strides=stride, padding="same", use_bias=norm == "none",
                          name=f"{name}_conv{i}", dtype=dtype, **(init or {}))(x)
        x = _norm(x, norm, f"{name}_{i}", sync_batch_norm, dtype)
        x = layers.LeakyReLU(negative_slope=0.01, name=f"{name}_act{i}", dtype=dtype)(x)
    return x


def _residual_stage(x, filters: int, norm: str, name: str, stride, sync_batch_norm: bool, *, kernel_size,
                    blocks: int, init: dict | None, stem: bool, dtype=None):
    """A stage of basic residual blocks (conv-norm-act-conv-norm + skip, then act), nnU-Net ResEnc style.

    The first block carries the stage's stride; its skip is a strided 1×1×1 convolution + norm where
    the shape or width changes. Stage 0 starts with a stem convolution to ``filters`` channels.
    """
    if stem:
        x = layers.Conv3D(filters, kernel_size, padding="same", use_bias=norm == "none", name=f"{name}_stem",
                          dtype=dtype, **(init or {}))(x)
        x = _norm(x, norm, f"{name}_stem", sync_batch_norm, dtype)
        x = layers.LeakyReLU(negative_slope=0.01, name=f"{name}_stem_act", dtype=dtype)(x)
    for b in range(blocks):
        block = f"{name}_block{b}"
        s = stride if b == 0 else 1
        y = layers.Conv3D(filters, kernel_size, strides=s, padding="same", use_bias=norm == "none",
                          name=f"{block}_conv0", dtype=dtype, **(init or {}))(x)
        y = _norm(y, norm, f"{block}_0", sync_batch_norm, dtype)
        y = layers.LeakyReLU(negative_slope=0.01, name=f"{block}_act0", dtype=dtype)(y)
        y = layers.Conv3D(filters, kernel_size, padding="same", use_bias=norm == "none", name=f"{block}_conv1",
                          dtype=dtype, **(init or {}))(y)
        y = _norm(y, norm, f"{block}_1", sync_batch_norm, dtype)
        skip = x
        if s not in (1, (1, 1, 1)) or x.shape[-1] != filters:
            skip = layers.Conv3D(filters, 1, strides=s, use_bias=False, name=f"{block}_skip", dtype=dtype,
                                 **(init or {}))(x)
            skip = _norm(skip, norm, f"{block}_skip", sync_batch_norm, dtype)
        x = layers.Add(name=f"{block}_add", dtype=dtype)([y, skip])
        x = layers.LeakyReLU(negative_slope=0.01, name=f"{block}_act1", dtype=dtype)(x)
    return x


def _triples(values, depth: int, key: str, allowed: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """Check a per-stage list of per-axis sizes (``strides`` / ``kernel_sizes``)."""
    try:
        out = [tuple(int(v) for v in t) for t in values]
    except TypeError:
        out = []
    if len(out) != depth or any(len(t) != 3 or any(v not in allowed for v in t) for t in out):
        raise SettingError(key, f"{depth} triples (one per stage) of values in {list(allowed)}", values)
    return out


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
    strides=None,
    kernel_sizes=None,
    features=None,
    convs_per_stage: int = 2,
    decoder_convs: int | None = None,
    blocks_per_stage=None,
    init: str = "glorot_uniform",
    dtype: str | None = None,
) -> keras.Model:
    """Build a 3D U-Net taking (B, X, Y, Z, in_channels) and returning softmax (B, X, Y, Z, num_classes).

    Spatial sizes are dynamic; each must be divisible by ``2 ** (depth - 1)`` (with ``strides``: by
    the product of that axis's strides).

    Parameters
    ----------
    in_channels
        input channels (modalities).
    num_classes
        output classes, background included.
    depth
        resolution levels (1 = no down-sampling).
    base_filters
        filters at full resolution; doubled per level up to ``max_filters``.
    norm
        "batch", "instance" or "none".
    deep_supervision
        also return outputs of the lower decoder levels (a list, full
        resolution first).
    output
        "softmax" (probabilities) or "logits" (float32 logits; see :func:`probability_model`).
    sync_batch_norm
        with norm="batch", compute batch statistics over all replicas of a
        tf.distribute strategy (``BatchNormalization(synchronized=True)``); without it each
        replica normalises with the statistics of its own slice of the batch.
    strides
        per stage, the stride (1 or 2) per axis of its first convolution; stage 0 must be
        [1, 1, 1]. Defaults to 2 along every axis from stage 1 on. Each input side must then be
        divisible by the product of its axis's strides.
    kernel_sizes
        per stage, the kernel size (1, 3 or 5) per axis. Defaults to 3.
    features
        per stage, the number of filters. Defaults to ``base_filters * 2**stage`` capped
        at ``max_filters``.
    convs_per_stage
        convolutions per encoder stage (plain encoder). Defaults to 2.
    decoder_convs
        convolutions per decoder stage. Defaults to ``convs_per_stage``.
    blocks_per_stage
        residual encoder (nnU-Net ResEnc): basic residual blocks per stage;
        None keeps the plain encoder.
    init
        "glorot_uniform" (Keras's default) or "he_normal" (He et al. 2015, nnU-Net's choice
        for LeakyReLU networks) for the convolution kernels of encoder and decoder.
    dtype
        the Keras dtype policy of every layer except the output heads (float32 convolution
        and activation): None
        (Keras's global policy, float32 unless changed), "float32", "mixed_bfloat16" or
        "mixed_float16" (``segpipe.models.precision``). Variables stay float32 under a mixed
        policy, normalisation statistics are computed in float32, and the outputs (softmax
        or logits) are float32 whatever the policy.
    """
    for key, value, choices in (("output", output, OUTPUTS), ("norm", norm, NORMS), ("init", init, INITS)):
        if value not in choices:
            raise SettingError(key, f"one of {list(choices)}", value)
    for key, value, low in (("depth", depth, 1), ("in_channels", in_channels, 1),
                            ("num_classes", num_classes, 1 if output == "sigmoid" else 2),
                            ("base_filters", base_filters, 1), ("convs_per_stage", convs_per_stage, 1),
                            ("decoder_convs", 1 if decoder_convs is None else decoder_convs, 1)):
        if value < low:
            raise SettingError(key, f"an integer >= {low}", value)
    if features is None:
        filters = [min(base_filters * 2**i, max_filters) for i in range(depth)]
    else:
        filters = [int(f) for f in features]
        if len(filters) != depth or min(filters) < 1:
            raise SettingError("features", f"{depth} positive filter counts (one per stage)", features)
    # None keeps the scalar stride / kernel of the original network (identical layers and weights)
    stage_strides = [1] + [2] * (depth - 1) if strides is None else _triples(strides, depth, "strides", (1, 2))
    if strides is not None and stage_strides[0] != (1, 1, 1):
        raise SettingError("strides", "[1, 1, 1] as stage 0 (full resolution)", strides)
    kernels = [3] * depth if kernel_sizes is None else _triples(kernel_sizes, depth, "kernel_sizes", (1, 3, 5))
    if blocks_per_stage is not None:
        blocks = [int(b) for b in blocks_per_stage]
        if len(blocks) != depth or min(blocks) < 1:
            raise SettingError("blocks_per_stage", f"{depth} block counts >= 1 (one per stage)", blocks_per_stage)
    kernel_init = {} if init == "glorot_uniform" else {"kernel_initializer": keras.initializers.HeNormal()}
    dec_convs = convs_per_stage if decoder_convs is None else decoder_convs
    inputs = keras.Input(shape=(None, None, None, in_channels), name="image")

    skips = []
    x = inputs
    for level, f in enumerate(filters):
        if blocks_per_stage is None:
            x = _conv_block(x, f, norm, f"enc{level}", first_stride=stage_strides[level],
                            sync_batch_norm=sync_batch_norm,
                            kernel_size=kernels[level], convs=convs_per_stage, init=kernel_init, dtype=dtype)
        else:
            x = _residual_stage(x, f, norm, f"enc{level}", stage_strides[level], sync_batch_norm,
                                kernel_size=kernels[level], blocks=blocks[level], init=kernel_init, stem=level == 0,
                                dtype=dtype)
        skips.append(x)

    outputs = []
    for level in reversed(range(depth - 1)):
        up = 2 if strides is None else stage_strides[level + 1]  # transposed conv undoes the stage's stride
        x = layers.Conv3DTranspose(filters[level], up, strides=up, name=f"up{level}", dtype=dtype, **kernel_init)(x)
        x = layers.Concatenate(name=f"skip{level}", dtype=dtype)([x, skips[level]])
        x = _conv_block(x, filters[level], norm, f"dec{level}", sync_batch_norm=sync_batch_norm,
                        kernel_size=kernels[level], convs=dec_convs, init=kernel_init, dtype=dtype)
        if deep_supervision or level == 0:
            outputs.append(_head(x, num_classes, f"out{level}", output))

    if depth == 1:
        outputs.append(_head(x, num_classes, "out0", output))
    outputs.reverse()  # full resolution first
    return keras.Model(inputs, outputs if deep_supervision else outputs[0], name=name)


def _head(x, num_classes: int, name: str, output: str = "softmax"):
    # float32 under a mixed policy too: the bias gradient sums the loss gradient over every voxel, and a
    # bfloat16 sum of ~10^4 terms lost 90 % of it (tests/test_precision.py); the 1×1×1 convolution is cheap
    logits = layers.Conv3D(num_classes, 1, name=f"{name}_logits", dtype="float32")(x)
    # "linear" keeps the logits (in float32); the layer name stays the output's name either way
    activation = {"softmax": "softmax", "sigmoid": "sigmoid"}.get(output, "linear")
    return layers.Activation(activation, dtype="float32", name=name)(logits)


def outputs_logits(model: keras.Model) -> bool:
    """True if the model's first (full-resolution) output is a logits head (a linear activation).

    Any other last layer, e.g. a softmax or a plain convolution with a softmax activation, counts as
    probabilities.
    """
    last = _output_layer(model)
    return isinstance(last, layers.Activation) and last.activation is keras.activations.linear


def outputs_sigmoid(model: keras.Model) -> bool:
    """True if the model's first output is a sigmoid head (region-based: one probability per region)."""
    last = _output_layer(model)
    return isinstance(last, layers.Activation) and last.activation is keras.activations.sigmoid


def probability_model(model: keras.Model) -> keras.Model:
    """The network with one output, the full-resolution class probabilities, as a functional model.

    Deep-supervision outputs are dropped; a logits head gets a float32 softmax (a model that already
    outputs probabilities keeps its output tensor as it is). Inference and every export use this.
    """
    _check_functional(model)
    output = model.outputs[0]
    if outputs_logits(model):
        output = layers.Softmax(axis=-1, dtype="float32", name="probabilities")(output)
    return keras.Model(model.inputs, output, name=model.name)


def output_channels(model: keras.Model) -> int:
    """The channels of the model's full-resolution output: what :func:`probability_model` returns, without a copy.

    Parameters
    ----------
    model : keras.Model
        A functional model (a segpipe U-Net, deep supervision or not, in any precision).

    Returns
    -------
    int
        Classes (softmax or logits head) or regions (sigmoid head): a softmax added to a logits head
        and a float32 copy of a mixed-precision network keep the channel count.

    Raises
    ------
    ValueError
        ``model`` is not a functional model (no inputs and outputs).
    """
    _check_functional(model)
    return int(model.outputs[0].shape[-1])


def _check_functional(model: keras.Model) -> None:
    if not getattr(model, "inputs", None) or not getattr(model, "outputs", None):
        raise ValueError(expected("a functional Keras model (with inputs and outputs)", key="model",
                                  received=Received(type(model).__name__)))


def _output_layer(model: keras.Model):
    first = model.outputs[0]
    for layer in reversed(model.layers):
        try:
            if any(node_output is first for node_output in keras.tree.flatten(layer.output)):
                return layer
        except (AttributeError, ValueError):  # a layer without a single output node
            continue
    return None
