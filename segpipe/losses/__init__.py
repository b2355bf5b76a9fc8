"""Segmentation losses that keep Keras's loss contract.

Dice, generalized Dice, Tversky, IoU, focal Tversky (region losses, :mod:`.region`),
cross-entropy and focal (voxel losses, :mod:`.voxel`), weighted sums (:mod:`.compound`), built by
name or config dict with :func:`get_loss` (:mod:`.registry`); deep supervision as a multi-output
model (:mod:`.deep_supervision`). Every loss is a pure ``keras.ops`` function plus a thin
``keras.losses.Loss`` class that validates its options at construction and has ``get_config``.

The contract (as ``keras.losses.CategoricalCrossentropy``)
------------------------------------------------------------
``y_true`` one-hot and ``y_pred`` (probabilities, or logits with ``from_logits=True``) of the same
shape, channels last, any rank >= 3: ``(B, X, C)`` ... ``(B, X, Y, Z, C)``.

* ``loss.call(y_true, y_pred)`` returns **one value per sample**, shape (B,): region losses the
  (class-weighted) class mean of the sample's ratios, voxel losses the mean over its voxels.
* ``loss(y_true, y_pred, sample_weight=None)`` multiplies these by ``sample_weight`` and reduces
  them with ``reduction``: "sum_over_batch_size" (default; = "mean" in Keras 3) divides the sum
  by B, "sum" sums, "mean_with_sample_weight" divides by the sum of the weights, None returns the
  weighted (B,) values. The means are divided by the number of replicas in sync under
  ``tf.distribute`` (which sums replica gradients), so a batch split over R replicas trains like
  one process.
* ``sample_weight`` has shape (B,); voxel losses also take (B, X, Y, Z): a sample's value is then
  its weighted voxel mean and its weight the voxel mean of its weights, which makes every
  reduction equal Keras's reduction of the per-voxel values (CategoricalCrossentropy's), except
  "sum" (the sum of per-sample means, not of voxels). Region losses refuse voxel weights.
* Batch options: with ``batch=True`` (nnU-Net's batch Dice; generalized Dice's class weights then
  come from the batch's volumes too) TP, FP and FN are pooled over the batch, a sample's weight
  scaling its voxels in the pooled counts, and every sample's value is that batch value (so the
  weight also scales its share in the reduction, as for any loss). Under ``tf.distribute`` the
  pooled counts are all-reduced over the replicas, so the value and gradients equal those of the
  whole global batch on one process.
* A sample of weight 0 contributes nothing: with "sum" or "mean_with_sample_weight" the loss
  equals the loss of the batch without it (with "sum_over_batch_size" it is that times (B-1)/B,
  as for Keras's own losses, since B still counts it).

Numerics: inputs are cast to float32 first (mixed-precision outputs accumulate in float32).
With ``from_logits=True`` every loss uses ``log_softmax`` (and ``p = exp(log_softmax)``), stable
and with finite gradients for logits of any size; probabilities use ``log(clip(p, 1e-7, 1))``
as Keras. ``smooth_nr``/``smooth_dr`` (default 1e-5) are added to numerator and denominator of
every ratio: a class absent from reference and prediction scores 1 (loss 0).
``include_background=False`` drops channel 0 after the softmax. ``class_weights`` has one entry
per scored class (C, or C - 1 without background).

Examples
--------
>>> import keras
>>> loss = get_loss("tversky", alpha=0.3, beta=0.7)
>>> y_true = keras.ops.one_hot(keras.ops.zeros((2, 4, 4, 4), "int32"), 3)
>>> tuple(loss.call(y_true, y_true).shape)
(2,)
>>> float(loss(y_true, y_true, sample_weight=[1.0, 0.0]))  # perfect prediction
0.0

docs/losses-in-keras.md shows the losses in a user's own multi-output model.
"""
from segpipe.losses.base import ALIASES, LOSSES, SegmentationLoss, available_losses
from segpipe.losses.compound import CompoundLoss
from segpipe.losses.deep_supervision import (
                                             deep_supervision_losses,
                                             deep_supervision_targets,
                                             deep_supervision_weights,
                                             downsample_target,
)
from segpipe.losses.region import (
                                             DiceLoss,
                                             FocalTverskyLoss,
                                             GeneralizedDiceLoss,
                                             IoULoss,
                                             TverskyLoss,
                                             dice_loss,
                                             focal_tversky_loss,
                                             generalized_dice_loss,
                                             iou_loss,
                                             tversky_loss,
)
from segpipe.losses.registry import get_loss
from segpipe.losses.tensors import EPSILON
from segpipe.losses.voxel import (
                                             CrossEntropyLoss,
                                             FocalLoss,
                                             cross_entropy_loss,
                                             cross_entropy_per_voxel,
                                             focal_loss,
                                             focal_per_voxel,
)

__all__ = [
    "ALIASES", "LOSSES", "EPSILON",
    "dice_loss", "generalized_dice_loss", "tversky_loss", "iou_loss", "focal_tversky_loss",
    "cross_entropy_loss", "cross_entropy_per_voxel", "focal_loss", "focal_per_voxel",
    "SegmentationLoss", "DiceLoss", "GeneralizedDiceLoss", "TverskyLoss", "IoULoss",
    "FocalTverskyLoss", "CrossEntropyLoss", "FocalLoss", "CompoundLoss",
    "available_losses", "deep_supervision_weights", "deep_supervision_losses",
    "deep_supervision_targets", "downsample_target", "get_loss",
]
