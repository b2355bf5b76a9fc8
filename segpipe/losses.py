"""Segmentation losses: Dice, generalized Dice, Tversky, IoU, focal Tversky, cross-entropy, focal.

Every loss is a pure function written with ``keras.ops`` only (backend-agnostic), wrapped by a thin
``keras.losses.Loss`` subclass that validates its options at construction and has ``get_config``.
Losses are selected by name or config dict through :func:`get_loss`.

Conventions
-----------
Inputs
    ``y_true`` one-hot and ``y_pred`` class probabilities (softmax output) of the same shape,
    channels last, any rank >= 3: ``(B, X, C)``, ``(B, X, Y, C)``, ``(B, X, Y, Z, C)``.
    ``from_logits=True`` applies a softmax over the channel axis inside the loss. A shape
    mismatch raises ``ValueError`` naming both shapes (dimensions known when the function is
    traced are checked).
Notation
    p = prediction, g = ground truth. For sample b and class c, summing over the spatial axes::

        TP = sum p * g        FP = sum p * (1 - g)        FN = sum (1 - p) * g

    (so 2TP + FP + FN = sum p + sum g).
Reduction
    Region losses (dice, generalized_dice, tversky, iou, focal_tversky) compute one value per sample
    and class, then the class mean (weighted by ``class_weights`` if given:
    ``sum_c w_c l_bc / sum_c w_c``), then the mean over the batch. ``batch=True`` sums TP, FP and FN
    over the batch axis too before taking the ratio (nnU-Net's "batch Dice"), giving one value per
    class. Generalized Dice sums over classes inside its ratio, so it has no class mean.
    Voxel losses (cross_entropy, focal) compute one value per voxel, then the mean over voxels and
    samples.
Smoothing
    ``smooth_nr`` is added to the numerator and ``smooth_dr`` to the denominator of every ratio
    (default 1e-5 each). With equal values, a class absent from both reference and prediction
    scores 1 (loss 0); a class absent from the reference but predicted scores about
    ``smooth_nr / (FP + smooth_dr)``, i.e. loss close to 1.
``include_background``
    ``False`` drops channel 0 after the softmax (which is always taken over all C channels).
    Default ``True``.
Class weights
    ``class_weights`` has one non-negative entry per *scored* class: C entries, or C - 1 with
    ``include_background=False``. For region losses they weight the class mean; for cross-entropy
    they multiply the per-class terms (the voxel mean is then a plain mean, not divided by the
    weights as PyTorch's ``CrossEntropyLoss`` does).
dtype
    Both inputs are cast to float32 before anything else (including the softmax), so float16 or
    bfloat16 model outputs (mixed precision) are accumulated in float32; the result is float32.
Logarithms
    ``log p = log(clip(p, 1e-7, 1))``, or ``log_softmax`` of the logits with ``from_logits=True``.

Options are validated when a loss object is built (``ValueError`` in the Keras form "Expected ...
Received: arg=value"); :func:`validate_loss_config` also checks lengths against the number of
classes, so configuration errors surface before training starts. The pure functions do not
re-validate their options.

Deep supervision: :class:`DeepSupervisionLoss` wraps any of these losses for a list of outputs at
decreasing resolution.

Example::

    >>> loss = get_loss("tversky", alpha=0.3, beta=0.7)
    >>> y_true = keras.ops.one_hot(keras.ops.zeros((2, 4, 4, 4), "int32"), 3)
    >>> float(loss(y_true, y_true))  # perfect prediction
    0.0
"""
from __future__ import annotations

import difflib
import inspect
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import keras
from keras import ops

__all__ = [
    "ALIASES", "LOSSES", "EPSILON",
    "dice_loss", "generalized_dice_loss", "tversky_loss", "iou_loss", "focal_tversky_loss",
    "cross_entropy_loss", "focal_loss",
    "SegmentationLoss", "DiceLoss", "GeneralizedDiceLoss", "TverskyLoss", "IoULoss",
    "FocalTverskyLoss", "CrossEntropyLoss", "FocalLoss", "CompoundLoss", "DeepSupervisionLoss",
    "available_losses", "deep_supervision_weights", "get_loss", "validate_loss_config",
]

EPSILON = 1e-7
"""Lower clip value for probabilities inside logarithms (as ``keras.backend.epsilon()``)."""

_SERIALIZABLE = keras.saving.register_keras_serializable(package="segpipe")


# --------------------------------------------------------------------------------------------
# Shared preprocessing (activation, label smoothing, background drop, TP/FP/FN, reductions)
# --------------------------------------------------------------------------------------------
def _shape_str(x) -> str:
    return "(" + ", ".join("None" if d is None else str(d) for d in x.shape) + ")"


