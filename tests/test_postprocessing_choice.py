"""Post-processing chosen on out-of-fold predictions: hand-made cases with hand-computed Dice.

Volumes are 20 x 1 x 1 "lines", so connected components are runs of equal labels along axis 0
and every Dice below can be counted by hand.
"""
import json

import numpy as np
import pytest

from segpipe.evaluation.postprocessing import (
    case_dice_variants,
    choose_postprocessing,
    choose_postprocessing_folders,
)
from segpipe.inference.postprocess import (
    apply_largest_component_steps,
    keep_largest_foreground_component,
)
from segpipe.io import write_nifti
from segpipe.metrics.overlap import confusion_counts, overlap_metrics


def line(**runs):
    """A (20, 1, 1) label map; runs={label: [(start, stop), ...]}, given as l1=..., l2=..."""
    out = np.zeros((20, 1, 1), np.uint8)
    for key, spans in runs.items():
        for start, stop in spans:
            out[start:stop] = int(key[1:])
    return out


def gain_and_loss_cases(n=8):
    """Class 1 gains (a spurious far voxel is removed), class 2 loses (a real second component is removed).

    ref:  class 1 at 0-3, class 2 at 6-7 and 10-12.   pred: the same plus a class-1 voxel at 15.
    """
    ref = line(l1=[(0, 4)], l2=[(6, 8), (10, 13)])
    pred = line(l1=[(0, 4), (15, 16)], l2=[(6, 8), (10, 13)])
    return {f"case_{i}": (pred, ref) for i in range(n)}


def test_one_class_gains_and_another_loses():
    record = choose_postprocessing(gain_and_loss_cases(), labels=[1, 2])
    json.dumps(record)  # the record goes into bundle.json as is
    # All foreground together: the largest component of the union is 0-3 (4 voxels), so class 2
    # loses everything (Dice 0) and class 1 becomes perfect: mean (8/9 + 1) / 2 -> (1 + 0) / 2.
    fg = record["foreground"]
    assert fg["dice_before"] == pytest.approx((8 / 9 + 1) / 2) and fg["dice_after"] == pytest.approx(0.5)
    assert fg["class_dice_after"] == {"1": pytest.approx(1.0), "2": pytest.approx(0.0)}
    assert fg["worsened_classes"] == [2] and not fg["enabled"] and not fg["nnunet_rule"]
    # Class 1 alone: 2*4 / (4 + 5) = 8/9 -> 1 in all 8 cases; exact Wilcoxon p = 2 / 2^8.
    one = record["classes"]["1"]
    assert (one["dice_before"], one["dice_after"]) == (pytest.approx(8 / 9), pytest.approx(1.0))
    assert (one["wins"], one["losses"], one["ties"]) == (8, 0, 0)
    assert one["p"] == pytest.approx(2 / 2**8) and one["enabled"] and not one["after_foreground_step"]
    # Class 2 alone: components of 2 and 3 voxels, the 3 is kept: 2*3 / (3 + 5) = 0.75.
    two = record["classes"]["2"]
    assert (two["dice_before"], two["dice_after"]) == (pytest.approx(1.0), pytest.approx(0.75))
    assert two["gain"] == pytest.approx(-0.25) and not two["enabled"] and not two["nnunet_rule"]
    assert record["postprocess_largest_component"] == [1] and record["postprocess_largest_foreground"] is False
    assert record["dice_before"] == {"foreground_mean": pytest.approx((8 / 9 + 1) / 2), "1": pytest.approx(8 / 9),
                                     "2": pytest.approx(1.0)}
    assert record["dice_after"] == {"foreground_mean": pytest.approx(1.0),
                                    "1": pytest.approx(1.0), "2": pytest.approx(1.0)}
    assert (record["n_cases"], record["alpha"], record["labels"]) == (8, 0.05, [1, 2])


def test_applying_the_record_gives_its_dice_after():
    cases = gain_and_loss_cases()
    cases["odd"] = (line(l1=[(0, 2), (5, 9)], l2=[(12, 14)]), line(l1=[(5, 9)], l2=[(12, 15)]))
    record = choose_postprocessing(cases, labels=[1, 2])
    dice = []
    for pred, ref in cases.values():
        out = apply_largest_component_steps(pred, largest_foreground=record["postprocess_largest_foreground"],
                                            classes=record["postprocess_largest_component"])
        counts = confusion_counts(out, ref, labels=[1, 2])
        dice.append([overlap_metrics(counts[c])["dice"] for c in (1, 2)])
    assert np.mean(dice) == pytest.approx(record["dice_after"]["foreground_mean"])
    assert np.mean(dice, axis=0) == pytest.approx([record["dice_after"]["1"], record["dice_after"]["2"]])


