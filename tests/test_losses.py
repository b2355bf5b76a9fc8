"""Tests for segpipe.losses against an independent float64 NumPy reference (from the formulas),
and of Keras's loss contract: one value per sample, sample weights, reductions.

The reference below loops over samples (or the whole batch) and classes and does not import the
module's math; it returns one value per sample. Inputs include empty classes, all-background
samples and single-voxel structures.
"""
import itertools
import re
from pathlib import Path

import keras  # noqa: E402  (after segpipe, which sets the backend)
import numpy as np
import pytest
import tensorflow as tf  # noqa: E402

from segpipe.losses import (
    available_losses,
    deep_supervision_losses,
    deep_supervision_targets,
    deep_supervision_weights,
    downsample_target,
    get_loss,
)

RTOL = 1e-5
EPS = 1e-7
C = 4  # classes in the reference tests


# --------------------------------------------------------------------------------------------
# Independent NumPy reference (float64)
# --------------------------------------------------------------------------------------------
DEFAULTS = {  # documented defaults, written out independently of the module
    "dice": dict(squared_pred=False),
    "generalized_dice": dict(weight_type="square"),
    "tversky": dict(alpha=0.5, beta=0.5),
    "iou": dict(),
    "focal_tversky": dict(alpha=0.3, beta=0.7, gamma=0.75),
    "cross_entropy": dict(class_weights=None, label_smoothing=0.0, include_background=True,
                          from_logits=False),
    "focal": dict(gamma=2.0, alpha=None, include_background=True, from_logits=False),
}
REGION_COMMON = dict(include_background=True, batch=False, class_weights=None, smooth_nr=1e-5,
                     smooth_dr=1e-5, from_logits=False)
for _name in ("dice", "tversky", "iou", "focal_tversky"):
    DEFAULTS[_name] = {**REGION_COMMON, **DEFAULTS[_name]}
DEFAULTS["generalized_dice"] = {**REGION_COMMON, **DEFAULTS["generalized_dice"]}
del DEFAULTS["generalized_dice"]["class_weights"]


def np_log_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def ref_prepare(y_true, y_pred, o):
    g, x = y_true.astype(np.float64), y_pred.astype(np.float64)
    if o.get("label_smoothing"):
        g = g * (1 - o["label_smoothing"]) + o["label_smoothing"] / g.shape[-1]
    if o["from_logits"]:
        log_p = np_log_softmax(x)
        p = np.exp(log_p)
    else:
        p, log_p = x, np.log(np.clip(x, EPS, 1.0))
    if not o["include_background"]:
        g, p, log_p = g[..., 1:], p[..., 1:], log_p[..., 1:]
    return g, p, log_p


def ref_per_sample(name, y_true, y_pred, pool_weights=None, **options):
    """Per-sample float64 values (B,); with batch=True the pooled value (samples scaled by
    ``pool_weights``) for every sample."""
    name = {"ce": "cross_entropy", "jaccard": "iou"}.get(name, name)
    o = {**DEFAULTS[name], **options}
    g, p, log_p = ref_prepare(y_true, y_pred, o)
    n, batch_size = g.shape[-1], g.shape[0]
    if name in ("cross_entropy", "focal"):
        return ref_per_voxel(name, g, p, log_p, o, y_true.shape[-1]).reshape(batch_size, -1).mean(1)

    # region losses: groups are samples, or the whole batch with batch=True
    if o["batch"]:
        w_b = np.ones(batch_size) if pool_weights is None else np.asarray(pool_weights, float)
        groups = [(g.reshape(batch_size, -1, n), p.reshape(batch_size, -1, n), w_b)]
    else:
        groups = [(g[b].reshape(1, -1, n), p[b].reshape(1, -1, n), np.ones(1))
                  for b in range(batch_size)]
    snr, sdr = o["smooth_nr"], o["smooth_dr"]
    values = []
    for gg, pp, ww in groups:
        def pooled(x, ww=ww):
            return np.array([sum(ww[b] * np.sum(x[b][:, c]) for b in range(len(ww)))
                             for c in range(n)])
        tp, fp, fn = pooled(pp * gg), pooled(pp * (1 - gg)), pooled((1 - pp) * gg)
        if name == "generalized_dice":
            vol = pooled(gg)
            if o["weight_type"] == "uniform":
                w = np.ones(n)
            else:
                with np.errstate(divide="ignore"):
                    w = 1 / vol ** 2 if o["weight_type"] == "square" else 1 / vol
                finite = np.isfinite(w)
                w[~finite] = w[finite].max() if finite.any() else 1.0
            values.append(1 - (2 * np.sum(w * tp) + snr) / (np.sum(w * (2 * tp + fp + fn)) + sdr))
            continue
        losses = []
        for c in range(n):
            if name == "dice":
                den = (pooled(pp ** 2)[c] + pooled(gg ** 2)[c] if o["squared_pred"]
                       else 2 * tp[c] + fp[c] + fn[c])
                losses.append(1 - (2 * tp[c] + snr) / (den + sdr))
            elif name == "iou":
                losses.append(1 - (tp[c] + snr) / (tp[c] + fp[c] + fn[c] + sdr))
            else:
                ti = (tp[c] + snr) / (tp[c] + o["alpha"] * fp[c] + o["beta"] * fn[c] + sdr)
                losses.append(1 - ti if name == "tversky"
                              else max(1 - ti, 0) ** o["gamma"])
        w = np.ones(n) if o["class_weights"] is None else np.asarray(o["class_weights"])
        values.append(np.dot(w, losses) / w.sum())
    values = np.asarray(values, dtype=np.float64)
    return np.repeat(values, batch_size) if o["batch"] else values


