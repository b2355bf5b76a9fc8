"""Confusion counts in one pass, overlap metrics and their 0/0 rules, case_metrics contract."""
import math
import subprocess
import sys

import numpy as np
import pytest

from segpipe.metrics import case_metrics
from segpipe.metrics.overlap import METRIC_NAMES, ConfusionCounts, confusion_counts, overlap_metrics


def brute_counts(pred, ref, c):
    p, r = pred == c, ref == c
    return ConfusionCounts(
        tp=int((p & r).sum()), fp=int((p & ~r).sum()), fn=int((~p & r).sum()), tn=int((~p & ~r).sum())
    )


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int64])
def test_confusion_counts_match_brute_force(dtype):
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 4, size=(16, 16, 16)).astype(dtype)
    pred = rng.integers(0, 5, size=(16, 16, 16)).astype(dtype)
    counts = confusion_counts(pred, ref, labels=[1, 2, 3, 4, 7])
    for c in (1, 2, 3, 4, 7):
        assert counts[c] == brute_counts(pred, ref, c)
    assert counts[7] == ConfusionCounts(0, 0, 0, 16**3)
    # Default labels: every non-zero value in either map, ascending.
    assert list(confusion_counts(pred, ref)) == [1, 2, 3, 4]


def test_confusion_counts_large_label_values_and_bool():
    ref = np.zeros((8, 8, 8), np.uint16)
    ref[:4] = 5000
    ref[4:6] = 3
    pred = np.roll(ref, 1, axis=0)
    counts = confusion_counts(pred, ref, labels=[3, 5000, 9])
    for c in (3, 5000, 9):
        assert counts[c] == brute_counts(pred, ref, c)
    assert list(confusion_counts(pred, ref)) == [3, 5000]
    mask = ref > 0
    assert confusion_counts(mask, mask)[1] == ConfusionCounts(tp=int(mask.sum()), fp=0, fn=0, tn=int((~mask).sum()))


def test_overlap_formulas():
    m = overlap_metrics(ConfusionCounts(tp=6, fp=2, fn=4, tn=88))
    assert m["dice"] == pytest.approx(12 / 18)
    assert m["iou"] == pytest.approx(6 / 12)
    assert m["precision"] == pytest.approx(6 / 8)
    assert m["recall"] == pytest.approx(6 / 10)
    assert m["specificity"] == pytest.approx(88 / 90)
    assert m["volume_similarity"] == pytest.approx(1 - 2 / 18)  # n_pred 8, n_ref 10


def test_zero_over_zero_rules():
    both_empty = overlap_metrics(ConfusionCounts(0, 0, 0, 10))
    assert all(v == 1.0 for v in both_empty.values())
    missed = overlap_metrics(ConfusionCounts(tp=0, fp=0, fn=5, tn=5))  # pred empty
    assert missed == {"dice": 0.0, "iou": 0.0, "precision": 0.0, "recall": 0.0,
                      "specificity": 1.0, "volume_similarity": 0.0}
    spurious = overlap_metrics(ConfusionCounts(tp=0, fp=5, fn=0, tn=5))  # ref empty
    assert spurious == {"dice": 0.0, "iou": 0.0, "precision": 0.0, "recall": 0.0,
                        "specificity": 0.5, "volume_similarity": 0.0}
    # The reference fills the image: specificity is 0/0, 1 only if the prediction fills it too.
    assert overlap_metrics(ConfusionCounts(tp=10, fp=0, fn=0, tn=0))["specificity"] == 1.0
    assert overlap_metrics(ConfusionCounts(tp=8, fp=0, fn=2, tn=0))["specificity"] == 0.0