def test_foreground_step_is_vetoed_when_one_class_falls():
    # ref: class 1 at 0-5, class 2 at 6-7 (touching) and a real second class-2 voxel at 12;
    # pred: the same plus 4 spurious class-1 voxels at 15-18.
    ref = line(l1=[(0, 6)], l2=[(6, 8), (12, 13)])
    pred = line(l1=[(0, 6), (15, 19)], l2=[(6, 8), (12, 13)])
    record = choose_postprocessing({f"c{i}": (pred, ref) for i in range(8)}, labels=[1, 2])
    fg = record["foreground"]
    # class 1: 12/16 -> 1; class 2: 1 -> 2*2/(2+3) = 0.8; the mean rises 0.875 -> 0.9 in every case ...
    assert fg["class_dice_before"] == {"1": pytest.approx(0.75), "2": pytest.approx(1.0)}
    assert fg["class_dice_after"] == {"1": pytest.approx(1.0), "2": pytest.approx(0.8)}
    assert fg["gain"] == pytest.approx(0.025) and fg["p"] == pytest.approx(2 / 2**8)
    # ... but class 2 falls, so neither nnU-Net nor we switch it on.
    assert fg["worsened_classes"] == [2] and not fg["enabled"] and not fg["nnunet_rule"]
    assert record["postprocess_largest_component"] == [1]


def test_foreground_step_on_then_class_steps_judged_after_it():
    # touching classes 1 (0-3) and 2 (4-5), and a spurious class-1 voxel at 15: the union step
    # removes it without harming class 2; afterwards class 1's own step changes nothing.
    ref = line(l1=[(0, 4)], l2=[(4, 6)])
    pred = line(l1=[(0, 4), (15, 16)], l2=[(4, 6)])
    record = choose_postprocessing({f"c{i}": (pred, ref) for i in range(8)}, labels=[1, 2])
    assert record["postprocess_largest_foreground"] is True
    assert record["foreground"]["dice_after"] == pytest.approx(1.0)
    one = record["classes"]["1"]
    assert one["after_foreground_step"] and one["gain"] == 0.0 and one["p"] == 1.0 and not one["enabled"]
    assert record["postprocess_largest_component"] == []
    assert record["dice_after"]["foreground_mean"] == pytest.approx(1.0)


def test_wilcoxon_keeps_a_noisy_gain_off():
    # One class. Object 0-5 (6 voxels) and a spurious far blob of k voxels: the step raises Dice
    # 12/(12+k) -> 1, by 1/13, 2/14, 3/15, 4/16 for k = 1..4. Two cases have a real second
    # component of m voxels beside 8: the step lowers Dice 1 -> 16/(16+m), by 1/17 and 2/18.
    # Four cases are unchanged.
    cases = {}
    for k in (1, 2, 3, 4):
        cases[f"gain{k}"] = (line(l1=[(0, 6), (12, 12 + k)]), line(l1=[(0, 6)]))
    for m in (1, 2):
        both = line(l1=[(0, 8), (12, 12 + m)])
        cases[f"loss{m}"] = (both, both)
    for i in range(4):
        cases[f"same{i}"] = (line(l1=[(2, 7)]), line(l1=[(3, 7)]))
    record = choose_postprocessing(cases, labels=[1])
    step = record["foreground"]  # one class: the all-foreground step is that class's step
    gain = (1 / 13 + 2 / 14 + 3 / 15 + 4 / 16 - 1 / 17 - 2 / 18) / 10
    assert step["gain"] == pytest.approx(gain) and gain > 0
    assert (step["wins"], step["losses"], step["ties"]) == (4, 2, 4)
    # |differences| sorted: 1/17 (loss), 1/13, 2/18 (loss), 2/14, 3/15, 4/16 -> losses have ranks 1 and 3,
    # W- = 4; rank subsets of 1..6 with sum <= 4: {}, 1, 2, 3, 4, 1+2, 1+3 -> exact p = 2 * 7 / 64.
    assert step["statistic"] == 4.0 and step["p"] == pytest.approx(14 / 64)
    assert step["nnunet_rule"] and not step["enabled"]  # nnU-Net would switch it on; the test does not
    assert record["classes"] == {} and record["postprocess_largest_component"] == []
    assert record["postprocess_largest_foreground"] is False
    assert record["dice_after"] == record["dice_before"]
    # the same gain in enough cases is switched on
    strong = choose_postprocessing({f"g{i}": cases["gain1"] for i in range(6)}, labels=[1])
    assert strong["foreground"]["p"] == pytest.approx(2 / 2**6) and strong["postprocess_largest_foreground"]
    # and alpha is the caller's: at 0.01 six cases are not enough
    assert not choose_postprocessing({f"g{i}": cases["gain1"] for i in range(6)}, labels=[1],
                                     alpha=0.01)["postprocess_largest_foreground"]