def _prepare(y_true, y_pred, *, from_logits: bool, include_background: bool,
             label_smoothing: float = 0.0, with_log: bool = False):
    """Check shapes, cast to float32, apply softmax / smoothing, drop background.

    Returns ``(g, p, log_p)``; ``log_p`` is ``None`` unless ``with_log``.
    """
    if isinstance(y_pred, (list, tuple)):
        raise ValueError("Expected a single `y_pred` tensor; for a list of deep-supervision "
                         "outputs wrap the loss in DeepSupervisionLoss. "
                         f"Received: len(y_pred)={len(y_pred)}")
    y_true = ops.convert_to_tensor(y_true)
    y_pred = ops.convert_to_tensor(y_pred)
    if len(y_pred.shape) < 3:
        raise ValueError(
            "Expected `y_pred` of rank >= 3 (batch, spatial..., classes), channels last. "
            f"Received: y_pred.shape={_shape_str(y_pred)}")
    if len(y_true.shape) != len(y_pred.shape) or any(
            a is not None and b is not None and a != b for a, b in zip(y_true.shape, y_pred.shape)):
        raise ValueError(
            "Expected `y_true` (one-hot) and `y_pred` to have the same shape. "
            f"Received: y_true.shape={_shape_str(y_true)}, y_pred.shape={_shape_str(y_pred)}")
    g = ops.cast(y_true, "float32")
    logits_or_p = ops.cast(y_pred, "float32")
    if label_smoothing:
        num_classes = ops.cast(ops.shape(g)[-1], "float32")
        g = g * (1.0 - label_smoothing) + label_smoothing / num_classes
    log_p = None
    if from_logits:
        p = ops.softmax(logits_or_p, axis=-1)
        if with_log:
            log_p = ops.log_softmax(logits_or_p, axis=-1)
    else:
        p = logits_or_p
        if with_log:
            log_p = ops.log(ops.clip(p, EPSILON, 1.0))
    if not include_background:
        g, p = g[..., 1:], p[..., 1:]
        log_p = None if log_p is None else log_p[..., 1:]
    return g, p, log_p


def _spatial_sum(x, batch: bool):
    """Sum over spatial axes -> (B, C); with ``batch`` also over the batch axis -> (1, C)."""
    s = ops.sum(x, axis=tuple(range(1, len(x.shape) - 1)))
    return ops.sum(s, axis=0, keepdims=True) if batch else s


def _region_stats(y_true, y_pred, *, from_logits: bool, include_background: bool, batch: bool):
    """Shared front end of the region losses: ``(g, p, TP, FP, FN)``, counts of shape (B|1, C)."""
    g, p, _ = _prepare(y_true, y_pred, from_logits=from_logits,
                       include_background=include_background)
    tp = _spatial_sum(p * g, batch)
    fp = _spatial_sum(p * (1.0 - g), batch)
    fn = _spatial_sum((1.0 - p) * g, batch)
    return g, p, tp, fp, fn


def _power_from_zero(x, gamma: float):
    """``max(x, 0) ** gamma`` with 0 ** gamma = 0 and a finite (zero) gradient there.

    A plain power has an infinite derivative at 0 when gamma < 1; the double ``where`` keeps the
    gradient finite. In float32, 1 - p and 1 - TI are 0 or >= 6e-8, so the power's derivative is
    bounded elsewhere.
    """
    x = ops.maximum(x, 0.0)
    positive = x > 0
    safe = ops.where(positive, x, ops.ones_like(x))
    return ops.where(positive, ops.power(safe, gamma), ops.zeros_like(x))


def _per_class_vector(values, num_scored, *, what: str, include_background: bool):
    """Convert a per-scored-class option to a float32 vector, checking its length."""
    if num_scored is not None and len(values) != num_scored:
        raise ValueError(
            f"Expected `{what}` to have one entry per scored class: {num_scored} "
            f"(include_background={include_background}). Received: {what}={list(values)}")
    return ops.convert_to_tensor([float(v) for v in values], dtype="float32")


def _class_mean_then_batch_mean(loss_bc, class_weights, include_background: bool):
    """(B|1, C) per-sample per-class losses -> weighted class mean -> batch mean (scalar)."""
    if class_weights is None:
        return ops.mean(loss_bc)
    w = _per_class_vector(class_weights, loss_bc.shape[-1], what="class_weights",
                          include_background=include_background)
    return ops.mean(ops.sum(loss_bc * w, axis=-1) / ops.sum(w))


# --------------------------------------------------------------------------------------------
# Pure loss functions
# --------------------------------------------------------------------------------------------
def dice_loss(y_true, y_pred, *, squared_pred: bool = False, include_background: bool = True,
              batch: bool = False, class_weights: Sequence[float] | None = None,
              smooth_nr: float = 1e-5, smooth_dr: float = 1e-5, from_logits: bool = False):
    """Soft Dice loss.

    Formula::

        loss_bc = 1 - (2 TP + smooth_nr) / (2 TP + FP + FN + smooth_dr)
        squared_pred=True (V-Net):  1 - (2 TP + smooth_nr) / (sum p^2 + sum g^2 + smooth_dr)

    then the (weighted) class mean and the batch mean (see the module conventions).

    Args:
        squared_pred: use squared terms in the denominator (Milletari et al.). Defaults to False.
        include_background, batch, class_weights, smooth_nr, smooth_dr, from_logits: see the
            module docstring.

    Returns:
        Scalar float32 loss in [0, 1].

    Reference:
        Milletari, Navab, Ahmadi. V-Net. 3DV 2016, arXiv:1606.04797.
    """
    g, p, tp, fp, fn = _region_stats(y_true, y_pred, from_logits=from_logits,
                                     include_background=include_background, batch=batch)
    if squared_pred:
        denominator = _spatial_sum(p * p, batch) + _spatial_sum(g * g, batch)
    else:
        denominator = 2.0 * tp + fp + fn
    loss_bc = 1.0 - (2.0 * tp + smooth_nr) / (denominator + smooth_dr)
    return _class_mean_then_batch_mean(loss_bc, class_weights, include_background)