def ref_per_voxel(name, g, p, log_p, o, num_channels):
    n = g.shape[-1]
    if name == "cross_entropy":
        w = np.ones(n) if o["class_weights"] is None else np.asarray(o["class_weights"])
        return -(w * g * log_p).sum(-1)
    a = o["alpha"]
    if a is None:
        w = np.ones(n)
    elif np.isscalar(a):
        w = np.array([1 - a] + [a] * (num_channels - 1))
        w = w if o["include_background"] else w[1:]
    else:
        w = np.asarray(a)
    mod = np.maximum(1 - p, 0) ** o["gamma"]
    return -(w * mod * g * log_p).sum(-1)


def ref_loss(name, y_true, y_pred, **options):
    """The default reduction: the mean of the per-sample values."""
    return ref_per_sample(name, y_true, y_pred, **options).mean()


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------
def make_batch(kind="mixed", spatial=(6, 5, 4), seed=0, num_classes=C):
    """One-hot y_true and logits. 'mixed': sample 0 lacks class 3, sample 1 is all background,
    sample 2 has a single voxel of class 3 and no class 2, sample 3 is random.
    'absent_in_batch': the last class is absent from every sample."""
    rng = np.random.default_rng(seed)
    shape = (4, *spatial)
    labels = np.zeros(shape, dtype=int)
    if kind == "mixed":
        labels[0] = rng.integers(0, num_classes - 1, spatial)
        labels[2][(slice(0, 2),) * len(spatial)] = 1
        labels[2][(2,) * len(spatial)] = num_classes - 1
        labels[3] = rng.integers(0, num_classes, spatial)
    else:
        labels = rng.integers(0, num_classes - 1, shape)
    y_true = np.eye(num_classes, dtype=np.float32)[labels]
    logits = (2 * rng.normal(size=y_true.shape)).astype(np.float32)
    return y_true, logits


def softmax32(logits):
    return np.exp(np_log_softmax(logits.astype(np.float64))).astype(np.float32)


def _weights(include_background, seed=1):
    return list(np.random.default_rng(seed).uniform(0.2, 2.0, C if include_background else C - 1))


def option_grid():
    """(name, options) for every loss and option combination."""
    cases = []
    for ib, batch, fl, extra in itertools.product((True, False), (False, True), (False, True),
                                                  ("none", "weights", "smoothing")):
        common = dict(include_background=ib, batch=batch, from_logits=fl)
        common.update({"none": {}, "weights": {"class_weights": _weights(ib)},
                       "smoothing": {"smooth_nr": 0.0, "smooth_dr": 1.0}}[extra])
        for sq in (False, True):
            cases.append(("dice", {**common, "squared_pred": sq}))
        for a, b in ((0.3, 0.7), (0.5, 0.5), (1.0, 0.2)):
            cases.append(("tversky", {**common, "alpha": a, "beta": b}))
        cases.append(("iou", common))
        for gamma in (0.75, 2.0):
            cases.append(("focal_tversky", {**common, "gamma": gamma, "alpha": 0.6, "beta": 0.4}))
        if extra != "weights":
            for wt in ("square", "simple", "uniform"):
                cases.append(("generalized_dice", {**common, "weight_type": wt}))
    for ib, fl, cw, ls in itertools.product((True, False), (False, True), (False, True),
                                            (0.0, 0.1)):
        cases.append(("ce", dict(include_background=ib, from_logits=fl, label_smoothing=ls,
                                 class_weights=_weights(ib) if cw else None)))
    for ib, fl, gamma, alpha in itertools.product((True, False), (False, True), (0.5, 2.0),
                                                  ("none", "scalar", "list")):
        alpha = {"none": None, "scalar": 0.25, "list": _weights(ib, seed=2)}[alpha]
        cases.append(("focal", dict(include_background=ib, from_logits=fl, gamma=gamma,
                                    alpha=alpha)))
    return cases


GRID = option_grid()


def _case_id(case):
    name, o = case
    short = {k: (len(v) if isinstance(v, list) else v) for k, v in o.items()}
    return name + "-" + ",".join(f"{k}={v}" for k, v in short.items())


# --------------------------------------------------------------------------------------------
# Reference comparison
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mixed", "absent_in_batch"])
@pytest.mark.parametrize("case", GRID, ids=[_case_id(c) for c in GRID])
def test_matches_numpy_reference_per_sample(case, kind):
    name, options = case
    y_true, logits = make_batch(kind)
    y_pred = logits if options.get("from_logits") else softmax32(logits)
    loss = get_loss(name, **options)
    expected = ref_per_sample(name, y_true, y_pred, **options)
    per_sample = loss.call(y_true, y_pred)
    assert per_sample.dtype == "float32" and tuple(per_sample.shape) == (4,)
    np.testing.assert_allclose(per_sample.numpy(), expected, rtol=RTOL, atol=1e-7)
    value = loss(y_true, y_pred)
    assert value.dtype == "float32" and tuple(value.shape) == ()
    np.testing.assert_allclose(float(value), expected.mean(), rtol=RTOL, atol=1e-7)


# --------------------------------------------------------------------------------------------
# Keras's contract: per-sample values, sample weights, reductions
# --------------------------------------------------------------------------------------------
SAMPLE_WEIGHTS = np.array([0.5, 2.0, 0.0, 1.5], np.float32)  # sample 2 has weight 0


