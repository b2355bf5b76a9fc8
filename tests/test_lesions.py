"""Lesion-wise metrics on hand-built cases (expected values worked out in the comments) and against
an independent lesion-by-lesion reference implementation."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from scipy import ndimage

from segpipe.metrics.lesions import (
    LESION_METRIC_NAMES,
    case_lesion_metrics,
    label_lesions,
    lesion_metrics,
    match_lesions,
    summarize_lesions,
)

ISO = (1.0, 1.0, 1.0)


def _empty(shape=(16, 16, 16)):
    return np.zeros(shape, dtype=bool)


def _metrics(pred, ref, spacing_mm=ISO, min_size_mm3=0.0):
    return lesion_metrics(match_lesions(pred, ref, spacing_mm=spacing_mm, min_size_mm3=min_size_mm3))


def test_one_lesion_split_in_two():
    ref = _empty()
    ref[2:6, 2:6, 2:6] = True  # 64 voxels
    pred = _empty()
    pred[2:6, 2:6, 2:3] = True  # 16 voxels, z = 2
    pred[2:6, 2:6, 4:6] = True  # 32 voxels, z = 4..5; the gap at z = 3 makes two components
    m = _metrics(pred, ref)
    # One reference lesion, found by both pieces: TP 1, FN 0, FP 0, precision 2/2, recall 1/1.
    assert (m["n_ref_lesions"], m["n_pred_lesions"]) == (1, 2)
    assert (m["lesion_tp"], m["lesion_fn"], m["lesion_fp"]) == (1, 0, 0)
    assert m["lesion_precision"] == 1.0 and m["lesion_recall"] == 1.0 and m["lesion_f1"] == 1.0
    # Dice of the lesion with the union of both pieces: 2 * 48 / (64 + 48) = 6/7.
    assert m["lesion_dice"] == pytest.approx(6 / 7, abs=1e-12)


def test_two_lesions_merged_into_one():
    ref = _empty()
    ref[2:5, 2:5, 2:5] = True  # 27 voxels, x = 2..4
    ref[6:9, 2:5, 2:5] = True  # 27 voxels, x = 6..8 (x = 5 is the gap)
    pred = _empty()
    pred[2:9, 2:5, 2:5] = True  # 7 * 3 * 3 = 63 voxels covering both lesions and the gap
    m = _metrics(pred, ref)
    # Both lesions are touched by the single component: TP 2, FP 0, precision 1/1, recall 2/2.
    assert (m["n_ref_lesions"], m["n_pred_lesions"]) == (2, 1)
    assert (m["lesion_tp"], m["lesion_fn"], m["lesion_fp"]) == (2, 0, 0)
    assert m["lesion_f1"] == 1.0
    # Each lesion is compared with the whole merged component: 2 * 27 / (27 + 63) = 0.6; mean 0.6.
    assert m["lesion_dice"] == pytest.approx(0.6, abs=1e-12)


def test_missed_lesion():
    ref = _empty()
    ref[2:5, 2:5, 2:5] = True  # A: 27 voxels
    ref[10:12, 10:12, 10:12] = True  # B: 8 voxels, far away
    pred = _empty()
    pred[2:5, 2:5, 2:5] = True  # exactly A
    m = _metrics(pred, ref)
    # TP 1 (A), FN 1 (B), FP 0; precision 1/1, recall 1/2, F1 = 2 * 1 * 0.5 / 1.5 = 2/3.
    assert (m["lesion_tp"], m["lesion_fn"], m["lesion_fp"]) == (1, 1, 0)
    assert m["lesion_precision"] == 1.0
    assert m["lesion_recall"] == 0.5
    assert m["lesion_f1"] == pytest.approx(2 / 3, abs=1e-12)
    # Dice_A = 1, Dice_B = 0 (missed), no false positives: (1 + 0) / 2.
    assert m["lesion_dice"] == pytest.approx(0.5, abs=1e-12)


def test_spurious_lesion():
    ref = _empty()
    ref[2:5, 2:5, 2:5] = True  # A: 27 voxels
    pred = ref.copy()
    pred[10:12, 10:12, 10:12] = True  # C: touches no reference lesion
    m = _metrics(pred, ref)
    # TP 1, FN 0, FP 1; precision 1/2, recall 1/1, F1 = 2/3.
    assert (m["lesion_tp"], m["lesion_fn"], m["lesion_fp"]) == (1, 0, 1)
    assert m["lesion_precision"] == 0.5 and m["lesion_recall"] == 1.0
    assert m["lesion_f1"] == pytest.approx(2 / 3, abs=1e-12)
    # Dice_A = 1, the false positive counts as 0 in a mean over 1 + 1 entries.
    assert m["lesion_dice"] == pytest.approx(0.5, abs=1e-12)


def test_partial_overlap_dice():
    ref = _empty()
    ref[2:6, 2:6, 2:6] = True  # 64 voxels
    pred = _empty()
    pred[4:8, 2:6, 2:6] = True  # 64 voxels, half of them inside the lesion (32 shared)
    m = _metrics(pred, ref)
    assert m["lesion_tp"] == 1 and m["lesion_fp"] == 0
    assert m["lesion_dice"] == pytest.approx(2 * 32 / 128, abs=1e-12)


def test_empty_masks():
    empty = _empty()
    m = _metrics(empty, empty)
    assert m["lesion_dice"] == 1.0
    assert (m["lesion_precision"], m["lesion_recall"], m["lesion_f1"]) == (1.0, 1.0, 1.0)
    assert (m["lesion_tp"], m["lesion_fn"], m["lesion_fp"]) == (0, 0, 0)

    blob = _empty()
    blob[3:5, 3:5, 3:5] = True
    only_pred = _metrics(blob, empty)  # a false positive in a lesion-free case
    assert only_pred["lesion_dice"] == 0.0 and only_pred["lesion_fp"] == 1
    assert (only_pred["lesion_precision"], only_pred["lesion_recall"], only_pred["lesion_f1"]) == (0.0, 0.0, 0.0)
    only_ref = _metrics(empty, blob)  # a missed lesion and nothing predicted
    assert only_ref["lesion_dice"] == 0.0 and only_ref["lesion_fn"] == 1
    assert (only_ref["lesion_precision"], only_ref["lesion_recall"], only_ref["lesion_f1"]) == (0.0, 0.0, 0.0)


def test_26_connectivity():
    mask = _empty((6, 6, 6))
    mask[1, 1, 1] = mask[2, 2, 2] = True  # touch at a corner only: one lesion with 26 neighbours
    mask[4, 4, 4] = True  # one voxel apart from (2, 2, 2) in every axis: a second lesion
    labels, n = label_lesions(mask, spacing_mm=ISO)
    assert n == 2
    assert labels[1, 1, 1] == labels[2, 2, 2] != labels[4, 4, 4]
    assert n < ndimage.label(mask)[1]  # scipy's default (6 neighbours) would see three


def test_min_size_in_mm3_uses_the_spacing():
    ref = _empty()
    ref[2:6, 2:6, 2:6] = True  # 64 voxels
    ref[10:12, 10:12, 10:12] = True  # 8 voxels
    pred = ref.copy()
    pred[13, 13, 13] = True  # 1 voxel, spurious
    spacing = (1.0, 1.0, 2.0)  # 2 mm³ voxels: the lesions are 128 mm³, 16 mm³; the speck 2 mm³
    kept = _metrics(pred, ref, spacing, min_size_mm3=2.0)  # ">=": nothing dropped
    assert (kept["n_ref_lesions"], kept["n_pred_lesions"], kept["lesion_fp"]) == (2, 3, 1)
    dropped = _metrics(pred, ref, spacing, min_size_mm3=16.5)  # drops the 16 mm³ lesion and the speck
    assert (dropped["n_ref_lesions"], dropped["n_pred_lesions"], dropped["lesion_fp"]) == (1, 1, 0)
    assert dropped["lesion_dice"] == 1.0
    iso = _metrics(pred, ref, ISO, min_size_mm3=16.5)  # 1 mm³ voxels: 8 mm³ lesion dropped too
    assert iso["n_ref_lesions"] == 1


def test_case_lesion_metrics_per_label():
    ref = np.zeros((12, 12, 12), dtype=np.uint8)
    ref[1:4, 1:4, 1:4] = 1
    ref[6:8, 6:8, 6:8] = 2
    ref[9:11, 9:11, 9:11] = 2
    pred = ref.copy()
    pred[9:11, 9:11, 9:11] = 0  # misses the second lesion of label 2
    out = case_lesion_metrics(pred, ref, labels=[1, 2], spacing_mm=ISO)
    assert out[1]["lesion_dice"] == 1.0 and out[1]["n_ref_lesions"] == 1
    assert out[2]["lesion_dice"] == 0.5 and out[2]["lesion_fn"] == 1
    assert set(out[1]) == set(LESION_METRIC_NAMES)


def _reference_lesion_metrics(pred, ref, dilation=0):
    """Lesion by lesion with explicit masks, as the BraTS 2023 code does (no size threshold): reference
    lesions merged when their dilations touch, each dilated on its own to find the touching components."""
    structure = np.ones((3, 3, 3), dtype=bool)
    ref_cc, n_ref = ndimage.label(ref, structure)
    pred_cc, n_pred = ndimage.label(pred, structure)
    dilate = ndimage.generate_binary_structure(3, 2)
    if dilation:
        merged, n_ref = ndimage.label(ndimage.binary_dilation(ref, dilate, iterations=dilation), structure)
        ref_cc = np.where(ref, merged, 0)
    dice_sum, matched = 0.0, set()
    tp = 0
    for i in range(1, n_ref + 1):
        lesion = ref_cc == i
        reach = ndimage.binary_dilation(lesion, dilate, iterations=dilation) if dilation else lesion
        touching = [j for j in np.unique(pred_cc[reach]) if j != 0]
        matched.update(touching)
        union = np.isin(pred_cc, touching)
        dice_sum += 2.0 * np.sum(lesion & union, dtype=np.float64) / (lesion.sum() + union.sum())
        tp += bool(touching)
    fp = n_pred - len(matched)
    dice = 1.0 if n_ref + fp == 0 else dice_sum / (n_ref + fp)
    return {"lesion_tp": tp, "lesion_fp": fp, "lesion_fn": n_ref - tp, "lesion_dice": dice,
            "n_ref_lesions": n_ref, "n_pred_lesions": n_pred}


@pytest.mark.parametrize("dilation", [0, 1, 2])
@pytest.mark.parametrize("seed", range(4))
def test_matches_lesion_by_lesion_reference(seed, dilation):
    rng = np.random.default_rng(seed)
    shape = (36, 34, 30)  # sparse blobs: dozens of lesions, misses, false positives, merges by dilation

    def blobs(threshold):
        field = ndimage.gaussian_filter(rng.standard_normal(shape), 1.5)
        return field > threshold * field.std()

    ref = blobs(2.2)
    pred = blobs(2.2) | (ref & (rng.random(shape) < 0.7))
    ours = lesion_metrics(match_lesions(pred, ref, spacing_mm=ISO, dilation_vox=dilation))
    expected = _reference_lesion_metrics(pred, ref, dilation)
    assert expected["n_ref_lesions"] > 1 and expected["n_pred_lesions"] > 1  # a non-trivial case
    for key, value in expected.items():
        assert ours[key] == pytest.approx(value, abs=1e-12), key


def test_dilation_merges_close_lesions_and_reaches_near_components():
    ref = _empty()
    ref[2:5, 2:5, 2:5] = True  # A: 27 voxels, x = 2..4
    ref[7:10, 2:5, 2:5] = True  # B: 27 voxels, x = 7..9; the gap is x = 5, 6
    pred = _empty()
    pred[2:5, 2:5, 2:5] = True  # exactly A
    # No dilation: two lesions, B missed: (1 + 0) / 2.
    assert _metrics(pred, ref)["lesion_dice"] == 0.5
    # One dilation step: A reaches x = 5, B reaches x = 6, the reaches touch: one lesion of 54 voxels,
    # found by the component A: Dice 2 * 27 / (54 + 27) = 2/3, one TP, no FN.
    m = lesion_metrics(match_lesions(pred, ref, spacing_mm=ISO, dilation_vox=1))
    assert (m["n_ref_lesions"], m["lesion_tp"], m["lesion_fn"]) == (1, 1, 0)
    assert m["lesion_dice"] == pytest.approx(2 / 3, abs=1e-12)

    near = ref.copy()
    near[7:10] = False  # only A
    speck = near.copy()
    speck[6, 3, 3] = True  # a predicted voxel two steps from A (x = 4 -> 6), not touching it
    assert _metrics(speck, near)["lesion_fp"] == 1  # overlap: a false positive, Dice (1 + 0) / 2
    one = lesion_metrics(match_lesions(speck, near, spacing_mm=ISO, dilation_vox=1))
    assert one["lesion_fp"] == 1 and one["lesion_dice"] == 0.5  # x = 5 is the reach: still outside
    two = lesion_metrics(match_lesions(speck, near, spacing_mm=ISO, dilation_vox=2))
    # within reach: matched, and part of the union: Dice 2 * 27 / (27 + 28) = 54/55
    assert two["lesion_fp"] == 0 and two["lesion_precision"] == 1.0
    assert two["lesion_dice"] == pytest.approx(54 / 55, abs=1e-12)
    with pytest.raises(ValueError, match="dilation_vox"):
        match_lesions(speck, near, spacing_mm=ISO, dilation_vox=-1)


def test_summary_pools_counts_and_averages_dice():
    rows = [
        {"case": "a", "class": 2, "n_ref_lesions": 2, "n_pred_lesions": 1, "lesion_tp": 1, "lesion_fn": 1,
         "lesion_fp": 0, "lesion_precision": 1.0, "lesion_recall": 0.5, "lesion_f1": 2 / 3, "lesion_dice": 0.5},
        {"case": "b", "class": 2, "n_ref_lesions": 1, "n_pred_lesions": 3, "lesion_tp": 1, "lesion_fn": 0,
         "lesion_fp": 2, "lesion_precision": 1 / 3, "lesion_recall": 1.0, "lesion_f1": 0.5, "lesion_dice": 0.25},
    ]
    s = summarize_lesions(rows)["2"]
    assert s["n_cases"] == 2
    assert s["lesion_dice"]["mean"] == pytest.approx(0.375)
    assert (s["n_ref_lesions"], s["lesion_tp"], s["lesion_fn"], s["lesion_fp"]) == (3, 2, 1, 2)
    # pooled: precision (4 - 2) / 4 = 0.5, recall 2 / 3, F1 = 2 * 0.5 * (2/3) / (0.5 + 2/3) = 4/7
    assert s["pooled_precision"] == 0.5
    assert s["pooled_recall"] == pytest.approx(2 / 3)
    assert s["pooled_f1"] == pytest.approx(4 / 7)


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match=r"^Expected a boolean array\. Received: pred_mask\.dtype=uint8\.$"):
        match_lesions(np.zeros((4, 4, 4), np.uint8), _empty((4, 4, 4)), spacing_mm=ISO)
    with pytest.raises(ValueError,
                       match=r"^Expected pred_mask of the same shape as ref_mask \(4, 4, 5\)\. Received: "
                             r"pred_mask\.shape=\(4, 4, 4\)\.$"):
        match_lesions(_empty((4, 4, 4)), _empty((4, 4, 5)), spacing_mm=ISO)
    with pytest.raises(ValueError, match="spacing_mm"):
        match_lesions(_empty((4, 4, 4)), _empty((4, 4, 4)), spacing_mm=(1.0, 1.0))
    with pytest.raises(ValueError, match="min_size_mm3"):
        match_lesions(_empty((4, 4, 4)), _empty((4, 4, 4)), spacing_mm=ISO, min_size_mm3=-1)


def test_module_does_not_import_tensorflow():
    code = "import sys, segpipe.metrics.lesions; print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------- through evaluate_folders


def test_evaluate_folders_writes_lesion_rows_and_summary(tmp_path):
    from segpipe.evaluation.folders import evaluate_folders
    from segpipe.io import read_json, write_nifti
    from segpipe.tables import read_csv

    affine = np.diag([1.0, 1.0, 2.0, 1.0])  # 2 mm³ voxels
    ref_a = np.zeros((16, 16, 16), np.uint8)
    ref_a[2:6, 2:6, 2:6] = 1  # one lesion, split in two by the prediction
    pred_a = np.zeros_like(ref_a)
    pred_a[2:6, 2:6, 2:3] = 1
    pred_a[2:6, 2:6, 4:6] = 1
    ref_b = np.zeros_like(ref_a)
    ref_b[2:5, 2:5, 2:5] = 1
    pred_b = ref_b.copy()
    pred_b[10:12, 10:12, 10:12] = 1  # a spurious component of 8 voxels = 16 mm³
    pred_b[14, 14, 14] = 1  # a 2 mm³ speck, below the minimum size
    for case, ref, pred in (("a", ref_a, pred_a), ("b", ref_b, pred_b)):
        write_nifti(tmp_path / "ref" / f"{case}.nii.gz", ref, affine)
        write_nifti(tmp_path / "pred" / f"{case}.nii.gz", pred, affine)
    summary = evaluate_folders(tmp_path / "pred", tmp_path / "ref", tmp_path / "eval", workers=1,
                               lesion_labels=[1], lesion_min_size_mm3=4.0, report=False)
    rows = {r["case"]: r for r in read_csv(tmp_path / "eval" / "lesions.csv", text=("case", "class_name"))}
    assert rows["a"]["lesion_dice"] == pytest.approx(6 / 7) and rows["a"]["n_pred_lesions"] == 2
    assert rows["b"]["lesion_dice"] == pytest.approx(0.5) and rows["b"]["lesion_fp"] == 1  # the speck is ignored
    lesion = summary["lesion_wise"]
    assert lesion == read_json(tmp_path / "eval" / "summary.json")["lesion_wise"]
    entry = lesion["per_class"]["1"]
    assert entry["lesion_dice"]["mean"] == pytest.approx((6 / 7 + 0.5) / 2)
    # pooled: 2 reference lesions both found; 4 predicted components, 1 false positive
    assert (entry["n_ref_lesions"], entry["n_pred_lesions"], entry["lesion_tp"], entry["lesion_fp"]) == (2, 4, 2, 1)
    assert entry["pooled_precision"] == pytest.approx(3 / 4) and entry["pooled_recall"] == 1.0
    assert lesion["min_size_mm3"] == 4.0 and not (tmp_path / "eval" / "report.html").exists()

    wide = evaluate_folders(tmp_path / "pred", tmp_path / "ref", tmp_path / "eval_wide", workers=1, lesion_labels=[1],
                            lesion_min_size_mm3=4.0, lesion_dilation_vox=9, report=False)["lesion_wise"]
    # The spurious cube of case b is (6, 6, 6) voxels from the lesion's corner; an 18-neighbour step moves
    # along at most two axes, so 9 steps (max 6 <= 9, sum 18 <= 2 * 9) reach it: matched, no false positive,
    # and part of the union: Dice_b = 2 * 27 / (27 + 27 + 8) = 54/62.
    assert wide["dilation_vox"] == 9 and wide["per_class"]["1"]["lesion_fp"] == 0
    rows = {r["case"]: r for r in read_csv(tmp_path / "eval_wide" / "lesions.csv", text=("case", "class_name"))}
    assert rows["b"]["lesion_dice"] == pytest.approx(54 / 62)
    eight = evaluate_folders(tmp_path / "pred", tmp_path / "ref", tmp_path / "eval_8", workers=1, lesion_labels=[1],
                             lesion_min_size_mm3=4.0, lesion_dilation_vox=8, report=False)["lesion_wise"]
    assert eight["per_class"]["1"]["lesion_fp"] == 1  # 8 steps: sum 16 < 18, out of reach

    with pytest.raises(ValueError, match="lesion_labels > 0"):
        evaluate_folders(tmp_path / "pred", tmp_path / "ref", tmp_path / "eval", lesion_labels=[0], report=False)
    with pytest.raises(ValueError, match="lesion_min_size_mm3"):
        evaluate_folders(tmp_path / "pred", tmp_path / "ref", tmp_path / "eval", lesion_labels=[1],
                         lesion_min_size_mm3=-1.0, report=False)
    with pytest.raises(ValueError, match="lesion_dilation_vox"):
        evaluate_folders(tmp_path / "pred", tmp_path / "ref", tmp_path / "eval", lesion_labels=[1],
                         lesion_dilation_vox=1.5, report=False)
