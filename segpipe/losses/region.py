"""Region (overlap) losses: Dice, generalized Dice, Tversky, IoU, focal Tversky.

Each pure function returns one float32 value per sample, shape (B,). For sample b and class c,
summing over the spatial axes (p = prediction, g = one-hot reference)::

    TP = sum p * g        FP = sum p * (1 - g)        FN = sum (1 - p) * g

over the annotated voxels only (ignored voxels: a zero one-hot row or the ignore-mask channel, see
:func:`segpipe.losses.tensors.split_target`; ``FP = sum p (m - g)``),
then a ratio per class and the (``class_weights``-weighted) class mean ``sum_c w_c l_bc / sum_c w_c``.
With ``batch=True`` (nnU-Net's "batch Dice") TP, FP and FN are summed over the samples of the
batch first (each scaled by ``pool_weights`` (B,) if given, and over all replicas under
``tf.distribute``), and every sample gets that one batch value.
"""
from __future__ import annotations

from collections.abc import Sequence

from keras import ops

from segpipe.errors import SettingError
from segpipe.losses.base import SegmentationLoss, register
from segpipe.losses.tensors import broadcast_to_batch, class_mean, power_from_zero, region_stats

__all__ = ["dice_loss", "generalized_dice_loss", "tversky_loss", "iou_loss", "focal_tversky_loss",
           "DiceLoss", "GeneralizedDiceLoss", "TverskyLoss", "IoULoss", "FocalTverskyLoss"]


def dice_loss(y_true, y_pred, *, squared_pred: bool = False, include_background: bool = True,
              batch: bool = False, class_weights: Sequence[float] | None = None,
              smooth_nr: float = 1e-5, smooth_dr: float = 1e-5, from_logits: bool = False, sigmoid: bool = False,
              pool_weights=None):
    """Soft Dice loss per sample.

    Formula::

        loss_bc = 1 - (2 TP + smooth_nr) / (2 TP + FP + FN + smooth_dr)
        squared_pred=True (V-Net):  1 - (2 TP + smooth_nr) / (sum p^2 + sum g^2 + smooth_dr)

    then the (weighted) class mean per sample.

    Parameters
    ----------
    squared_pred
        use squared terms in the denominator (Milletari et al.). Defaults to False.
    include_background
        False drops channel 0 after the softmax. Defaults to True.
    batch
        pool the counts over the batch (nnU-Net's batch Dice). Defaults to False.
    class_weights
        one non-negative weight per scored class for the class mean.
    smooth_nr, smooth_dr
        added to numerator and denominator. Default 1e-5 each.
    from_logits
        ``y_pred`` are logits; a softmax over the channel axis is applied.
    sigmoid
        the channels are independent region probabilities (one sigmoid per region, no
        background channel): ``from_logits`` applies a sigmoid; ``include_background`` must
        stay True. Defaults to False.
    pool_weights
        with ``batch=True``, per-sample weights (B,) of the pooled counts.

    Returns
    -------
    tensor
        float32 tensor of shape (B,), values in [0, 1].

    References
    ----------
    Milletari, Navab, Ahmadi. V-Net. 3DV 2016, arXiv:1606.04797.
    """
    stats = region_stats(y_true, y_pred, from_logits=from_logits, batch=batch,
                         include_background=include_background, pool_weights=pool_weights,
                              sigmoid=sigmoid,
                         squares=squared_pred)
    tp, fp, fn = stats[:3]
    denominator = stats[3] + stats[4] if squared_pred else 2.0 * tp + fp + fn
    loss_bc = 1.0 - (2.0 * tp + smooth_nr) / (denominator + smooth_dr)
    return broadcast_to_batch(class_mean(loss_bc, class_weights, include_background), y_pred)


