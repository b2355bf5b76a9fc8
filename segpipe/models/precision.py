"""``train.precision``: the numeric precision a network trains in, through Keras's dtype policies.

``float32`` trains as before. ``mixed_bfloat16`` and ``mixed_float16`` are Keras's mixed policies,
given to every layer of the network by its builder (``dtype=``; no global policy is set, so tests,
inference and export in the same process are unaffected): variables stay float32, convolutions
run in 16 bits, normalisation layers compute their statistics in float32 (Keras upcasts their
inputs), and the output heads (softmax or logits) are float32 layers, so losses, metrics and
probabilities are float32. ``mixed_float16`` also scales the loss (``keras.optimizers.
LossScaleOptimizer``, dynamic scale): float16 has 5 exponent bits and small gradients would
underflow; bfloat16 has float32's exponent range and needs no scaling.

``auto`` is resolved by the planner, which times a training step in each precision the machine
supports (:func:`segpipe.planning.hardware.supported_precisions`) and writes the fastest into the
plan; a run that was not planned with a time budget trains in float32.
"""
from __future__ import annotations

import keras

from segpipe.errors import expected

PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
SETTINGS = ("auto", *PRECISIONS)


def resolve_precision(setting: str) -> str:
    """The precision a run trains in: ``setting`` itself, or float32 for ``auto`` (not planned).

    Parameters
    ----------
    setting : str
        ``train.precision``.

    Returns
    -------
    str
        One of :data:`PRECISIONS`.

    Raises
    ------
    ValueError
        ``setting`` is not one of :data:`SETTINGS`.

    Examples
    --------
    >>> resolve_precision("auto"), resolve_precision("mixed_bfloat16")
    ('float32', 'mixed_bfloat16')
    """
    if setting not in SETTINGS:
        raise ValueError(expected(f"one of {list(SETTINGS)}", key="train.precision", received=setting))
    return "float32" if setting == "auto" else setting


def model_dtype(precision: str) -> str | None:
    """The ``dtype=`` a model builder gets: None for float32 (the network as it always was, layer configs
    included), else the mixed policy's name.

    Examples
    --------
    >>> model_dtype("float32") is None, model_dtype("mixed_float16")
    (True, 'mixed_float16')
    """
    precision = resolve_precision(precision)
    return None if precision == "float32" else precision


def wrap_optimizer(optimizer: keras.optimizers.Optimizer, precision: str) -> keras.optimizers.Optimizer:
    """``optimizer`` with dynamic loss scaling for ``mixed_float16``, else unchanged.

    The training loop multiplies the loss by ``optimizer.scale_loss`` before the gradients; the
    LossScaleOptimizer divides them again, skips a step whose gradients are not finite and halves
    the scale (doubling it after 2000 finite steps), so a float16 overflow costs one step, not the run.
    """
    if (resolve_precision(precision) == "mixed_float16"
            and not isinstance(optimizer, keras.optimizers.LossScaleOptimizer)):
        return keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def float32_model(model: keras.Model) -> keras.Model:
    """The same network with every layer in float32 and the same weights (a new model; ``model`` is unchanged).

    What an export needs from a network trained in a mixed precision: ONNX (tf2onnx) cannot convert
    bfloat16 casts, and a deployed model should not depend on the training hardware's 16-bit units.
    The variables of a mixed-precision model are float32 already, so the weights carry over exactly.
    A model whose layers are all float32 is returned as it is.

    Parameters
    ----------
    model : keras.Model
        A functional model (a segpipe U-Net, deep supervision or not).

    Returns
    -------
    keras.Model
    """
    if all(layer.dtype_policy.name == "float32" for layer in model.layers):
        return model

    def float32_layer(layer: keras.layers.Layer) -> keras.layers.Layer:
        config = layer.get_config()
        config["dtype"] = "float32"
        return layer.__class__.from_config(config)

    clone = keras.models.clone_model(model, clone_function=float32_layer)
    clone.set_weights(model.get_weights())
    return clone
