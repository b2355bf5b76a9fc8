"""Losses with ignored voxels and on region (sigmoid) targets, against an independent float64
NumPy reference: the loss with an ignore label must equal the loss on the annotated voxels alone.

Both representations of an ignored voxel are tested (docs/losses.md, "Ignored voxels"): an all-zero
one-hot row, and one extra last ignore-mask channel (the form region targets use).
"""
import keras  # noqa: E402,F401  (after segpipe, which sets the backend)
import numpy as np
import pytest

from segpipe.losses import get_loss

EPS = 1e-7
S = 1e-5  # smooth_nr = smooth_dr default


def ratios(name, tp, fp, fn):
    if name == "dice":
        return 1 - (2 * tp + S) / (2 * tp + fp + fn + S)
    if name == "tversky":
        return 1 - (tp + S) / (tp + 0.5 * fp + 0.5 * fn + S)
    if name == "iou":
        return 1 - (tp + S) / (tp + fp + fn + S)
    if name == "focal_tversky":
        return (1 - (tp + S) / (tp + 0.3 * fp + 0.7 * fn + S)) ** 0.75
    raise AssertionError(name)


def ref_sample(name, g, p, sigmoid=False):
    """One sample's loss over its annotated voxels only: g, p (N, C) float64, N annotated voxels."""
    tp = (p * g).sum(0)
    fp = (p * (1 - g)).sum(0)
    fn = ((1 - p) * g).sum(0)
    if name in ("dice", "tversky", "iou", "focal_tversky"):
        return ratios(name, tp, fp, fn).mean()
    if name == "generalized_dice":
        vol = g.sum(0)
        w = np.where(vol > 0, 1 / np.where(vol > 0, vol, 1) ** 2, 0)
        w = np.where(vol > 0, w, w.max()) if w.max() > 0 else np.ones_like(w)
        return 1 - (2 * (w * tp).sum() + S) / ((w * (2 * tp + fp + fn)).sum() + S)
    logp, log1mp = np.log(np.clip(p, EPS, 1)), np.log(np.clip(1 - p, EPS, 1))
    if name == "cross_entropy":
        if sigmoid:
            return -(g * logp + (1 - g) * log1mp).mean(1).mean()
        return -(g * logp).sum(1).mean()
    if name == "focal":
        if sigmoid:
            return -((1 - p) ** 2 * g * logp + p ** 2 * (1 - g) * log1mp).mean(1).mean()
        return -((1 - p) ** 2 * g * logp).sum(1).mean()
    if name == "dice+ce":
        return ref_sample("dice", g, p, sigmoid) + ref_sample("cross_entropy", g, p, sigmoid)
    raise AssertionError(name)


def make_loss(name, **options):
    if name == "dice+ce":
        return get_loss({"terms": [{"name": "dice", **options}, {"name": "ce", **options}]})
    return get_loss(name, **options)


ALL = ["dice", "generalized_dice", "tversky", "iou", "focal_tversky", "cross_entropy", "focal", "dice+ce"]
REGION_LOSSES = ["dice", "tversky", "iou", "cross_entropy", "focal_tversky", "focal", "dice+ce"]


def softmax_case(seed, shape=(2, 5, 4, 3), c=3):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, shape)
    ignored = rng.random(shape) < 0.35
    ignored[1, 0] = True  # a whole slab of sample 1 unannotated
    onehot = np.eye(c)[labels]
    x = rng.normal(size=(*shape, c)) * 2
    p = np.exp(x) / np.exp(x).sum(-1, keepdims=True)
    return onehot, ignored, p