def generalized_dice_loss(y_true, y_pred, *, weight_type: str = "square",
                          include_background: bool = True, batch: bool = False,
                          smooth_nr: float = 1e-5, smooth_dr: float = 1e-5,
                          from_logits: bool = False, sigmoid: bool = False, pool_weights=None):
    """Generalized Dice loss (Sudre et al.) per sample.

    Formula (per sample, or over the pooled batch with ``batch=True``)::

        loss_b = 1 - (2 sum_c w_c TP_c + smooth_nr) / (sum_c w_c (2 TP_c + FP_c + FN_c) + smooth_dr)
        w_c = 1 / (sum g_c)^2  (square) | 1 / sum g_c  (simple) | 1  (uniform)

    The class weights come from the sample's reference volumes, or with ``batch=True`` from the
    pooled (sample-weighted, all-replica) volumes of the batch. Absent-class policy: a class with
    ``sum g_c = 0`` has an infinite weight; it takes the largest weight of the classes present
    (as in MONAI and NiftyNet), so predicting an absent class is penalised like the smallest
    present structure. If no scored class is present (only possible with
    ``include_background=False`` on an all-background sample) all weights are 1, so false
    positives are still penalised (MONAI uses 0 there, which gives no gradient). The weights depend
    on ``y_true`` only and carry no gradient; no division by zero happens.

    Parameters
    ----------
    weight_type
        "square", "simple" or "uniform". Defaults to "square".
    include_background, batch, smooth_nr, smooth_dr, from_logits, pool_weights
        as :func:`dice_loss`.

    Returns
    -------
    tensor
        float32 tensor of shape (B,), values in [0, 1].

    References
    ----------
    Sudre, Li, Vercauteren, Ourselin, Cardoso. Generalised Dice overlap as a deep learning loss
    function for highly unbalanced segmentations. DLMIA 2017, arXiv:1707.03237.
    """
    tp, fp, fn = region_stats(y_true, y_pred, from_logits=from_logits, batch=batch,
                              include_background=include_background, pool_weights=pool_weights,
                              sigmoid=sigmoid)
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
    return broadcast_to_batch(1.0 - numerator / denominator, y_pred)


def tversky_loss(y_true, y_pred, *, alpha: float = 0.5, beta: float = 0.5,
                 include_background: bool = True, batch: bool = False,
                 class_weights: Sequence[float] | None = None,
                 smooth_nr: float = 1e-5, smooth_dr: float = 1e-5, from_logits: bool = False, sigmoid: bool = False,
                 pool_weights=None):
    """Tversky loss per sample; ``alpha`` weights false positives, ``beta`` false negatives.

    Formula::

        TI_bc = (TP + smooth_nr) / (TP + alpha FP + beta FN + smooth_dr),   loss_bc = 1 - TI_bc

    alpha = beta = 0.5 is the Dice loss and alpha = beta = 1 the IoU loss (exactly so without
    smoothing). beta > alpha favours recall (Salehi et al. recommend alpha=0.3, beta=0.7).

    Parameters
    ----------
    alpha
        weight of FP, >= 0. Defaults to 0.5.
    beta
        weight of FN, >= 0. Defaults to 0.5.
    include_background, batch, class_weights, smooth_nr, smooth_dr, from_logits, pool_weights
        as :func:`dice_loss`.

    Returns
    -------
    tensor
        float32 tensor of shape (B,).

    References
    ----------
    Salehi, Erdogmus, Gholipour. Tversky loss function for image segmentation using 3D fully
    convolutional deep networks. MLMI 2017, arXiv:1706.05721.
    """
    tp, fp, fn = region_stats(y_true, y_pred, from_logits=from_logits, batch=batch,
                              include_background=include_background, pool_weights=pool_weights,
                              sigmoid=sigmoid)
    loss_bc = 1.0 - (tp + smooth_nr) / (tp + alpha * fp + beta * fn + smooth_dr)
    return broadcast_to_batch(class_mean(loss_bc, class_weights, include_background), y_pred)