def generalized_dice_loss(y_true, y_pred, *, weight_type: str = "square",
                          include_background: bool = True, batch: bool = False,
                          smooth_nr: float = 1e-5, smooth_dr: float = 1e-5,
                          from_logits: bool = False):
    """Generalized Dice loss (Sudre et al.).

    Formula (per sample, or over the whole batch with ``batch=True``)::

        loss_b = 1 - (2 sum_c w_c TP_c + smooth_nr) / (sum_c w_c (2 TP_c + FP_c + FN_c) + smooth_dr)
        w_c = 1 / (sum g_c)^2  (square) | 1 / sum g_c  (simple) | 1  (uniform)

    then the mean over samples. Absent-class policy: a class with ``sum g_c = 0`` in the sample
    (or in the batch with ``batch=True``) has an infinite weight; it takes the largest weight of the
    classes present in that sample (batch), as in MONAI and NiftyNet, so predicting an absent class
    is penalised like the smallest present structure. If no scored class is present (only possible
    with ``include_background=False`` on an all-background sample) all weights are 1, so false
    positives are still penalised (MONAI uses 0 there, which gives no gradient). The weights depend
    on ``y_true`` only and carry no gradient; no division by zero happens, so gradients stay finite.

    Args:
        weight_type: "square", "simple" or "uniform". Defaults to "square".
        include_background, batch, smooth_nr, smooth_dr, from_logits: see the module docstring.

    Returns:
        Scalar float32 loss in [0, 1].

    Reference:
        Sudre, Li, Vercauteren, Ourselin, Cardoso. Generalised Dice overlap as a deep learning loss
        function for highly unbalanced segmentations. DLMIA 2017, arXiv:1707.03237.
    """
    _, _, tp, fp, fn = _region_stats(y_true, y_pred, from_logits=from_logits,
                                     include_background=include_background, batch=batch)
    volume = tp + fn  # = sum g
    if weight_type == "uniform":
        w = ops.ones_like(volume)
    else:
        present = volume > 0
        safe = ops.where(present, volume, ops.ones_like(volume))
        w = 1.0 / (safe * safe if weight_type == "square" else safe)
        w = ops.where(present, w, ops.zeros_like(w))
        largest = ops.max(w, axis=-1, keepdims=True)
        w = ops.where(present, w, largest)
        w = ops.where(largest > 0, w, ops.ones_like(w))  # no class present at all
        w = ops.stop_gradient(w)
    numerator = 2.0 * ops.sum(w * tp, axis=-1) + smooth_nr
    denominator = ops.sum(w * (2.0 * tp + fp + fn), axis=-1) + smooth_dr
    return ops.mean(1.0 - numerator / denominator)


def tversky_loss(y_true, y_pred, *, alpha: float = 0.5, beta: float = 0.5,
                 include_background: bool = True, batch: bool = False,
                 class_weights: Sequence[float] | None = None,
                 smooth_nr: float = 1e-5, smooth_dr: float = 1e-5, from_logits: bool = False):
    """Tversky loss; ``alpha`` weights false positives, ``beta`` false negatives.

    Formula::

        TI_bc = (TP + smooth_nr) / (TP + alpha FP + beta FN + smooth_dr),   loss_bc = 1 - TI_bc

    alpha = beta = 0.5 is the Dice loss and alpha = beta = 1 the IoU loss (exactly so without
    smoothing). beta > alpha favours recall (Salehi et al. recommend alpha=0.3, beta=0.7).

    Args:
        alpha: weight of FP, >= 0. Defaults to 0.5.
        beta: weight of FN, >= 0. Defaults to 0.5.
        include_background, batch, class_weights, smooth_nr, smooth_dr, from_logits: see the
            module docstring.

    Reference:
        Salehi, Erdogmus, Gholipour. Tversky loss function for image segmentation using 3D fully
        convolutional deep networks. MLMI 2017, arXiv:1706.05721.
    """
    _, _, tp, fp, fn = _region_stats(y_true, y_pred, from_logits=from_logits,
                                     include_background=include_background, batch=batch)
    loss_bc = 1.0 - (tp + smooth_nr) / (tp + alpha * fp + beta * fn + smooth_dr)
    return _class_mean_then_batch_mean(loss_bc, class_weights, include_background)