@pytest.mark.parametrize("form", ["zero_row", "mask_channel"])
@pytest.mark.parametrize("name", ALL)
def test_softmax_loss_with_ignored_voxels_equals_loss_on_annotated_voxels(name, form):
    onehot, ignored, p = softmax_case(1)
    y_true = onehot * ~ignored[..., None]
    if form == "mask_channel":
        y_true = np.concatenate([y_true, ignored[..., None].astype(float)], axis=-1)
    values = np.asarray(make_loss(name).call(y_true.astype("float32"), p.astype("float32")))
    for b in range(2):
        keep = ~ignored[b].reshape(-1)
        ref = ref_sample(name, onehot[b].reshape(-1, 3)[keep], p[b].reshape(-1, 3)[keep])
        np.testing.assert_allclose(values[b], ref, rtol=2e-5, atol=1e-6)
    # and the ignored voxels' predictions do not matter at all
    p2 = np.where(ignored[..., None], np.roll(p, 1, axis=-1), p)
    values2 = np.asarray(make_loss(name).call(y_true.astype("float32"), p2.astype("float32")))
    np.testing.assert_allclose(values2, values, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", REGION_LOSSES)
@pytest.mark.parametrize("with_ignore", [False, True])
def test_region_losses_against_float64_reference(name, with_ignore):
    rng = np.random.default_rng(7)
    shape = (2, 4, 4, 3)
    labels = rng.integers(0, 4, shape)
    regions = np.stack([labels >= 1, labels >= 2, labels == 3], -1).astype(float)  # nested
    ignored = (rng.random(shape) < 0.3) if with_ignore else np.zeros(shape, bool)
    y_true = regions * ~ignored[..., None]
    if with_ignore:
        y_true = np.concatenate([y_true, ignored[..., None].astype(float)], -1)
    logits = rng.normal(size=(*shape, 3)) * 2
    p = 1 / (1 + np.exp(-logits))
    loss = make_loss(name, sigmoid=True)
    values = np.asarray(loss.call(y_true.astype("float32"), p.astype("float32")))
    from_logits = np.asarray(make_loss(name, sigmoid=True, from_logits=True).call(
        y_true.astype("float32"), logits.astype("float32")))
    for b in range(2):
        keep = ~ignored[b].reshape(-1)
        ref = ref_sample(name, regions[b].reshape(-1, 3)[keep], p[b].reshape(-1, 3)[keep], sigmoid=True)
        np.testing.assert_allclose(values[b], ref, rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(from_logits[b], ref, rtol=2e-4, atol=1e-5)


def test_binary_ce_equals_keras_binary_crossentropy():
    rng = np.random.default_rng(3)
    y = (rng.random((2, 3, 3, 2, 3)) < 0.4).astype("float32")
    p = rng.uniform(0.05, 0.95, y.shape).astype("float32")
    ours = float(get_loss("ce", sigmoid=True)(y, p))
    theirs = float(keras.losses.BinaryCrossentropy()(y, p))
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)


def test_sigmoid_refuses_dropping_the_background():
    with pytest.raises(ValueError, match="include_background"):
        get_loss("dice", sigmoid=True, include_background=False)


def test_voxel_weights_with_ignored_voxels():
    """Voxel weights and ignored voxels combine: the sample's value is the weighted mean over its
    annotated voxels, and its weight stays the voxel mean of its weights."""
    onehot, ignored, p = softmax_case(2)
    y_true = (onehot * ~ignored[..., None]).astype("float32")
    w = np.random.default_rng(0).uniform(0.5, 2.0, ignored.shape)
    loss = get_loss("ce", reduction=None)
    values = np.asarray(loss(y_true, p.astype("float32"), sample_weight=w.astype("float32")))
    for b in range(2):
        keep = ~ignored[b].reshape(-1)
        l_v = -(onehot[b].reshape(-1, 3) * np.log(p[b].reshape(-1, 3))).sum(1)
        wb = w[b].reshape(-1)
        ref = (wb[keep] * l_v[keep]).sum() / wb[keep].sum() * wb.mean()
        np.testing.assert_allclose(values[b], ref, rtol=2e-5)


def test_fully_ignored_sample_is_zero_and_finite():
    y_true = np.zeros((1, 3, 3, 2, 3), "float32")
    p = np.full((1, 3, 3, 2, 3), 1 / 3, "float32")
    for name in ALL:
        value = np.asarray(make_loss(name).call(y_true, p))
        assert np.all(np.isfinite(value)), name
    assert float(get_loss("ce").call(y_true, p)[0]) == 0.0