@pytest.mark.parametrize("case", GRID, ids=[_case_id(c) for c in GRID])
def test_keras_contract_per_sample_weights_and_reductions(case):
    name, options = case
    y_true, logits = make_batch("mixed")
    y_pred = logits if options.get("from_logits") else softmax32(logits)
    w = SAMPLE_WEIGHTS
    # per-sample values under these weights (batch=True: the weights also scale the pooled counts)
    values = ref_per_sample(name, y_true, y_pred, pool_weights=w, **options)

    none = get_loss(name, reduction=None, **options)(y_true, y_pred, sample_weight=w)
    assert tuple(none.shape) == (4,)
    np.testing.assert_allclose(none.numpy(), w * values, rtol=RTOL, atol=1e-7)
    assert tuple(get_loss(name, reduction=None, **options)(y_true, y_pred).shape) == (4,)

    by_hand = {"sum_over_batch_size": np.sum(w * values) / 4, "mean": np.sum(w * values) / 4,
               "sum": np.sum(w * values), "mean_with_sample_weight": np.sum(w * values) / w.sum()}
    for reduction, expected in by_hand.items():
        value = get_loss(name, reduction=reduction, **options)(y_true, y_pred, sample_weight=w)
        np.testing.assert_allclose(float(value), expected, rtol=RTOL, atol=1e-7, err_msg=reduction)
    # (B, 1) weights are per-sample weights too
    value = get_loss(name, **options)(y_true, y_pred, sample_weight=w[:, None])
    np.testing.assert_allclose(float(value), by_hand["sum_over_batch_size"], rtol=RTOL, atol=1e-7)

    # the zero-weight sample is as if it were not in the batch
    keep = w > 0
    for reduction in ("sum", "mean_with_sample_weight"):
        with_zero = get_loss(name, reduction=reduction, **options)(y_true, y_pred, sample_weight=w)
        without = get_loss(name, reduction=reduction, **options)(
            y_true[keep], y_pred[keep], sample_weight=w[keep])
        np.testing.assert_allclose(float(with_zero), float(without), rtol=RTOL, atol=1e-7)
    with_zero = get_loss(name, **options)(y_true, y_pred, sample_weight=w)
    without = get_loss(name, **options)(y_true[keep], y_pred[keep], sample_weight=w[keep])
    np.testing.assert_allclose(float(with_zero), float(without) * 3 / 4, rtol=RTOL, atol=1e-7)


VOXEL_CASES = [case for case in GRID if case[0] in ("ce", "focal")]


@pytest.mark.parametrize("case", VOXEL_CASES, ids=[_case_id(c) for c in VOXEL_CASES])
def test_voxel_weights_reduce_like_keras_per_voxel_values(case):
    name, options = case
    y_true, logits = make_batch("mixed")
    y_pred = logits if options.get("from_logits") else softmax32(logits)
    rng = np.random.default_rng(5)
    w = rng.uniform(0, 2, y_true.shape[:-1]).astype(np.float32)
    w[2] = 0.0  # a sample without any weight
    w[0, :2] = 0.0
    o = {**DEFAULTS["cross_entropy" if name == "ce" else name], **options}
    per_voxel = ref_per_voxel("cross_entropy" if name == "ce" else name,
                              *ref_prepare(y_true, y_pred, o), o, C)
    voxels = per_voxel.size // 4
    expected = {"sum_over_batch_size": np.sum(w * per_voxel) / per_voxel.size,
                "mean_with_sample_weight": np.sum(w * per_voxel) / w.sum(),
                "sum": np.sum(w * per_voxel) / voxels}  # a sum of per-sample voxel means
    for reduction, value in expected.items():
        for weights in (w, w[..., None]):
            got = get_loss(name, reduction=reduction, **options)(y_true, y_pred, sample_weight=weights)
            np.testing.assert_allclose(float(got), value, rtol=RTOL, atol=1e-7, err_msg=reduction)
    none = get_loss(name, reduction=None, **options)(y_true, y_pred, sample_weight=w)
    np.testing.assert_allclose(none.numpy(), (w * per_voxel).reshape(4, -1).mean(1), rtol=RTOL,
                               atol=1e-7)
    # uniform voxel weights are per-sample weights
    uniform = np.broadcast_to(SAMPLE_WEIGHTS[:, None, None, None], w.shape)
    np.testing.assert_allclose(float(get_loss(name, **options)(y_true, y_pred, sample_weight=uniform)),
                               float(get_loss(name, **options)(y_true, y_pred, sample_weight=SAMPLE_WEIGHTS)),
                               rtol=RTOL)


@pytest.mark.parametrize("reduction", ["sum_over_batch_size", "mean", "mean_with_sample_weight", None])
@pytest.mark.parametrize("weights", ["none", "sample", "voxel"])
@pytest.mark.parametrize("from_logits", [False, True])
def test_cross_entropy_equals_keras_categorical_crossentropy(reduction, weights, from_logits):
    y_true, logits = make_batch("mixed")
    y_pred = logits if from_logits else softmax32(logits)
    rng = np.random.default_rng(6)
    w = {"none": None, "sample": SAMPLE_WEIGHTS,
         "voxel": rng.uniform(0, 2, y_true.shape[:-1]).astype(np.float32)}[weights]
    ours = get_loss("ce", from_logits=from_logits, reduction=reduction)(y_true, y_pred, sample_weight=w)
    # Keras multiplies its per-voxel values by (B,) weights along the *last* spatial axis, so it
    # is given them as voxel weights; ours takes (B,) as it is.
    keras_w = np.broadcast_to(w[:, None, None, None], y_true.shape[:-1]) if weights == "sample" else w
    theirs = keras.losses.CategoricalCrossentropy(from_logits=from_logits, reduction=reduction)(
        y_true, y_pred, sample_weight=keras_w)
    if reduction is None:  # Keras keeps the voxels; ours is one value per sample
        theirs = np.asarray(theirs).reshape(4, -1).mean(1)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["dice", "generalized_dice", "tversky", "iou", "focal_tversky"])
