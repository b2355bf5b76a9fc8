"""Comparison of runs: statistics on hand-made per-case tables, pairing checks, the report."""
import json
import math

import pytest
import yaml

import evaluate
from segpipe.evaluation.compare import (
    check_comparable,
    find_run_dirs,
    group_runs,
    load_per_case,
)
from segpipe.evaluation.paired_statistics import holm, paired_test

CASES = [f"case_{i}" for i in range(6)]
COLUMNS = "case,class,class_name,dice,iou,hd95,assd,nsd,empty,image_diagonal_mm"


def make_run(root, name, dice, *, hd95=None, split=None, dataset="data/x", fold=None, history=True):
    """A run folder as training + evaluation leave it, with the given per-case Dice of class 1."""
    run = root / name
    (run / "evaluation").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"name": name, "data": {"root": dataset, "fold": fold}}))
    (run / "splits.json").write_text(json.dumps(split or {"train": ["t0", "t1"], "val": CASES}))
    hd95 = hd95 if hd95 is not None else [2.0] * len(dice)
    lines = [COLUMNS]
    for case, d, h in zip(CASES, dice, hd95):
        lines.append(f"{case},1,organ,{d},{d / (2 - d)},{h},{h / 2},{d},False,50.0")
    (run / "evaluation" / "per_case.csv").write_text("\n".join(lines) + "\n")
    if history:
        (run / "history.csv").write_text("epoch,loss,val_loss,val_dice_organ\n1,0.5,0.6,0.7\n2,0.4,0.5,0.8\n")
    return run


def test_paired_test_matches_hand_computed_exact_wilcoxon():
    # all six differences positive: W- = 0, exact two-sided p = 2 / 2^6
    result = paired_test([0.5] * 6, [0.6, 0.7, 0.8, 0.9, 1.0, 1.1])
    assert result == {"n": 6, "wins": 6, "losses": 0, "ties": 0, "statistic": 0.0, "p": pytest.approx(0.03125)}
    # differences 1, -2, 3, 4, 5, 6: W- = 2; subsets of ranks with sum <= 2 are {}, {1}, {2}: p = 2 * 3/64
    result = paired_test([0] * 6, [1, -2, 3, 4, 5, 6])
    assert (result["statistic"], result["p"], result["wins"], result["losses"]) == (2.0, pytest.approx(6 / 64), 5, 1)
    # lower is better for distances: smaller values are wins
    assert paired_test([3.0, 3.0], [1.0, 4.0], lower_is_better=True)["wins"] == 1
    # no difference at all: p = 1, no warning from scipy
    assert paired_test([0.7, 0.8], [0.7, 0.8]) == {"n": 2, "wins": 0, "losses": 0, "ties": 2,
                                                   "statistic": 0.0, "p": 1.0}


def test_holm_by_hand():
    # sorted p 0.01, 0.03, 0.04 times 3, 2, 1 = 0.03, 0.06, 0.04 -> monotone 0.03, 0.06, 0.06
    assert holm([0.01, 0.04, 0.03]) == [0.03, 0.06, 0.06]
    assert holm([0.5, 0.9]) == [1.0, 1.0]  # capped at 1
    assert holm([0.02]) == [0.02]