def iou_loss(y_true, y_pred, *, include_background: bool = True, batch: bool = False,
             class_weights: Sequence[float] | None = None,
             smooth_nr: float = 1e-5, smooth_dr: float = 1e-5, from_logits: bool = False, sigmoid: bool = False,
             pool_weights=None):
    """Soft IoU (Jaccard) loss per sample.

    Formula::

        loss_bc = 1 - (TP + smooth_nr) / (TP + FP + FN + smooth_dr)

    Returns
    -------
    tensor
        float32 tensor of shape (B,).

    References
    ----------
    Rahman, Wang. Optimizing intersection-over-union in deep neural networks for image
    segmentation. ISVC 2016, doi:10.1007/978-3-319-50835-1_22.
    """
    tp, fp, fn = region_stats(y_true, y_pred, from_logits=from_logits, batch=batch,
                              include_background=include_background, pool_weights=pool_weights,
                              sigmoid=sigmoid)
    loss_bc = 1.0 - (tp + smooth_nr) / (tp + fp + fn + smooth_dr)
    return broadcast_to_batch(class_mean(loss_bc, class_weights, include_background), y_pred)


def focal_tversky_loss(y_true, y_pred, *, alpha: float = 0.3, beta: float = 0.7,
                       gamma: float = 0.75, include_background: bool = True, batch: bool = False,
                       class_weights: Sequence[float] | None = None,
                       smooth_nr: float = 1e-5, smooth_dr: float = 1e-5,
                       from_logits: bool = False, sigmoid: bool = False, pool_weights=None):
    """Focal Tversky loss per sample.

    Formula::

        loss_bc = (1 - TI_bc) ** gamma     (TI_bc as in :func:`tversky_loss`)

    At a perfect prediction (TI = 1) the loss and its gradient are 0, also for gamma < 1 where the
    plain power's derivative would be infinite. Abraham & Khan write the exponent as 1/gamma with
    their gamma = 4/3 and weight FN by their alpha = 0.7; the defaults here (alpha=0.3 on FP,
    beta=0.7 on FN, gamma=0.75) are that setting.

    Parameters
    ----------
    alpha
        weight of FP, >= 0. Defaults to 0.3.
    beta
        weight of FN, >= 0. Defaults to 0.7.
    gamma
        exponent, > 0 (< 1 focuses on hard classes). Defaults to 0.75.

    Returns
    -------
    tensor
        float32 tensor of shape (B,).

    References
    ----------
    Abraham, Khan. A novel focal Tversky loss function with improved attention U-Net for lesion
    segmentation. ISBI 2019, arXiv:1810.07842.
    """
    tp, fp, fn = region_stats(y_true, y_pred, from_logits=from_logits, batch=batch,
                              include_background=include_background, pool_weights=pool_weights,
                              sigmoid=sigmoid)
    tversky_index = (tp + smooth_nr) / (tp + alpha * fp + beta * fn + smooth_dr)
    loss_bc = power_from_zero(1.0 - tversky_index, gamma)
    return broadcast_to_batch(class_mean(loss_bc, class_weights, include_background), y_pred)


@register("dice")
class DiceLoss(SegmentationLoss):
    """Soft Dice loss; formula and options in :func:`dice_loss`."""
    fn = staticmethod(dice_loss)


@register("generalized_dice")
class GeneralizedDiceLoss(SegmentationLoss):
    """Generalized Dice loss; formula, options and absent-class policy in
    :func:`generalized_dice_loss`."""
    fn = staticmethod(generalized_dice_loss)


class _AlphaBetaMixin:
    def _check_options(self) -> None:
        if self.options["alpha"] + self.options["beta"] <= 0:
            raise SettingError("beta", f"alpha + beta > 0 for loss '{self.registry_name}' (otherwise the loss is "
                                       f"constant; alpha={self.options['alpha']})", self.options["beta"])


@register("tversky")
class TverskyLoss(_AlphaBetaMixin, SegmentationLoss):
    """Tversky loss (alpha on FP, beta on FN); see :func:`tversky_loss`."""
    fn = staticmethod(tversky_loss)


@register("iou")
class IoULoss(SegmentationLoss):
    """Soft IoU / Jaccard loss; see :func:`iou_loss`."""
    fn = staticmethod(iou_loss)


@register("focal_tversky")
class FocalTverskyLoss(_AlphaBetaMixin, SegmentationLoss):
    """Focal Tversky loss; see :func:`focal_tversky_loss`."""
    fn = staticmethod(focal_tversky_loss)
