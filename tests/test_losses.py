"""Tests for segpipe.losses against an independent float64 NumPy reference (from the formulas).

The reference below loops over samples (or the whole batch) and classes and does not import the
module's math. Inputs include empty classes, all-background samples and single-voxel structures.
"""
import itertools

import numpy as np
import pytest

from segpipe.losses import (
    DeepSupervisionLoss, available_losses, deep_supervision_weights, get_loss,
    validate_loss_config)
import keras  # noqa: E402  (after segpipe, which sets the backend)
import tensorflow as tf  # noqa: E402

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


def ref_loss(name, y_true, y_pred, **options):
    name = {"ce": "cross_entropy", "jaccard": "iou"}.get(name, name)
    o = {**DEFAULTS[name], **options}
    g, p, log_p = ref_prepare(y_true, y_pred, o)
    n = g.shape[-1]
    if name in ("cross_entropy", "focal"):
        if name == "cross_entropy":
            w = np.ones(n) if o["class_weights"] is None else np.asarray(o["class_weights"])
            per_voxel = -(w * g * log_p).sum(-1)
        else:
            a = o["alpha"]
            if a is None:
                w = np.ones(n)
            elif np.isscalar(a):
                w = np.array([1 - a] + [a] * (y_true.shape[-1] - 1))
                w = w if o["include_background"] else w[1:]
            else:
                w = np.asarray(a)
            mod = np.maximum(1 - p, 0) ** o["gamma"]
            per_voxel = -(w * mod * g * log_p).sum(-1)
        return per_voxel.mean()

    # region losses: groups are samples, or the whole batch with batch=True
    if o["batch"]:
        groups = [(g.reshape(-1, n), p.reshape(-1, n))]
    else:
        groups = [(g[b].reshape(-1, n), p[b].reshape(-1, n)) for b in range(g.shape[0])]
    snr, sdr = o["smooth_nr"], o["smooth_dr"]
    values = []
    for gg, pp in groups:
        tp = np.array([np.sum(pp[:, c] * gg[:, c]) for c in range(n)])
        fp = np.array([np.sum(pp[:, c] * (1 - gg[:, c])) for c in range(n)])
        fn = np.array([np.sum((1 - pp[:, c]) * gg[:, c]) for c in range(n)])
        if name == "generalized_dice":
            vol = gg.sum(0)
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
                den = (np.sum(pp[:, c] ** 2) + np.sum(gg[:, c] ** 2) if o["squared_pred"]
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
    return np.mean(values)


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
def test_matches_numpy_reference(case, kind):
    name, options = case
    y_true, logits = make_batch(kind)
    y_pred = logits if options.get("from_logits") else softmax32(logits)
    loss = get_loss(name, **options)
    value = loss(y_true, y_pred)
    assert value.dtype == "float32" and tuple(value.shape) == ()
    np.testing.assert_allclose(float(value), ref_loss(name, y_true, y_pred, **options),
                               rtol=RTOL, atol=1e-7)


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
    assert value.dtype == "float32"
    # Identical to the float32 computation on the rounded inputs: accumulation is in float32.
    np.testing.assert_allclose(float(value), float(fn(y_true, rounded, **loss.options)),
                               rtol=1e-6)
    # Close to the full float32 value (inputs rounded to 11 / 8 mantissa bits).
    np.testing.assert_allclose(float(value), float(loss(y_true, y_pred32)), rtol=3e-2)
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
    ({"name": "tversky", "alpha": -0.1}, r"Expected a number >= 0. Received: alpha=-0.1"),
    ({"name": "focal_tversky", "beta": -1}, r"Received: beta=-1"),
    ({"name": "tversky", "alpha": 0, "beta": 0}, r"alpha \+ beta > 0"),
    ({"name": "focal", "gamma": 0}, r"Expected a number > 0. Received: gamma=0"),
    ({"name": "focal_tversky", "gamma": -2.0}, r"Received: gamma=-2.0"),
    ({"name": "focal", "alpha": 1.5}, r"Received: alpha=1.5"),
    ({"name": "dice", "smooth_nr": "1e-5"}, r"write 1.0e-5"),
    ({"name": "dice", "batch": "true"}, r"Expected a boolean. Received: batch='true'"),
    ({"name": "dice", "bach": True}, r"Unknown option `bach`.*Did you mean `batch`"),
    ({"name": "generalized_dice", "class_weights": [1, 2]}, r"Unknown option `class_weights`"),
    ({"name": "generalized_dice", "weight_type": "squared"}, r"Received: weight_type='squared'"),
    ({"name": "ce", "label_smoothing": 1.0}, r"Received: label_smoothing=1.0"),
    ({"name": "ce", "class_weights": [1, -1, 1]}, r"Received: class_weights=\[1, -1, 1\]"),
    ({"name": "iou", "class_weights": "1,2"}, r"Received: class_weights='1,2'"),
    ({"alpha": 0.3}, r"Expected a loss config with a `name`"),
    ({"name": 3}, r"Received: name=3"),
    ({"terms": [{"name": "dice"}], "batch": True}, r"options go into each term"),
    ({"terms": [{"name": "dice", "weight": -1}]}, r"Received: weight=-1"),
    ({"terms": [{"name": "dcie"}]}, r"Did you mean 'dice'"),
    ({"terms": []}, r"non-empty list"),
    ({"name": "compound"}, r"\{'terms'"),
])
def test_invalid_options_raise_at_construction(spec, pattern):
    with pytest.raises(ValueError, match=pattern):
        get_loss(spec)
    with pytest.raises(ValueError, match=pattern):
        validate_loss_config(spec)


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
        assert validate_loss_config(spec, num_classes=num_classes) is None
        get_loss(spec, num_classes=num_classes)
    else:
        with pytest.raises(ValueError, match=f"num_classes={num_classes}"):
            validate_loss_config(spec, num_classes=num_classes)
        with pytest.raises(ValueError, match=f"num_classes={num_classes}"):
            get_loss(spec, num_classes=num_classes)