def test_region_losses_refuse_voxel_weights(name):
    y_true, logits = make_batch("mixed")
    with pytest.raises(ValueError, match=rf"shape \(batch,\) for the region loss '{name}'.*"
                                         r"Received: sample_weight.shape=\(4, 6, 5, 4\)"):
        get_loss(name)(y_true, softmax32(logits), sample_weight=np.ones(y_true.shape[:-1]))
    with pytest.raises(ValueError, match=r"Received: sample_weight.shape=\(4, 6\)"):
        get_loss("ce")(y_true, logits, sample_weight=np.ones((4, 6)))


def test_compound_weights_every_term_alike():
    y_true, logits = make_batch("mixed")
    spec = {"terms": [{"name": "dice", "weight": 0.7, "from_logits": True, "batch": True},
                      {"name": "ce", "weight": 2.0, "from_logits": True}]}
    w = SAMPLE_WEIGHTS
    values = (0.7 * ref_per_sample("dice", y_true, logits, pool_weights=w, from_logits=True, batch=True)
              + 2.0 * ref_per_sample("ce", y_true, logits, from_logits=True))
    loss = get_loss(spec)
    assert tuple(loss.call(y_true, logits).shape) == (4,)
    np.testing.assert_allclose(float(loss(y_true, logits, sample_weight=w)), np.sum(w * values) / 4,
                               rtol=RTOL)
    none = type(loss)(spec["terms"], reduction=None)
    np.testing.assert_allclose(none(y_true, logits, sample_weight=w).numpy(), w * values, rtol=RTOL)
    with pytest.raises(ValueError, match="region loss 'dice'"):  # voxel weights need voxel terms
        loss(y_true, logits, sample_weight=np.ones(y_true.shape[:-1]))


def test_invalid_reduction_is_refused():
    with pytest.raises(ValueError, match=r"Received: reduction='avg'"):
        get_loss("dice", reduction="avg")


# --------------------------------------------------------------------------------------------
# Logits of +-50: log-softmax, finite gradients
# --------------------------------------------------------------------------------------------
LOGIT_CASES = [("dice", {}), ("dice", {"squared_pred": True}), ("generalized_dice", {}),
               ("tversky", {"alpha": 0.3, "beta": 0.7}), ("iou", {}),
               ("focal_tversky", {"gamma": 0.75}), ("ce", {}), ("ce", {"label_smoothing": 0.1}),
               ("focal", {"gamma": 2.0, "alpha": 0.25}), ("dice", {"batch": True})]


