"""Voxel losses: categorical cross-entropy and focal loss.

Each has a per-voxel form (``*_per_voxel``, shape (B, spatial...)) and the pure loss function,
its mean over the voxels of each sample, shape (B,). Their classes accept ``sample_weight`` of
shape (B,) or of the voxel shape (B, X, Y, Z) (see :meth:`SegmentationLoss.weighted_values`).
"""
from __future__ import annotations

import numbers
from collections.abc import Sequence

from keras import ops

from segpipe.losses.base import SegmentationLoss, register
from segpipe.losses.options import focal_alpha
from segpipe.losses.tensors import EPSILON, per_class_vector, power_from_zero, prepare, split_target

__all__ = ["cross_entropy_per_voxel", "cross_entropy_loss", "focal_per_voxel", "focal_loss",
           "CrossEntropyLoss", "FocalLoss"]


def _annotated_mean(values, y_true, y_pred, sigmoid: bool):
    """(B, spatial...) per-voxel values -> (B,): their mean over each sample's annotated voxels
    (all voxels without ignored ones; 0 for a sample with none)."""
    _, m = split_target(y_true, y_pred, sigmoid=sigmoid)
    axes = tuple(range(1, len(values.shape)))
    return ops.divide_no_nan(ops.sum(values, axis=axes), ops.sum(m[..., 0], axis=axes))


def _log_complement(y_pred, p, from_logits: bool):
    """``log(1 - p)`` of sigmoid outputs: ``log_sigmoid(-logits)``, or ``log(clip(1 - p))``."""
    if from_logits:
        return ops.log_sigmoid(-ops.cast(ops.convert_to_tensor(y_pred), "float32"))
    return ops.log(ops.clip(1.0 - p, EPSILON, 1.0))


def cross_entropy_per_voxel(y_true, y_pred, *, class_weights: Sequence[float] | None = None,
                            label_smoothing: float = 0.0, include_background: bool = True,
                            from_logits: bool = False, sigmoid: bool = False):
    """Cross-entropy of every voxel, shape (B, spatial...), 0 on ignored voxels; see :func:`cross_entropy_loss`."""
    g, p, log_p, m = prepare(y_true, y_pred, from_logits=from_logits,
                             include_background=include_background,
                             label_smoothing=label_smoothing, with_log=True, sigmoid=sigmoid)
    if sigmoid:  # binary CE per region channel, averaged over the channels (as Keras)
        terms = g * log_p + (m - g) * _log_complement(y_pred, p, from_logits)
    else:
        terms = g * log_p
    if class_weights is not None:
        terms = terms * per_class_vector(class_weights, terms.shape[-1], what="class_weights",
                                         include_background=include_background)
    return -(ops.mean(terms, axis=-1) if sigmoid else ops.sum(terms, axis=-1))


def cross_entropy_loss(y_true, y_pred, *, class_weights: Sequence[float] | None = None,
                       label_smoothing: float = 0.0, include_background: bool = True,
                       from_logits: bool = False, sigmoid: bool = False):
    """Categorical (or, with ``sigmoid``, binary) cross-entropy per sample, the mean over its
    annotated voxels.

    Formula::

        l_bv = - sum_c w_c g_c log p_c,     loss_b = sum_v l_bv / sum_v m_bv
        sigmoid: l_bv = - mean_c w_c (g_c log p_c + (m - g_c) log(1 - p_c))

    with ``g <- g (1 - label_smoothing) + label_smoothing m / C`` (C = all channels, as in Keras),
    w_c = 1 without ``class_weights``, ``log p = log_softmax(logits)`` with ``from_logits``
    (``log_sigmoid`` with ``sigmoid``; else ``log(clip(p, 1e-7, 1))`` as Keras) and ``m`` the
    annotated weight (1, or 0 on ignored voxels; :func:`segpipe.losses.tensors.split_target`).
    Without options and ignored voxels its batch mean equals ``keras.losses.CategoricalCrossentropy()``
    (``BinaryCrossentropy()`` with ``sigmoid``).

    Parameters
    ----------
    class_weights
        one weight per scored class; the mean is not renormalised by the weights.
    label_smoothing
        in [0, 1). Defaults to 0.
    include_background
        False drops the class-0 term. Defaults to True.
    from_logits
        ``y_pred`` are logits. Defaults to False.
    sigmoid
        independent region channels (binary CE); see :func:`segpipe.losses.dice_loss`.

    Returns
    -------
    tensor
        float32 tensor of shape (B,).

    References
    ----------
    Label smoothing: Szegedy et al. Rethinking the Inception architecture. CVPR 2016,
    arXiv:1512.00567.
    """
    return _annotated_mean(cross_entropy_per_voxel(
        y_true, y_pred, class_weights=class_weights, label_smoothing=label_smoothing,
        include_background=include_background, from_logits=from_logits, sigmoid=sigmoid),
        y_true, y_pred, sigmoid)