def iou_loss(y_true, y_pred, *, include_background: bool = True, batch: bool = False,
             class_weights: Sequence[float] | None = None,
             smooth_nr: float = 1e-5, smooth_dr: float = 1e-5, from_logits: bool = False):
    """Soft IoU (Jaccard) loss.

    Formula::

        loss_bc = 1 - (TP + smooth_nr) / (TP + FP + FN + smooth_dr)

    Reference:
        Rahman, Wang. Optimizing intersection-over-union in deep neural networks for image
        segmentation. ISVC 2016, doi:10.1007/978-3-319-50835-1_22.
    """
    _, _, tp, fp, fn = _region_stats(y_true, y_pred, from_logits=from_logits,
                                     include_background=include_background, batch=batch)
    loss_bc = 1.0 - (tp + smooth_nr) / (tp + fp + fn + smooth_dr)
    return _class_mean_then_batch_mean(loss_bc, class_weights, include_background)


def focal_tversky_loss(y_true, y_pred, *, alpha: float = 0.3, beta: float = 0.7,
                       gamma: float = 0.75, include_background: bool = True, batch: bool = False,
                       class_weights: Sequence[float] | None = None,
                       smooth_nr: float = 1e-5, smooth_dr: float = 1e-5,
                       from_logits: bool = False):
    """Focal Tversky loss.

    Formula::

        loss_bc = (1 - TI_bc) ** gamma     (TI_bc as in :func:`tversky_loss`)

    At a perfect prediction (TI = 1) the loss and its gradient are 0, also for gamma < 1 where the
    plain power's derivative would be infinite. Abraham & Khan
    write the exponent as 1/gamma with their gamma = 4/3 and weight FN by their alpha = 0.7; the
    defaults here (alpha=0.3 on FP, beta=0.7 on FN, gamma=0.75) are that setting.

    Args:
        alpha: weight of FP, >= 0. Defaults to 0.3.
        beta: weight of FN, >= 0. Defaults to 0.7.
        gamma: exponent, > 0 (< 1 focuses on hard classes). Defaults to 0.75.

    Reference:
        Abraham, Khan. A novel focal Tversky loss function with improved attention U-Net for lesion
        segmentation. ISBI 2019, arXiv:1810.07842.
    """
    _, _, tp, fp, fn = _region_stats(y_true, y_pred, from_logits=from_logits,
                                     include_background=include_background, batch=batch)
    tversky_index = (tp + smooth_nr) / (tp + alpha * fp + beta * fn + smooth_dr)
    loss_bc = _power_from_zero(1.0 - tversky_index, gamma)
    return _class_mean_then_batch_mean(loss_bc, class_weights, include_background)


def cross_entropy_loss(y_true, y_pred, *, class_weights: Sequence[float] | None = None,
                       label_smoothing: float = 0.0, include_background: bool = True,
                       from_logits: bool = False):
    """Categorical cross-entropy, mean over voxels.

    Formula::

        l_v = - sum_c w_c g_c log p_c,     loss = mean over voxels v and samples b

    with ``g <- g (1 - label_smoothing) + label_smoothing / C`` (C = all channels, as in Keras)
    and w_c = 1 without ``class_weights``.

    Args:
        class_weights: one weight per scored class; the mean is not renormalised by the weights.
        label_smoothing: in [0, 1). Defaults to 0.
        include_background: False drops the class-0 term. Defaults to True.
        from_logits: see the module docstring.

    Reference:
        Label smoothing: Szegedy et al. Rethinking the Inception architecture. CVPR 2016,
        arXiv:1512.00567.
    """
    g, _, log_p = _prepare(y_true, y_pred, from_logits=from_logits,
                           include_background=include_background,
                           label_smoothing=label_smoothing, with_log=True)
    terms = g * log_p
    if class_weights is not None:
        terms = terms * _per_class_vector(class_weights, terms.shape[-1], what="class_weights",
                                          include_background=include_background)
    return -ops.mean(ops.sum(terms, axis=-1))


def focal_loss(y_true, y_pred, *, gamma: float = 2.0,
               alpha: float | Sequence[float] | None = None, include_background: bool = True,
               from_logits: bool = False):
    """Focal loss (softmax form), mean over voxels.

    Formula::

        l_v = - sum_c alpha_c (1 - p_c)^gamma g_c log p_c,   loss = mean over voxels

    (with a zero, finite gradient of the power at p_c = 1 for gamma < 1).

    Args:
        gamma: focusing parameter, > 0. Defaults to 2.
        alpha: None (alpha_c = 1), a number a in [0, 1] (alpha_0 = 1 - a for the background and
            alpha_c = a for every other class, Lin et al.'s binary convention), or one non-negative
            weight per scored class. Defaults to None.
        include_background, from_logits: see the module docstring.

    Reference:
        Lin, Goyal, Girshick, He, Dollar. Focal loss for dense object detection. ICCV 2017,
        arXiv:1708.02002.
    """
    g, p, log_p = _prepare(y_true, y_pred, from_logits=from_logits,
                           include_background=include_background, with_log=True)
    terms = _power_from_zero(1.0 - p, gamma) * g * log_p
    if isinstance(alpha, numbers.Real):
        num_foreground = p.shape[-1] - (1 if include_background else 0)
        full = [1.0 - alpha] + [float(alpha)] * num_foreground
        alpha = full if include_background else full[1:]
    if alpha is not None:
        terms = terms * _per_class_vector(alpha, terms.shape[-1], what="alpha",
                                          include_background=include_background)
    return -ops.mean(ops.sum(terms, axis=-1))