def test_empty_classes_and_all_background_cases():
    background = line()
    cases = {
        "all_background": (background, background),  # Dice 1 everywhere, before and after
        "missed": (background, line(l1=[(0, 3)])),  # class 1 missed: 0 before and after
        # class 2 absent from the reference, predicted in two blobs: 0 before and after
        "spurious": (line(l1=[(0, 3)], l2=[(8, 10), (14, 15)]), line(l1=[(0, 3)])),
    }
    variants = case_dice_variants(*cases["spurious"], labels=[1, 2, 3])
    # class 3 is absent from both maps: 1. The per-class step keeps one class-2 blob (still 0); the
    # all-foreground step keeps only class 1's 3 voxels, which removes both class-2 blobs (then 1).
    assert variants["raw"] == variants["classes"] == [1.0, 0.0, 1.0]
    assert variants["foreground"] == variants["foreground_classes"] == [1.0, 1.0, 1.0]
    record = choose_postprocessing(cases, labels=[1, 2, 3])
    assert record["dice_before"]["1"] == pytest.approx(2 / 3) and record["dice_before"]["2"] == pytest.approx(2 / 3)
    assert record["dice_before"]["3"] == 1.0
    fg = record["foreground"]
    # one case of three gains 1/3 in its mean over the classes: a gain, but a one-case Wilcoxon p is 1
    assert fg["gain"] == pytest.approx(1 / 9) and (fg["wins"], fg["ties"], fg["p"]) == (1, 2, 1.0)
    assert fg["nnunet_rule"] and not fg["enabled"]
    for step in record["classes"].values():
        assert step["gain"] == 0.0 and step["p"] == 1.0 and not step["enabled"]
    assert record["postprocess_largest_component"] == [] and not record["postprocess_largest_foreground"]
    assert record["dice_after"] == record["dice_before"]
    only_background = choose_postprocessing({"a": (background, background), "b": (background, background)}, labels=[1])
    assert only_background["dice_before"] == {"foreground_mean": 1.0, "1": 1.0}
    assert not only_background["postprocess_largest_foreground"]


def test_folders_match_arrays_and_name_problems(tmp_path):
    cases = gain_and_loss_cases(6)
    (tmp_path / "pred").mkdir()
    (tmp_path / "ref").mkdir()
    for case_id, (pred, ref) in cases.items():
        write_nifti(tmp_path / "pred" / f"{case_id}.nii.gz", pred, np.eye(4))
        write_nifti(tmp_path / "ref" / f"{case_id}.nii.gz", ref, np.eye(4))
    from_files = choose_postprocessing_folders(tmp_path / "pred", tmp_path / "ref", labels=[1, 2])
    assert from_files == choose_postprocessing(cases, labels=[1, 2])
    (tmp_path / "pred" / "case_3.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"lacks 1 of 6: case_3"):
        choose_postprocessing_folders(tmp_path / "pred", tmp_path / "ref", labels=[1, 2])


@pytest.mark.parametrize("kwargs, message", [
    (dict(labels=[0, 1]), "Expected distinct foreground label values"),
    (dict(labels=[1], alpha=1.5), "Expected a significance level in (0, 1). Received: alpha=1.5"),
    (dict(labels=[1], connectivity=4), "Expected a connectivity in 1..3"),
])
def test_bad_options_are_named(kwargs, message):
    pred = line(l1=[(0, 3)])
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        choose_postprocessing({"a": (pred, pred)}, **kwargs)


def test_mismatched_shapes_name_the_case():
    with pytest.raises(ValueError, match="Case 'bad'.*shape"):
        choose_postprocessing({"bad": (np.zeros((3, 1, 1), np.uint8), np.zeros((4, 1, 1), np.uint8))}, labels=[1])


def test_keep_largest_foreground_component_keeps_touching_classes():
    labels = line(l1=[(0, 3), (12, 13)], l2=[(3, 5), (15, 17)])
    out = keep_largest_foreground_component(labels)
    assert out[:, 0, 0].tolist() == [1, 1, 1, 2, 2] + [0] * 15
    assert out.dtype == labels.dtype and labels[12, 0, 0] == 1  # input untouched


def test_decide_checks_its_arrays():
    from segpipe.evaluation.postprocessing import decide

    good = {name: [[1.0, 0.5]] for name in ("raw", "foreground", "classes", "foreground_classes")}
    assert decide(good, labels=[1, 2])["n_cases"] == 1
    with pytest.raises(ValueError, match=r"dice\['classes'\].shape"):
        decide({**good, "classes": [[1.0]]}, labels=[1, 2])
    with pytest.raises(ValueError, match="no \\['foreground'\\]"):
        decide({k: v for k, v in good.items() if k != "foreground"}, labels=[1, 2])
    with pytest.raises(ValueError, match="at least one out-of-fold case"):
        decide({name: [] for name in good}, labels=[1, 2])