def test_case_metrics_contract_and_empty_cases():
    ref = np.zeros((16, 16, 16), np.uint8)
    ref[2:8, 2:8, 2:8] = 1  # class 1 present in both
    ref[10:14, 10:14, 10:14] = 2  # class 2 missed
    pred = ref.copy()
    pred[10:14, 10:14, 10:14] = 0
    pred[0:2, 12:16, 0:3] = 3  # class 3 spurious
    spacing_mm = (1.5, 1.0, 0.5)
    m = case_metrics(pred, ref, labels=[1, 2, 3, 4], spacing_mm=spacing_mm, tolerance_mm=2.0)
    assert list(m) == [1, 2, 3, 4]
    for row in m.values():
        assert tuple(row) == METRIC_NAMES
    assert m[1]["dice"] == 1.0 and m[1]["hd"] == 0.0 and m[1]["empty"] is False
    assert m[1]["vol_ref_ml"] == pytest.approx(216 * 0.75 / 1000)
    for c in (2, 3):  # exactly one empty
        assert (m[c]["dice"], m[c]["iou"], m[c]["nsd"]) == (0.0, 0.0, 0.0)
        assert all(math.isnan(m[c][k]) for k in ("hd", "hd95", "assd"))
        assert m[c]["empty"] is False
    assert (m[2]["n_ref"], m[2]["n_pred"], m[3]["n_ref"], m[3]["n_pred"]) == (64, 0, 0, 24)
    # Both empty: perfect, flagged.
    assert (m[4]["dice"], m[4]["iou"], m[4]["nsd"], m[4]["hd"], m[4]["hd95"], m[4]["assd"]) == (1, 1, 1, 0, 0, 0)
    assert m[4]["empty"] is True and m[4]["tn"] == ref.size
    # Counts are Python ints (JSON/CSV friendly).
    assert type(m[1]["tp"]) is int


def test_case_metrics_labels_default_and_tolerance_dict():
    ref = np.zeros((12, 12, 12), np.uint8)
    ref[2:6, 2:6, 2:6] = 1
    pred = np.roll(ref, 1, axis=0)
    pred[8:10, 8:10, 8:10] = 2
    m = case_metrics(pred, ref)
    assert list(m) == [1, 2]
    tight = case_metrics(pred, ref, labels=[1], tolerance_mm={1: 0.5})[1]["nsd"]
    loose = case_metrics(pred, ref, labels=[1], tolerance_mm={1: 1.0})[1]["nsd"]
    assert tight < loose == 1.0


def test_case_metrics_argument_errors():
    a = np.zeros((4, 4, 4), np.uint8)
    with pytest.raises(TypeError,
                       match=r"^Expected an integer label map\. Received: pred\.dtype=float32\. Round or cast"):
        case_metrics(a.astype(np.float32), a)
    with pytest.raises(ValueError,
                       match=r"^Expected pred of the same shape as ref \(4, 4, 5\)\. Received: "
                             r"pred\.shape=\(4, 4, 4\)\.$"):
        case_metrics(a, np.zeros((4, 4, 5), np.uint8))
    with pytest.raises(ValueError, match=r"^Expected non-negative label values in ref\. Received: min\(ref\)=-1\.$"):
        case_metrics(a, a.astype(np.int8) - 1)
    with pytest.raises(ValueError,
                       match=r"^Expected distinct positive label values \(0 is background\)\. "
                             r"Received: labels=\[0, 1\]\.$"):
        case_metrics(a, a, labels=[0, 1])
    with pytest.raises(ValueError,
                       match=r"^Expected a tolerance_mm entry for every scored label \[1, 2\]\. Received: "
                             r"tolerance_mm=\{1: 1\.0\} \(missing \[2\]\)\.$"):
        case_metrics(a, a, labels=[1, 2], tolerance_mm={1: 1.0})
    with pytest.raises(ValueError,
                       match=r"^Expected 3 positive finite values \(one per array axis\)\. Received: "
                             r"spacing_mm=\(1\.0, 1\.0\)\.$"):
        case_metrics(a, a, spacing_mm=(1.0, 1.0))
    with pytest.raises(TypeError):
        case_metrics(a, a, [1])  # options are keyword-only


def test_metrics_package_does_not_import_tensorflow():
    code = "import sys, segpipe.metrics; print('tensorflow' in sys.modules or 'keras' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