# --------------------------------------------------------------------------------------------
# Option validation (shared by all losses; "Expected ... Received: arg=value")
# --------------------------------------------------------------------------------------------
def _invalid(loss: str, key: str, expected: str, value: Any) -> ValueError:
    hint = ""
    if isinstance(value, str):
        try:
            float(value)
            hint = " (YAML reads numbers such as 1e-5 without a dot as strings; write 1.0e-5)"
        except ValueError:
            if value.lower() in ("true", "false"):
                hint = " (write an unquoted true/false)"
    return ValueError(f"Invalid value for option `{key}` of loss '{loss}'. Expected {expected}. "
                      f"Received: {key}={value!r}{hint}")


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _boolean(loss, key, v):
    if not isinstance(v, bool):
        raise _invalid(loss, key, "a boolean", v)
    return v


def _number(low: float, high: float = math.inf, *, low_open=False, high_open=False):
    def check(loss, key, v):
        ok = _is_number(v) and (v > low if low_open else v >= low) and (
            v < high if high_open else v <= high)
        if not ok:
            if high == math.inf:
                expected = f"a number {'>' if low_open else '>='} {low:g}"
            else:
                expected = (f"a number in {'(' if low_open else '['}{low:g}, "
                            f"{high:g}{')' if high_open else ']'}")
            raise _invalid(loss, key, expected, v)
        return float(v)
    return check


def _is_list_like(v) -> bool:
    return hasattr(v, "__iter__") and hasattr(v, "__len__") and not isinstance(
        v, (str, bytes, Mapping))


def _weights(loss, key, v):
    if v is None:
        return None
    if (not _is_list_like(v) or len(v) == 0
            or not all(_is_number(x) and x >= 0 for x in v) or sum(v) <= 0):
        raise _invalid(loss, key, "null or a non-empty list of non-negative numbers with a "
                                  "positive sum (one per scored class)", v)
    return [float(x) for x in v]


def _focal_alpha(loss, key, v):
    if v is None:
        return None
    return _weights(loss, key, v) if _is_list_like(v) else _number(0.0, 1.0)(loss, key, v)


def _weight_type(loss, key, v):
    if v not in ("square", "simple", "uniform"):
        raise _invalid(loss, key, "one of ['square', 'simple', 'uniform']", v)
    return v


_VALIDATORS: dict[str, Callable] = {
    "include_background": _boolean, "batch": _boolean, "from_logits": _boolean,
    "squared_pred": _boolean, "smooth_nr": _number(0.0), "smooth_dr": _number(0.0),
    "alpha": _number(0.0), "beta": _number(0.0), "gamma": _number(0.0, low_open=True),
    "class_weights": _weights, "label_smoothing": _number(0.0, 1.0, high_open=True),
    "weight_type": _weight_type,
}


# --------------------------------------------------------------------------------------------
# Loss classes and registry
# --------------------------------------------------------------------------------------------
LOSSES: dict[str, type[SegmentationLoss]] = {}
"""Registry name -> loss class."""
ALIASES: dict[str, str] = {"jaccard": "iou", "ce": "cross_entropy"}


def _register(name: str):
    def decorate(cls):
        cls.registry_name = name
        LOSSES[name] = cls
        return _SERIALIZABLE(cls)
    return decorate


class SegmentationLoss(keras.losses.Loss):
    """Base class: a validated set of options forwarded to a pure loss function.

    The accepted options and their defaults are the keyword-only parameters of ``fn``. ``call``
    returns the scalar loss (already reduced over classes and batch).
    """

    registry_name: str = ""
    fn: Callable = staticmethod(lambda y_true, y_pred: None)
    _validators: dict[str, Callable] = {}

    def __init__(self, *, name: str | None = None, reduction: str | None = "sum_over_batch_size",
                 dtype=None, **options: Any):
        defaults = self.defaults()
        for key in options:
            if key not in defaults:
                close = difflib.get_close_matches(key, list(defaults), n=1)
                raise ValueError(
                    f"Unknown option `{key}` for loss '{self.registry_name}'."
                    + (f" Did you mean `{close[0]}`?" if close else "")
                    + f" Expected one of {sorted(defaults)}. Received: {key}={options[key]!r}")
        merged = {**defaults, **options}
        self.options = {key: self._validators.get(key, _VALIDATORS[key])(self.registry_name, key, v)
                        for key, v in merged.items()}
        self._check_options()
        super().__init__(name=name or self.registry_name, reduction=reduction, dtype=dtype)

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Option name -> default value, read from the pure function's signature."""
        return {p.name: p.default for p in inspect.signature(cls.fn).parameters.values()
                if p.kind is p.KEYWORD_ONLY}

    def _check_options(self) -> None:
        """Hook for checks involving several options."""

    def call(self, y_true, y_pred):
        return self.fn(y_true, y_pred, **self.options)

    def check_num_classes(self, num_classes: int) -> None:
        """Check per-class options against the number of output channels (incl. background)."""
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"Expected `num_classes` to be a positive integer. "
                             f"Received: num_classes={num_classes!r}")
        include_background = self.options["include_background"]
        scored = num_classes - (0 if include_background else 1)
        if scored < 1:
            raise ValueError(
                f"Loss '{self.registry_name}' with include_background=False needs at least 2 "
                f"classes. Received: num_classes={num_classes}")
        for key in ("class_weights", "alpha"):
            value = self.options.get(key)
            if isinstance(value, list) and len(value) != scored:
                raise ValueError(
                    f"Expected `{key}` of loss '{self.registry_name}' to have one entry per scored "
                    f"class: {scored} (num_classes={num_classes}, include_background="
                    f"{include_background}). Received: {key}={value}")

    def to_spec(self) -> dict[str, Any]:
        """Minimal config-file form: ``{"name": ..., <non-default options>}``."""
        defaults = self.defaults()
        return {"name": self.registry_name,
                **{k: v for k, v in self.options.items() if v != defaults[k]}}

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), **self.options}

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.to_spec().items() if k != "name")
        return f"{type(self).__name__}({options})"