@pytest.mark.parametrize("case", LOGIT_CASES, ids=[_case_id(c) for c in LOGIT_CASES])
def test_logits_of_50_are_stable_and_match_float64_log_softmax(case):
    name, options = case
    y_true, _ = make_batch("mixed")
    rng = np.random.default_rng(7)
    # +-50 everywhere: most voxels confidently right, a quarter confidently wrong
    sign = np.where(rng.random(y_true.shape[:-1] + (1,)) < 0.75, 1.0, -1.0)
    logits = (50.0 * (2.0 * y_true - 1.0) * sign).astype(np.float32)
    logits[..., 0] += rng.uniform(-1, 1, logits.shape[:-1]).astype(np.float32)  # not all ties
    loss = get_loss(name, from_logits=True, **options)
    x = tf.Variable(logits)
    with tf.GradientTape() as tape:
        value = loss(y_true, x)
    grad = tape.gradient(value, x).numpy()
    assert np.isfinite(float(value)) and np.all(np.isfinite(grad))
    expected = ref_per_sample(name, y_true, logits.astype(np.float64), from_logits=True, **options)
    np.testing.assert_allclose(loss.call(y_true, logits).numpy(), expected, rtol=1e-5, atol=1e-6)
    assert np.abs(grad).max() > 0  # the wrong quarter pulls
    # gradient against float64 finite differences of the reference on a few logits
    flat = [(0, 1, 1, 1, 0), (3, 2, 0, 3, 1), (1, 0, 0, 0, 2)]
    for index in flat:
        h = 1e-4
        up, down = logits.astype(np.float64), logits.astype(np.float64)
        up[index] += h
        down[index] -= h
        numeric = (ref_loss(name, y_true, up, from_logits=True, **options)
                   - ref_loss(name, y_true, down, from_logits=True, **options)) / (2 * h)
        np.testing.assert_allclose(grad[index], numeric, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("spatial", [(7, 6), (9,)], ids=["2d", "1d"])
@pytest.mark.parametrize("name", ["dice", "generalized_dice", "tversky", "iou", "focal_tversky",
                                  "ce", "focal"])
def test_other_ranks_match_reference(name, spatial):
    y_true, logits = make_batch("mixed", spatial=spatial)
    options = {"from_logits": True}
    if name not in ("ce", "focal"):
        options["include_background"] = False
    value = get_loss(name, **options)(y_true, logits)
    np.testing.assert_allclose(float(value), ref_loss(name, y_true, logits, **options), rtol=RTOL)


def test_compound_is_weighted_sum():
    y_true, logits = make_batch("mixed")
    cfg = {"terms": [{"name": "dice", "weight": 0.7, "from_logits": True,
                      "include_background": False},
                     {"name": "ce", "weight": 2.0, "from_logits": True}]}
    value = float(get_loss(cfg)(y_true, logits))
    expected = (0.7 * ref_loss("dice", y_true, logits, from_logits=True, include_background=False)
                + 2.0 * ref_loss("ce", y_true, logits, from_logits=True))
    np.testing.assert_allclose(value, expected, rtol=RTOL)


# --------------------------------------------------------------------------------------------
# Identities
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch", [False, True])
def test_tversky_identities(batch):
    y_true, logits = make_batch("mixed")
    y_pred = softmax32(logits)  # sum p > 0 for every class, so no 0/0 without smoothing

    def value(name, **o):
        return float(get_loss(name, batch=batch, **o)(y_true, y_pred))

    exact = dict(smooth_nr=0.0, smooth_dr=0.0)
    np.testing.assert_allclose(value("tversky", alpha=0.5, beta=0.5, **exact),
                               value("dice", **exact), rtol=1e-6)
    np.testing.assert_allclose(value("tversky", alpha=1.0, beta=1.0, **exact),
                               value("iou", **exact), rtol=1e-6)
    np.testing.assert_allclose(value("focal_tversky", alpha=0.3, beta=0.7, gamma=1.0),
                               value("tversky", alpha=0.3, beta=0.7), rtol=1e-6)
    # With the default smoothing the identities hold up to the smoothing terms.
    assert abs(value("tversky") - value("dice")) < 1e-5
    assert abs(value("tversky", alpha=1.0, beta=1.0) - value("iou")) < 1e-5


def test_tversky_alpha_weights_false_positives():
    y_true = np.zeros((1, 4, 4, 4, 2), np.float32)
    y_true[..., 0] = 1
    y_true[0, :2, :, :, :] = [0, 1]  # half the volume is class 1
    over = y_true.copy()
    over[0, 2, :, :, :] = [0, 1]  # over-segmentation: only false positives for class 1
    loss = get_loss("tversky", alpha=0.9, beta=0.1, include_background=False)
    loss_swapped = get_loss("tversky", alpha=0.1, beta=0.9, include_background=False)
    assert float(loss(y_true, over)) > float(loss_swapped(y_true, over))


@pytest.mark.parametrize("name", available_losses())
@pytest.mark.parametrize("kind", ["mixed", "absent_in_batch"])
def test_perfect_prediction_gives_zero(name, kind):
    y_true, _ = make_batch(kind)
    assert abs(float(get_loss(name)(y_true, y_true))) < 1e-6
    logits = 40.0 * (2.0 * y_true - 1.0)
    assert abs(float(get_loss(name, from_logits=True)(y_true, logits))) < 1e-5


def test_dice_is_per_sample_mean_not_flattened_batch():
    y_true, logits = make_batch("mixed")
    per_sample = [float(get_loss("dice", from_logits=True)(y_true[b:b + 1], logits[b:b + 1]))
                  for b in range(len(y_true))]
    np.testing.assert_allclose(float(get_loss("dice", from_logits=True)(y_true, logits)),
                               np.mean(per_sample), rtol=1e-6)


# --------------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------------
GRAD_CASES = [("dice", {}), ("dice", {"squared_pred": True}), ("iou", {}),
              ("tversky", {"alpha": 0.3, "beta": 0.7}), ("focal_tversky", {"gamma": 0.5}),
              ("ce", {"label_smoothing": 0.1}), ("focal", {"gamma": 0.5, "alpha": 0.25})]
GRAD_CASES += [("generalized_dice", {"weight_type": wt}) for wt in ("square", "simple", "uniform")]


@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("include_background", [True, False])
@pytest.mark.parametrize("case", GRAD_CASES, ids=[_case_id(c) for c in GRAD_CASES])
def test_gradients_finite(case, include_background, batch):
    name, options = case
    options = {**options, "include_background": include_background}
    if name not in ("ce", "focal"):
        options["batch"] = batch
    for kind in ("mixed", "absent_in_batch"):
        y_true, logits = make_batch(kind)
        inputs = {  # logits, soft probabilities, and a perfect (exactly one-hot) prediction
            True: [logits, 40.0 * (2.0 * y_true - 1.0)],
            False: [softmax32(logits), y_true.copy()],
        }
        for from_logits, values in inputs.items():
            loss = get_loss(name, from_logits=from_logits, **options)
            for v in values:
                x = tf.Variable(v)
                with tf.GradientTape() as tape:
                    value = loss(y_true, x)
                grad = tape.gradient(value, x)
                assert np.isfinite(float(value))
                assert grad is not None and np.all(np.isfinite(grad.numpy())), (kind, from_logits)


def test_generalized_dice_all_background_without_background_channel():
    """No scored class present: weights fall back to 1, loss penalises false positives."""
    y_true = np.zeros((2, 4, 4, 4, 3), np.float32)
    y_true[..., 0] = 1
    logits = tf.Variable(np.random.default_rng(0).normal(size=y_true.shape).astype(np.float32))
    loss = get_loss("generalized_dice", include_background=False, from_logits=True)
    with tf.GradientTape() as tape:
        value = loss(y_true, logits)
    grad = tape.gradient(value, logits).numpy()
    assert float(value) > 0.99 and np.all(np.isfinite(grad)) and np.abs(grad).max() > 0


@pytest.mark.parametrize("name", available_losses())
def test_losses_compile_under_xla(name):
    y_true, logits = make_batch("mixed")
    loss = get_loss(name, from_logits=True)
    fn = tf.function(lambda t, p: loss(t, p), jit_compile=True)
    np.testing.assert_allclose(float(fn(y_true, logits)), float(loss(y_true, logits)), rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Mixed precision
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", ["dice", "generalized_dice", "focal_tversky", "ce", "focal"])
@pytest.mark.parametrize("from_logits", [False, True])
def test_low_precision_input_accumulates_in_float32(name, dtype, from_logits):
    y_true, logits = make_batch("mixed", spatial=(16, 16, 8))
    y_pred32 = logits if from_logits else softmax32(logits)
    low = tf.cast(y_pred32, dtype)
    rounded = tf.cast(low, "float32")
    loss = get_loss(name, from_logits=from_logits)
    fn = loss.fn  # the pure function, without the Keras wrapper's float32 conversion
    value = fn(y_true, low, **loss.options)
    assert value.dtype == "float32" and tuple(value.shape) == (4,)
    # Identical to the float32 computation on the rounded inputs: accumulation is in float32.
    np.testing.assert_allclose(value.numpy(), fn(y_true, rounded, **loss.options).numpy(),
                               rtol=1e-6)
    # Close to the full float32 value (inputs rounded to 11 / 8 mantissa bits).
    np.testing.assert_allclose(float(np.mean(value)), float(loss(y_true, y_pred32)), rtol=3e-2)
    assert loss(y_true, low).dtype == "float32"


# --------------------------------------------------------------------------------------------
# Errors and configuration
# --------------------------------------------------------------------------------------------
def test_unknown_name_lists_valid_names_and_suggests():
    with pytest.raises(ValueError) as info:
        get_loss("tverski")
    message = str(info.value)
    assert "Did you mean 'tversky'" in message
    for valid in ("dice", "generalized_dice", "iou", "jaccard", "ce", "cross_entropy", "focal"):
        assert f"'{valid}'" in message
    assert "Received: name='tverski'" in message


def test_shape_mismatch_names_both_shapes():
    y_true, logits = make_batch("mixed")
    with pytest.raises(ValueError, match=r"y_true.shape=\(4, 6, 5, 4, 3\).*"
                                         r"y_pred.shape=\(4, 6, 5, 4, 4\)"):
        get_loss("dice")(y_true[..., :3], logits)
    with pytest.raises(ValueError, match=r"y_true.shape=\(4, 6, 5, 4\), y_pred.shape"):
        get_loss("ce")(y_true.argmax(-1).astype(np.float32), logits)


@pytest.mark.parametrize("spec, pattern", [
    ({"name": "tversky", "alpha": -0.1}, r"^Expected a number >= 0 for loss 'tversky'\. Received: alpha=-0\.1\.$"),
    ({"name": "focal_tversky", "beta": -1}, r"Received: beta=-1"),
    ({"name": "tversky", "alpha": 0, "beta": 0}, r"alpha \+ beta > 0"),
    ({"name": "focal", "gamma": 0}, r"Expected a number > 0 for loss 'focal'\. Received: gamma=0\."),
    ({"name": "focal_tversky", "gamma": -2.0}, r"Received: gamma=-2.0"),
    ({"name": "focal", "alpha": 1.5}, r"Received: alpha=1.5"),
    ({"name": "dice", "smooth_nr": "1e-5"}, r"write 1.0e-5"),
    ({"name": "dice", "batch": "true"},
     r"^Expected a boolean for loss 'dice'\. Received: batch='true'\. Write an unquoted true/false\.$"),
    ({"name": "dice", "bach": True},
     r"^Expected an option of loss 'dice' out of \[.*'batch'.*\]\. Received: bach=True\. Did you mean 'batch'\?$"),
    ({"name": "generalized_dice", "class_weights": [1, 2]},
     r"an option of loss 'generalized_dice' out of .* Received: class_weights=\[1, 2\]\.$"),
    ({"name": "generalized_dice", "weight_type": "squared"}, r"Received: weight_type='squared'"),
    ({"name": "ce", "label_smoothing": 1.0}, r"Received: label_smoothing=1.0"),
    ({"name": "ce", "class_weights": [1, -1, 1]}, r"Received: class_weights=\[1, -1, 1\]"),
    ({"name": "iou", "class_weights": "1,2"}, r"Received: class_weights='1,2'"),
    ({"alpha": 0.3}, r"Expected a loss config with a `name`"),
    ({"name": 3}, r"Received: name=3"),
    ({"terms": [{"name": "dice"}], "batch": True}, r"options go into each term"),
    ({"terms": [{"name": "dice", "weight": -1}]}, r"Received: terms\[0\]\.weight=-1\.$"),
    ({"terms": [{"name": "dcie"}]}, r"Received: terms\[0\]\.name='dcie'\. Did you mean 'dice'"),
    ({"terms": ["dice", "tverski"]}, r"Received: terms\[1\]\.name='tverski'\. Did you mean 'tversky'"),
    ({"terms": [{"name": "dice"}, {"name": "tversky", "alpha": -1}]},
     r"^Expected a number >= 0 for loss 'tversky'\. Received: terms\[1\]\.alpha=-1\.$"),
    ({"terms": [{"name": "dice"}, 3]}, r"Received: terms\[1\]=3\.$"),
    ({"terms": [{"name": "dice", "weight": 0}]}, r"positive weight\. Received: weights=\[0\.0\]\.$"),
    ({"terms": []}, r"non-empty list"),
    ({"name": "compound"}, r"\{'terms'"),
])
def test_invalid_options_raise_at_construction(spec, pattern):
    with pytest.raises(ValueError, match=pattern):
        get_loss(spec)


@pytest.mark.parametrize("spec, num_classes, ok", [
    ({"name": "dice", "class_weights": [1, 2, 3]}, 3, True),
    ({"name": "dice", "class_weights": [1, 2, 3]}, 4, False),
    ({"name": "dice", "class_weights": [1, 2], "include_background": False}, 3, True),
    ({"name": "dice", "class_weights": [1, 2, 3], "include_background": False}, 3, False),
    ({"name": "focal", "alpha": [0.2, 0.8]}, 3, False),
    ({"name": "focal", "alpha": 0.25}, 3, True),
    ({"name": "iou", "include_background": False}, 1, False),
    ({"terms": [{"name": "dice"}, {"name": "ce", "class_weights": [1, 2]}]}, 3, False),
])
def test_class_weights_length_checked_against_num_classes(spec, num_classes, ok):
    if ok:
        get_loss(spec, num_classes=num_classes)
    else:
        with pytest.raises(ValueError, match=f"num_classes={num_classes}"):
            get_loss(spec, num_classes=num_classes)


def test_list_prediction_to_plain_loss_points_to_one_loss_per_output():
    y_true, logits = make_batch("mixed")
    with pytest.raises(ValueError, match="one loss per output"):
        get_loss("dice")(y_true, [logits, logits[:, ::2]])


def test_numpy_class_weights_accepted():
    loss = get_loss("dice", class_weights=np.array([1.0, 2.0, 0.5, 1.0]))
    assert loss.options["class_weights"] == [1.0, 2.0, 0.5, 1.0]


def test_class_weights_length_checked_at_call_too():
    y_true, logits = make_batch("mixed")
    with pytest.raises(ValueError, match=r"one entry per scored class: 3"):
        get_loss("dice", class_weights=[1, 1, 1, 1], include_background=False)(y_true, logits)


def test_config_forms_and_aliases():
    a = get_loss("tversky", alpha=0.3, beta=0.7)
    b = get_loss({"name": "tversky", "alpha": 0.3, "beta": 0.7})
    assert isinstance(a, keras.losses.Loss) and a.get_config() == b.get_config()
    assert type(get_loss("jaccard")) is type(get_loss("iou"))
    assert type(get_loss("CE")) is type(get_loss("cross_entropy"))
    assert get_loss({"name": "dice"}, batch=True).options["batch"] is True
    compound = get_loss({"terms": [{"name": "dice", "weight": 1}, {"name": "ce", "weight": 1}]})
    assert isinstance(compound, keras.losses.Loss)
    assert get_loss({"name": "compound", "terms": ["dice", "ce"]}).to_spec() == compound.to_spec()


@pytest.mark.parametrize("spec", [
    {"name": "focal_tversky", "alpha": 0.2, "beta": 0.8, "gamma": 1.5, "include_background": False},
    {"name": "ce", "class_weights": [0.5, 1, 2], "label_smoothing": 0.05},
    {"name": "focal", "alpha": [0.2, 0.3, 0.5]},
    {"terms": [{"name": "generalized_dice", "weight": 0.5, "batch": True},
               {"name": "ce", "weight": 1.0}]},
])
def test_get_config_round_trip(spec):
    y_true, logits = make_batch("mixed", num_classes=3)
    y_pred = softmax32(logits)
    loss = get_loss(spec)
    expected = float(loss(y_true, y_pred))
    again = type(loss).from_config(loss.get_config())
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert again.get_config() == loss.get_config() == restored.get_config()
    assert float(restored(y_true, y_pred)) == pytest.approx(expected, rel=1e-6)


# --------------------------------------------------------------------------------------------
# Deep supervision
# --------------------------------------------------------------------------------------------
def np_average_pool(x, f):
    b, *spatial, c = x.shape
    shape = [b] + [s for n in spatial for s in (n // f, f)] + [c]
    return x.reshape(shape).mean(axis=tuple(range(2, 2 * len(spatial) + 1, 2)))


def test_deep_supervision_weights_are_nnunets():
    np.testing.assert_allclose(deep_supervision_weights(3), [2 / 3, 1 / 3, 0.0])
    np.testing.assert_allclose(deep_supervision_weights(4), [4 / 7, 2 / 7, 1 / 7, 0.0])
    assert deep_supervision_weights(1) == [1.0]
    assert deep_supervision_weights(2) == [1.0, 0.0]
    with pytest.raises(ValueError, match="num_outputs=0"):
        deep_supervision_weights(0)


@pytest.mark.parametrize("mode", ["average", "nearest"])
def test_deep_supervision_targets(mode):
    rng = np.random.default_rng(3)
    y_true = np.eye(3, dtype=np.float32)[rng.integers(0, 3, (2, 8, 8, 8))]
    targets = deep_supervision_targets(y_true, 3, mode)
    assert [tuple(t.shape) for t in targets] == [(2, 8, 8, 8, 3), (2, 4, 4, 4, 3), (2, 2, 2, 2, 3)]
    for i, target in enumerate(targets):
        f = 2 ** i
        expected = (np_average_pool(y_true, f) if mode == "average"
                    else y_true[:, f // 2::f, f // 2::f, f // 2::f])
        np.testing.assert_allclose(np.asarray(target), expected, rtol=1e-6)
    with pytest.raises(ValueError, match=r"divisible.*factors=\(3, 3, 3\)"):
        downsample_target(y_true, (3, 3, 3))
    with pytest.raises(ValueError, match="mode='bilinear'"):
        downsample_target(y_true, (2, 2, 2), "bilinear")


def _two_level_model():
    inputs = keras.Input((8, 8, 8, 1))
    h = keras.layers.Conv3D(4, 3, padding="same", activation="relu")(inputs)
    full = keras.layers.Conv3D(3, 1, name="out0")(h)
    half = keras.layers.Conv3D(3, 1, name="out1")(keras.layers.AveragePooling3D(2)(h))
    quarter = keras.layers.Conv3D(3, 1, name="out2")(keras.layers.AveragePooling3D(4)(h))
    return keras.Model(inputs, [full, half, quarter])


def test_deep_supervision_is_a_plain_multi_output_compile():
    """Keras's compiled loss of the multi-output model = the weighted sum of per-output losses
    on the down-sampled targets, with (B,) sample weights reaching every output."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, 8, 8, 8, 1)).astype(np.float32)
    y_true = np.eye(3, dtype=np.float32)[rng.integers(0, 3, (2, 8, 8, 8))]
    model = _two_level_model()
    loss = get_loss({"terms": [{"name": "dice", "from_logits": True},
                               {"name": "ce", "from_logits": True}]})
    losses, weights = deep_supervision_losses(loss, 3)
    model.compile(optimizer="sgd", loss=losses, loss_weights=weights)
    targets = deep_supervision_targets(y_true, 3)
    sw = np.array([1.0, 0.25], np.float32)
    preds = [np.asarray(p) for p in model(x)]
    expected = sum(w * np.sum(sw * (ref_per_sample("dice", np.asarray(t), p, from_logits=True)
                                    + ref_per_sample("ce", np.asarray(t), p, from_logits=True))) / 2
                   for w, t, p in zip([2 / 3, 1 / 3, 0.0], targets, preds))
    got = model.compute_loss(x=x, y=targets, y_pred=model(x), sample_weight=sw)
    np.testing.assert_allclose(float(got), expected, rtol=RTOL)
    history = model.fit(x, targets, sample_weight=sw, epochs=1, batch_size=2, verbose=0)
    np.testing.assert_allclose(history.history["loss"][0], expected, rtol=RTOL)


# --------------------------------------------------------------------------------------------
# Training: every loss decreases on a tiny 3D model
# --------------------------------------------------------------------------------------------
def _toy_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 16, 16, 16, 1)).astype(np.float32)
    labels = np.digitize(x[..., 0], [-0.4, 0.6])  # 3 classes, a function of the voxel value
    return x, np.eye(3, dtype=np.float32)[labels]


def _toy_model(outputs=1):
    inputs = keras.Input((16, 16, 16, 1))
    h = keras.layers.Conv3D(8, 3, padding="same", activation="relu")(inputs)
    out = [keras.layers.Conv3D(3, 1, activation="softmax")(h)]
    if outputs == 2:
        low = keras.layers.AveragePooling3D(2)(h)
        out.append(keras.layers.Conv3D(3, 1, activation="softmax")(low))
    return inputs, out


TRAIN_SPECS = ["dice", "generalized_dice", {"name": "tversky", "alpha": 0.3, "beta": 0.7},
               "iou", "focal_tversky", "ce", "focal",
               {"terms": [{"name": "dice", "include_background": False}, {"name": "ce"}]}]


@pytest.mark.parametrize("spec", TRAIN_SPECS, ids=lambda s: s if isinstance(s, str) else
                         s.get("name", "compound"))
def test_each_loss_trains_a_tiny_3d_model(spec):
    keras.utils.set_random_seed(0)
    x, y = _toy_data()
    inputs, outputs = _toy_model()
    model = keras.Model(inputs, outputs[0])
    model.compile(optimizer=keras.optimizers.Adam(0.02), loss=get_loss(spec, num_classes=3),
                  jit_compile=False)
    losses = [float(model.train_on_batch(x, y)) for _ in range(8)]
    assert all(np.isfinite(losses))
    assert losses[-1] < losses[0] * 0.98, losses


def test_deep_supervision_trains_a_multi_output_model():
    keras.utils.set_random_seed(0)
    x, y = _toy_data()
    inputs, outputs = _toy_model(outputs=2)
    model = keras.Model(inputs, outputs)
    losses, weights = deep_supervision_losses(get_loss({"terms": ["dice", "ce"]}), 2)
    model.compile(optimizer=keras.optimizers.Adam(0.02), loss=losses, loss_weights=[0.7, 0.3],
                  jit_compile=False)
    targets = deep_supervision_targets(y, 2)
    losses = [float(model.train_on_batch(x, targets)[0]) for _ in range(8)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0] * 0.98, losses


# --------------------------------------------------------------------------------------------
# docs/losses-in-keras.md
# --------------------------------------------------------------------------------------------
DOCS = Path(__file__).resolve().parent.parent / "docs" / "losses-in-keras.md"
DOC_BLOCKS = re.findall(r"```python\n(.*?)```", DOCS.read_text(), flags=re.S)


@pytest.mark.parametrize("index", range(len(DOC_BLOCKS)))
def test_docs_examples_run(index):
    assert len(DOC_BLOCKS) == 4  # the shape rule, regions and ignored voxels, two outputs, deep supervision
    keras.utils.set_random_seed(0)
    exec(compile(DOC_BLOCKS[index], f"{DOCS.name}[{index}]", "exec"), {})