def test_list_prediction_to_plain_loss_points_to_deep_supervision():
    y_true, logits = make_batch("mixed")
    with pytest.raises(ValueError, match="DeepSupervisionLoss"):
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


def test_deep_supervision_weights():
    np.testing.assert_allclose(deep_supervision_weights(3), [4 / 7, 2 / 7, 1 / 7])
    assert deep_supervision_weights(1) == [1.0]
    with pytest.raises(ValueError, match="num_outputs=0"):
        deep_supervision_weights(0)


@pytest.mark.parametrize("mode", ["average", "nearest"])
def test_deep_supervision_matches_manual_sum(mode):
    rng = np.random.default_rng(3)
    y_true = np.eye(3, dtype=np.float32)[rng.integers(0, 3, (2, 8, 8, 8))]
    preds = [rng.normal(size=(2, n, n, n, 3)).astype(np.float32) for n in (8, 4, 2)]
    base = {"name": "dice", "from_logits": True}
    ds = DeepSupervisionLoss(base, num_outputs=3, target_downsampling=mode)
    expected = 0.0
    for i, (w, p) in enumerate(zip([4 / 7, 2 / 7, 1 / 7], preds)):
        f = 2 ** i
        target = (np_average_pool(y_true, f) if mode == "average"
                  else y_true[:, f // 2::f, f // 2::f, f // 2::f])
        expected += w * ref_loss("dice", target, p, from_logits=True)
    np.testing.assert_allclose(float(ds(y_true, preds)), expected, rtol=RTOL)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(ds))
    np.testing.assert_allclose(float(restored(y_true, tuple(preds))), expected, rtol=RTOL)


def test_deep_supervision_errors():
    y_true = np.eye(3, dtype=np.float32)[np.zeros((1, 8, 8, 8), int)]
    ds = DeepSupervisionLoss(get_loss("dice"), num_outputs=2)
    with pytest.raises(ValueError, match=r"Expected 2 deep-supervision outputs"):
        ds(y_true, [y_true])
    with pytest.raises(ValueError, match=r"y_pred\[1\].shape=\(1, 3, 3, 3, 3\)"):
        ds(y_true, [y_true, np.zeros((1, 3, 3, 3, 3), np.float32)])
    with pytest.raises(ValueError, match="target_downsampling"):
        DeepSupervisionLoss("dice", target_downsampling="bilinear")


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


class DeepSupervisionModel(keras.Model):
    """What the training code does: the deep-supervision loss called from compute_loss."""

    def __init__(self, *args, ds_loss, **kwargs):
        super().__init__(*args, **kwargs)
        self.ds_loss = ds_loss

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        return self.ds_loss(y, y_pred)


def test_deep_supervision_trains_in_compute_loss():
    keras.utils.set_random_seed(0)
    x, y = _toy_data()
    inputs, outputs = _toy_model(outputs=2)
    ds = DeepSupervisionLoss(get_loss({"terms": ["dice", "ce"]}), num_outputs=2)
    model = DeepSupervisionModel(inputs, outputs, ds_loss=ds)
    model.compile(optimizer=keras.optimizers.Adam(0.02), jit_compile=False)
    losses = [float(model.train_on_batch(x, y)) for _ in range(8)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0] * 0.98, losses
