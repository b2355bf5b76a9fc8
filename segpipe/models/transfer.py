"""Start from a trained network: copy every weight whose layer path and shape match.

:func:`transfer_weights` fills a freshly built network from a source network's weights, matched by
variable path (``enc0_conv0/kernel``: layer name and variable), and reports what happened to each:

- **loaded**: same path and shape, copied as it is;
- **adapted**: the first convolution when the number of input channels differs. Every target input
  channel gets the mean of the source's input filters, scaled by ``C_source / C_target`` so that
  channels of similar intensity give the same pre-activation as before (a 1-channel MRI network
  started on 2 channels, or a 4-channel one on 1);
- **new**: no variable of that path, or another shape that is not the first convolution's input
  axis (the output heads when the classes differ, a stage with other features): kept as initialised.

The transfer is refused when nothing matches (another architecture, a different naming): starting
from random weights by accident would look like fine-tuning but is not.

Examples
--------
>>> import numpy as np
>>> from segpipe.models.unet3d import build_unet3d
>>> source = build_unet3d(1, 3, depth=2, base_filters=4)
>>> target = build_unet3d(2, 4, depth=2, base_filters=4)
>>> report = transfer_weights(target, variable_arrays(source))
>>> report["adapted"], len(report["loaded"]) > 0, sorted(report["new"])
(['enc0_conv0/kernel'], True, ['out0_logits/bias', 'out0_logits/kernel'])
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from segpipe.errors import Received, expected


def variable_arrays(model) -> dict[str, np.ndarray]:
    """``{variable path: array}`` of every weight of ``model`` (trainable and not: normalisation statistics too)."""
    return {v.path: np.asarray(v.numpy()) for v in model.weights}


def first_conv_kernel(model) -> str | None:
    """Path of the kernel of the first convolution after the input (the layer whose input axis follows the channels)."""
    for layer in model.layers:
        if layer.__class__.__name__ in ("Conv3D", "Conv2D") and getattr(layer, "kernel", None) is not None:
            return layer.kernel.path
    return None


def transfer_weights(target, source: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Copy ``source`` weights into ``target`` where path and shape match; adapt the first convolution.

    Parameters
    ----------
    target
        The freshly built Keras network (its weights are changed in place).
    source
        ``{variable path: array}`` of the trained network (:func:`variable_arrays`).

    Returns
    -------
    dict
        ``loaded``, ``adapted`` and ``new``: sorted variable paths; ``new_reasons``: path -> why
        (``"not in the source"`` or ``"shape (…) vs the source's (…)"``).

    Raises
    ------
    ValueError
        No variable of ``target`` matches any of ``source``.
    """
    first = first_conv_kernel(target)
    loaded, adapted, new, reasons = [], [], [], {}
    for variable in target.weights:
        path, shape = variable.path, tuple(variable.shape)
        array = source.get(path)
        if array is None:
            new.append(path)
            reasons[path] = "not in the source"
        elif tuple(array.shape) == shape:
            variable.assign(array.astype(variable.dtype))
            loaded.append(path)
        elif path == first and array.ndim == len(shape) and array.shape[:-2] == shape[:-2] \
                and array.shape[-1] == shape[-1]:
            variable.assign(adapt_input_channels(array, shape[-2]).astype(variable.dtype))
            adapted.append(path)
        else:
            new.append(path)
            reasons[path] = f"shape {shape} vs the source's {tuple(array.shape)}"
    if not loaded and not adapted:
        raise ValueError(expected(
            "a source network sharing layers (path and shape) with the one to train", key="init_from",
            received=Received(f"no match among {len(source)} source variables (e.g. {sorted(source)[:3]}) and "
                              f"{len(target.weights)} target ones (e.g. {[v.path for v in target.weights[:3]]})")))
    return {"loaded": sorted(loaded), "adapted": sorted(adapted), "new": sorted(new), "new_reasons": reasons}


def adapt_input_channels(kernel: np.ndarray, channels: int) -> np.ndarray:
    """A first-convolution kernel (..., C_source, F) for ``channels`` inputs: each gets the mean of the
    source's input filters times ``C_source / channels`` (the pre-activation of equal channels is kept).

    Examples
    --------
    >>> k = np.arange(8, dtype=float).reshape(1, 1, 1, 2, 4)  # 2 input channels, 4 filters
    >>> adapt_input_channels(k, 1)[0, 0, 0, 0].tolist()  # the sum: one channel carries both
    [4.0, 6.0, 8.0, 10.0]
    """
    source_channels = kernel.shape[-2]
    mean = kernel.mean(axis=-2, keepdims=True) * (source_channels / channels)
    return np.repeat(mean, channels, axis=-2)