def focal_per_voxel(y_true, y_pred, *, gamma: float = 2.0,
                    alpha: float | Sequence[float] | None = None, include_background: bool = True,
                    from_logits: bool = False, sigmoid: bool = False):
    """Focal loss of every voxel, shape (B, spatial...), 0 on ignored voxels; see :func:`focal_loss`."""
    g, p, log_p, m = prepare(y_true, y_pred, from_logits=from_logits,
                             include_background=include_background, with_log=True, sigmoid=sigmoid)
    if sigmoid:
        positive = power_from_zero(1.0 - p, gamma) * g * log_p
        negative = power_from_zero(p, gamma) * (m - g) * _log_complement(y_pred, p, from_logits)
        if isinstance(alpha, numbers.Real):  # Lin et al.: alpha on positives, 1 - alpha on negatives
            positive, negative = alpha * positive, (1.0 - alpha) * negative
        terms = positive + negative
        if alpha is not None and not isinstance(alpha, numbers.Real):
            terms = terms * per_class_vector(alpha, terms.shape[-1], what="alpha", include_background=True)
        return -ops.mean(terms, axis=-1)
    terms = power_from_zero(1.0 - p, gamma) * g * log_p
    if isinstance(alpha, numbers.Real):
        num_foreground = p.shape[-1] - (1 if include_background else 0)
        full = [1.0 - alpha] + [float(alpha)] * num_foreground
        alpha = full if include_background else full[1:]
    if alpha is not None:
        terms = terms * per_class_vector(alpha, terms.shape[-1], what="alpha",
                                         include_background=include_background)
    return -ops.sum(terms, axis=-1)


def focal_loss(y_true, y_pred, *, gamma: float = 2.0,
               alpha: float | Sequence[float] | None = None, include_background: bool = True,
               from_logits: bool = False, sigmoid: bool = False):
    """Focal loss (softmax form; binary with ``sigmoid``) per sample, the mean over its annotated voxels.

    Formula::

        l_bv = - sum_c alpha_c (1 - p_c)^gamma g_c log p_c,   loss_b = sum_v l_bv / sum_v m_bv
        sigmoid: l_bv = - mean_c [a+ (1 - p_c)^gamma g_c log p_c + a- p_c^gamma (m - g_c) log(1 - p_c)]

    (with a zero, finite gradient of the power at p_c = 1 for gamma < 1; ``m`` as in
    :func:`cross_entropy_loss`).

    Parameters
    ----------
    gamma
        focusing parameter, > 0. Defaults to 2.
    alpha
        None (alpha_c = 1), a number a in [0, 1] (alpha_0 = 1 - a for the background and
        alpha_c = a for every other class, Lin et al.'s binary convention; with ``sigmoid``
        a+ = a, a- = 1 - a), or one non-negative weight per scored class. Defaults to None.
    include_background, from_logits, sigmoid
        as :func:`cross_entropy_loss`.

    Returns
    -------
    tensor
        float32 tensor of shape (B,).

    References
    ----------
    Lin, Goyal, Girshick, He, Dollar. Focal loss for dense object detection. ICCV 2017,
    arXiv:1708.02002.
    """
    return _annotated_mean(focal_per_voxel(y_true, y_pred, gamma=gamma, alpha=alpha,
                                           include_background=include_background,
                                           from_logits=from_logits, sigmoid=sigmoid),
                           y_true, y_pred, sigmoid)


class _VoxelLoss(SegmentationLoss):
    """A loss that is a mean over voxels, so voxel sample weights have a meaning."""

    voxel_weights_ok = True
    per_voxel = staticmethod(lambda y_true, y_pred: None)

    def voxel_weighted_values(self, y_true, y_pred, voxel_weights):
        # ignored voxels (value 0) leave the weighted mean; the sample keeps its weight mean_v w_bv
        values = self.per_voxel(y_true, y_pred, **self.options)
        _, m = split_target(y_true, y_pred, sigmoid=self.options.get("sigmoid", False))
        axes = tuple(range(1, len(values.shape)))
        total_weight = ops.sum(voxel_weights * m[..., 0], axis=axes)
        sample_weight = ops.mean(voxel_weights, axis=axes)
        return ops.divide_no_nan(ops.sum(values * voxel_weights, axis=axes), total_weight), sample_weight


@register("cross_entropy")
class CrossEntropyLoss(_VoxelLoss):
    """Categorical cross-entropy; see :func:`cross_entropy_loss`."""
    fn = staticmethod(cross_entropy_loss)
    per_voxel = staticmethod(cross_entropy_per_voxel)


@register("focal")
class FocalLoss(_VoxelLoss):
    """Focal loss; see :func:`focal_loss`."""
    fn = staticmethod(focal_loss)
    per_voxel = staticmethod(focal_per_voxel)
    _validators = {"alpha": focal_alpha}