@_register("dice")
class DiceLoss(SegmentationLoss):
    """Soft Dice loss; formula and options in :func:`dice_loss`."""
    fn = staticmethod(dice_loss)


@_register("generalized_dice")
class GeneralizedDiceLoss(SegmentationLoss):
    """Generalized Dice loss; formula, options and absent-class policy in
    :func:`generalized_dice_loss`."""
    fn = staticmethod(generalized_dice_loss)


class _AlphaBetaMixin:
    def _check_options(self) -> None:
        if self.options["alpha"] + self.options["beta"] <= 0:
            raise ValueError(
                f"Expected alpha + beta > 0 for loss '{self.registry_name}' (otherwise the loss "
                f"is constant). Received: alpha={self.options['alpha']}, "
                f"beta={self.options['beta']}")


@_register("tversky")
class TverskyLoss(_AlphaBetaMixin, SegmentationLoss):
    """Tversky loss (alpha on FP, beta on FN); see :func:`tversky_loss`."""
    fn = staticmethod(tversky_loss)


@_register("iou")
class IoULoss(SegmentationLoss):
    """Soft IoU / Jaccard loss; see :func:`iou_loss`."""
    fn = staticmethod(iou_loss)


@_register("focal_tversky")
class FocalTverskyLoss(_AlphaBetaMixin, SegmentationLoss):
    """Focal Tversky loss; see :func:`focal_tversky_loss`."""
    fn = staticmethod(focal_tversky_loss)


@_register("cross_entropy")
class CrossEntropyLoss(SegmentationLoss):
    """Categorical cross-entropy; see :func:`cross_entropy_loss`."""
    fn = staticmethod(cross_entropy_loss)


@_register("focal")
class FocalLoss(SegmentationLoss):
    """Focal loss; see :func:`focal_loss`."""
    fn = staticmethod(focal_loss)
    _validators = {"alpha": _focal_alpha}


@_SERIALIZABLE
class CompoundLoss(keras.losses.Loss):
    """Weighted sum of losses: ``sum_i lambda_i * loss_i(y_true, y_pred)``.

    Args:
        terms: a sequence whose items are config dicts ``{"name": ..., "weight": 1.0, <options>}``
            (``weight`` defaults to 1), loss names, or ``(weight, loss)`` pairs of segpipe losses.

    Example: ``CompoundLoss([{"name": "dice", "include_background": False}, {"name": "ce"}])`` is
    nnU-Net's default Dice + CE (nnU-Net keeps the background in the CE term).
    """

    def __init__(self, terms: Sequence[Any], *, name: str | None = "compound",
                 reduction: str | None = "sum_over_batch_size", dtype=None):
        if isinstance(terms, (str, bytes, Mapping)) or not isinstance(terms, Sequence) or not terms:
            raise ValueError("Expected `terms` to be a non-empty list of loss configs. "
                             f"Received: terms={terms!r}")
        self.terms = [self._parse_term(t) for t in terms]
        if sum(w for w, _ in self.terms) <= 0:
            raise ValueError("Expected at least one compound term with a positive weight. "
                             f"Received: weights={[w for w, _ in self.terms]}")
        super().__init__(name=name, reduction=reduction, dtype=dtype)

    @staticmethod
    def _parse_term(term):
        if isinstance(term, Mapping):
            term = dict(term)
            weight, loss = term.pop("weight", 1.0), get_loss(term)
        elif isinstance(term, str):
            weight, loss = 1.0, get_loss(term)
        elif (isinstance(term, (tuple, list)) and len(term) == 2
              and isinstance(term[1], (SegmentationLoss, CompoundLoss))):
            weight, loss = term
        else:
            raise ValueError("Expected a compound term to be a config dict, a loss name or a "
                             f"(weight, loss) pair. Received: term={term!r}")
        if not (_is_number(weight) and weight >= 0):
            raise ValueError("Expected the `weight` of a compound term to be a non-negative "
                             f"number. Received: weight={weight!r}")
        return float(weight), loss

    def call(self, y_true, y_pred):
        total = 0.0
        for weight, loss in self.terms:
            if weight:
                total = total + weight * loss(y_true, y_pred)
        return total

    def check_num_classes(self, num_classes: int) -> None:
        for _, loss in self.terms:
            loss.check_num_classes(num_classes)

    def to_spec(self) -> dict[str, Any]:
        return {"terms": [{**loss.to_spec(), "weight": w} for w, loss in self.terms]}

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), **self.to_spec()}

    def __repr__(self) -> str:
        return " + ".join(f"{w:g}*{loss!r}" for w, loss in self.terms)