def test_compare_experiment_folder(tmp_path, capsys):
    exp = tmp_path / "exp"
    make_run(exp, "dice", [0.5] * 6, hd95=[4.0] * 6)
    make_run(exp, "tversky", [0.6, 0.7, 0.8, 0.9, 1.0, 1.1][:5] + [0.95], hd95=[3.0] * 5 + [float("nan")])
    assert evaluate.main(["--compare", str(exp)]) == 0
    out = exp / "comparison"
    for name in ("report.md", "comparison.csv", "comparison.json", "boxplot_dice.png",
                 "boxplot_hd95.png", "training_curves.png"):
        assert (out / name).is_file(), name
    result = json.loads((out / "comparison.json").read_text())
    assert result["reference"] == "dice"
    tests = {(t["metric"]): t for t in result["tests"]}
    assert tests["dice"]["wins"] == 6 and tests["dice"]["p"] == pytest.approx(0.03125)
    # the missing HD95 counts as the image diagonal (50 mm): 5 wins, 1 loss
    assert (tests["hd95"]["wins"], tests["hd95"]["losses"]) == (5, 1)
    assert all(0 <= t["p"] <= t["p_holm"] <= 1 for t in result["tests"])
    summary = {(s["config"], s["metric"]): s for s in result["summary"]}
    assert summary["tversky", "hd95"]["undefined"] == 1
    assert summary["tversky", "hd95"]["mean"] == pytest.approx((3.0 * 5 + 50.0) / 6)
    assert summary["dice", "dice"]["median"] == pytest.approx(0.5)
    report = (out / "report.md").read_text()
    assert "Paired tests against `dice`" in report and "![Dice](boxplot_dice.png)" in report
    # the best mean per metric is bold: tversky's Dice (0.825 > 0.5), dice's HD95 (4.0 < tversky's 10.8,
    # whose missing HD95 counts as the 50 mm diagonal)
    fg = report.split("### foreground mean")[1].split("###")[0]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in fg.splitlines() if line.startswith("| ") and not line.startswith("| config")}
    header = [c.strip() for c in fg.split("| config |")[1].splitlines()[0].split("|")[:-1]]
    dice_col, hd95_col = header.index("dice"), header.index("hd95")
    assert rows["tversky"][dice_col].startswith("**0.825") and not rows["dice"][dice_col].startswith("**")
    assert rows["dice"][hd95_col].startswith("**") and not rows["tversky"][hd95_col].startswith("**")
    assert "tversky" in capsys.readouterr().out
    rows = (out / "comparison.csv").read_text().splitlines()
    assert len(rows) == 1 + 12 and rows[0].startswith("config,run,case,class")


def test_reference_option_reorders(tmp_path):
    exp = tmp_path / "exp"
    make_run(exp, "a", [0.5] * 6)
    make_run(exp, "b", [0.6] * 6)
    assert evaluate.main(["--compare", str(exp), "--reference", "b"]) == 0
    assert json.loads((exp / "comparison" / "comparison.json").read_text())["reference"] == "b"
    assert evaluate.main(["--compare", str(exp), "--reference", "zz"]) == 1


def test_folds_are_pooled_per_configuration(tmp_path):
    exp = tmp_path / "exp"
    for fold in (0, 1):
        split = {"train": ["x"], "val": CASES, "fold": fold}
        make_run(exp, f"dice_fold{fold}", [0.5] * 6, split=split, fold=fold)
        make_run(exp, f"iou_fold{fold}", [0.6] * 6, split=split, fold=fold)
    groups = group_runs(find_run_dirs([exp]))
    assert [(g.name, len(g.run_dirs)) for g in groups] == [("dice", 2), ("iou", 2)]
    check_comparable(groups)


@pytest.mark.parametrize("mismatch", ["split", "dataset"])
def test_mismatched_runs_are_refused(tmp_path, capsys, mismatch):
    exp = tmp_path / "exp"
    make_run(exp, "a", [0.5] * 6)
    if mismatch == "split":
        make_run(exp, "b", [0.6] * 6, split={"train": ["t0"], "val": CASES + ["t1"]})
    else:
        make_run(exp, "b", [0.6] * 6, dataset="data/other")
    assert evaluate.main(["--compare", str(exp)]) == 1
    err = capsys.readouterr().err
    assert ("Expected runs that use the same dataset and the same splits, to compare them pairwise. "
            "Received: --compare=1 mismatch(es).\n  ") in err
    assert ("different splits" in err) if mismatch == "split" else ("used dataset" in err)
    assert not (exp / "comparison").exists()


def test_single_configuration_is_an_error(tmp_path, capsys):
    make_run(tmp_path / "exp", "a", [0.5] * 6)
    assert evaluate.main(["--compare", str(tmp_path / "exp")]) == 1
    assert "Expected at least two configurations to compare. Received: --compare=['a']." in capsys.readouterr().err


def test_load_per_case_keeps_nan(tmp_path):
    run = make_run(tmp_path, "a", [0.5] * 6, hd95=[1.0] * 5 + [float("nan")])
    rows = load_per_case(run / "evaluation" / "per_case.csv")
    assert math.isnan(rows[-1]["hd95"]) and rows[0]["class"] == 1