def available_losses() -> list[str]:
    """Sorted registry names and aliases accepted by :func:`get_loss`."""
    return sorted([*LOSSES, *ALIASES])


def _lookup(name: Any) -> type[SegmentationLoss]:
    if not isinstance(name, str):
        raise ValueError(f"Expected the loss `name` to be a string. Received: name={name!r}")
    key = name.strip().lower().replace("-", "_")
    key = ALIASES.get(key, key)
    if key in LOSSES:
        return LOSSES[key]
    valid = available_losses()
    if key == "compound":
        raise ValueError("A compound loss is written as {'terms': [{'name': ..., 'weight': ...}, "
                         f"...]}}. Received: name={name!r}")
    close = difflib.get_close_matches(key, valid, n=1)
    raise ValueError(f"Unknown loss {name!r}." + (f" Did you mean '{close[0]}'?" if close else "")
                     + f" Expected one of {valid}, or a compound {{'terms': [...]}}. "
                     f"Received: name={name!r}")


def get_loss(spec: str | Mapping[str, Any] | keras.losses.Loss, /, *,
             num_classes: int | None = None, **options: Any) -> keras.losses.Loss:
    """Build a loss from a name, a config dict or the compound form.

    Examples::

        get_loss("tversky", alpha=0.3, beta=0.7)
        get_loss({"name": "tversky", "alpha": 0.3})
        get_loss({"terms": [{"name": "dice", "weight": 1}, {"name": "ce", "weight": 1}]})

    Args:
        spec: a registry name or alias (see :func:`available_losses`), a dict with ``name`` and
            options, a dict with ``terms`` (compound; ``name: compound`` optional), or an existing
            segpipe loss (returned as is).
        num_classes: if given, per-class options (``class_weights``, focal ``alpha`` lists) are
            checked against it (number of output channels, background included).
        **options: loss options; they override the dict's entries.

    Returns:
        A ``keras.losses.Loss`` whose call ``(y_true, y_pred)`` returns a float32 scalar.

    Raises:
        ValueError: unknown name (the valid names are listed), unknown or invalid option.
    """
    if isinstance(spec, (SegmentationLoss, CompoundLoss)):
        if options:
            raise ValueError("Options cannot be applied to an already built loss. "
                             f"Received: options={options}")
        loss = spec
    elif isinstance(spec, str):
        loss = _lookup(spec)(**options)
    elif isinstance(spec, Mapping):
        config = {**spec, **options}
        if "terms" in config:
            name = config.pop("name", "compound")
            terms = config.pop("terms")
            if name != "compound" or config:
                raise ValueError("Expected a compound loss config to contain only `terms` (and "
                                 "`name: compound`); options go into each term. Received: "
                                 f"{ {'name': name, **config} }")
            loss = CompoundLoss(terms)
        elif "name" not in config:
            raise ValueError("Expected a loss config with a `name` (or `terms` for a compound "
                             f"loss). Received: {dict(spec)!r}")
        else:
            loss = _lookup(config.pop("name"))(**config)
    else:
        raise ValueError("Expected a loss name, a config dict or a segpipe loss. "
                         f"Received: spec={spec!r}")
    if num_classes is not None:
        loss.check_num_classes(num_classes)
    return loss


def validate_loss_config(config: str | Mapping[str, Any], num_classes: int | None = None) -> None:
    """Raise ``ValueError`` if a loss config section is invalid (for the config loader).

    Builds the loss (which validates names and options) and, if ``num_classes`` is given, checks
    per-class options such as ``class_weights`` against it, taking ``include_background`` into
    account.
    """
    get_loss(config, num_classes=num_classes)


# --------------------------------------------------------------------------------------------
# Deep supervision
# --------------------------------------------------------------------------------------------
def deep_supervision_weights(num_outputs: int) -> list[float]:
    """Weights ``1/2^i`` for outputs i = 0 (full resolution) .. n-1, normalised to sum to 1."""
    if not isinstance(num_outputs, int) or num_outputs < 1:
        raise ValueError(f"Expected `num_outputs` to be a positive integer. "
                         f"Received: num_outputs={num_outputs!r}")
    raw = [0.5 ** i for i in range(num_outputs)]
    return [w / sum(raw) for w in raw]


def _downsample_target(y_true, y_pred, level: int, mode: str):
    """Downsample one-hot ``y_true`` to the spatial shape of ``y_pred`` (integer factors)."""
    in_shape, out_shape = tuple(y_true.shape[1:-1]), tuple(y_pred.shape[1:-1])
    if len(in_shape) != len(out_shape):
        raise ValueError("Expected every deep-supervision output to have the rank of `y_true`. "
                         f"Received: y_true.shape={_shape_str(y_true)}, "
                         f"y_pred[{level}].shape={_shape_str(y_pred)}")
    factors = []
    for n_in, n_out in zip(in_shape, out_shape):
        if n_in is None or n_out is None:  # unknown when traced: assume halving per level
            factors.append(2 ** level)
        elif n_out == 0 or n_in % n_out:
            raise ValueError(
                "Expected each deep-supervision output's spatial size to divide the target's. "
                f"Received: y_true.shape={_shape_str(y_true)}, "
                f"y_pred[{level}].shape={_shape_str(y_pred)}")
        else:
            factors.append(n_in // n_out)
    if all(f == 1 for f in factors):
        return y_true
    if mode == "average":
        return ops.average_pool(y_true, pool_size=tuple(factors), strides=tuple(factors),
                                padding="valid", data_format="channels_last")
    centre = tuple(slice(f // 2, None, f) for f in factors)  # "nearest-exact" sampling
    return y_true[(slice(None), *centre, slice(None))]


@_SERIALIZABLE
class DeepSupervisionLoss(keras.losses.Loss):
    """Apply a loss to several outputs at decreasing resolution and sum with weights.

    ``call(y_true, y_pred)`` takes the full-resolution one-hot ``y_true`` and a list/tuple of
    predictions, full resolution first (e.g. 32^3, 16^3, 8^3). ``y_true`` is downsampled to each
    output's spatial shape (integer factors read from the static shapes, or 2^i per level when they
    are unknown) and the result is ``sum_i w_i * loss(y_true_i, y_pred_i)``.

    Target downsampling: ``"average"`` (default) average-pools the one-hot target, giving soft
    targets equal to the class fractions of each block: structures smaller than the stride do
    not vanish from the coarse targets, per-class volumes are preserved (up to the factor), and it
    is the expectation of nearest sampling over sub-voxel offsets. The region losses and CE accept
    soft targets as they are. ``"nearest"`` takes the centre voxel of each block (hard targets, as
    nnU-Net's nearest-neighbour downsampling of the label map).

    Args:
        loss: a segpipe loss or anything :func:`get_loss` accepts.
        num_outputs: expected number of outputs (checked), or None to accept any number.
        weights: relative weights per output, normalised to sum 1. Defaults to ``1/2^i``
            (:func:`deep_supervision_weights`).
        target_downsampling: "average" or "nearest". Defaults to "average".

    A single tensor ``y_pred`` is treated as a one-element list.
    """

    def __init__(self, loss: Any, num_outputs: int | None = None,
                 weights: Sequence[float] | None = None, target_downsampling: str = "average", *,
                 name: str | None = "deep_supervision",
                 reduction: str | None = "sum_over_batch_size", dtype=None):
        if isinstance(loss, Mapping) and "class_name" in loss:  # from get_config
            loss = keras.saving.deserialize_keras_object(loss)
        self.loss = loss if isinstance(loss, keras.losses.Loss) else get_loss(loss)
        if num_outputs is not None:
            deep_supervision_weights(num_outputs)  # validates
        if weights is not None:
            weights = _weights("deep_supervision", "weights", weights)
            if num_outputs is not None and len(weights) != num_outputs:
                raise ValueError(f"Expected {num_outputs} deep-supervision weights. "
                                 f"Received: weights={weights}")
        if target_downsampling not in ("average", "nearest"):
            raise ValueError("Expected `target_downsampling` to be one of ['average', 'nearest']. "
                             f"Received: target_downsampling={target_downsampling!r}")
        self.num_outputs, self.weights = num_outputs, weights
        self.target_downsampling = target_downsampling
        super().__init__(name=name, reduction=reduction, dtype=dtype)

    def level_weights(self, n: int) -> list[float]:
        """Normalised weights for ``n`` outputs."""
        if self.weights is None:
            return deep_supervision_weights(n)
        return [w / sum(self.weights) for w in self.weights]

    def call(self, y_true, y_pred):
        outputs = list(y_pred) if isinstance(y_pred, (list, tuple)) else [y_pred]
        expected = self.num_outputs if self.num_outputs is not None else (
            len(self.weights) if self.weights is not None else len(outputs))
        if len(outputs) != expected:
            raise ValueError(f"Expected {expected} deep-supervision outputs. "
                             f"Received: len(y_pred)={len(outputs)}")
        total = 0.0
        for level, (weight, pred) in enumerate(zip(self.level_weights(len(outputs)), outputs)):
            target = _downsample_target(y_true, pred, level, self.target_downsampling)
            total = total + weight * self.loss(target, pred)
        return total

    def check_num_classes(self, num_classes: int) -> None:
        self.loss.check_num_classes(num_classes)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "loss": keras.saving.serialize_keras_object(self.loss),
                "num_outputs": self.num_outputs, "weights": self.weights,
                "target_downsampling": self.target_downsampling}
