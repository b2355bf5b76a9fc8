"""The recommendation of ``evaluate.py --compare``: hand-made evaluation folders, hand-computed margins."""
import json

import numpy as np
import pytest
import yaml

import evaluate
from segpipe.evaluation.compare import (
    ComparisonError,
    ConfigRuns,
    candidate_postprocessing,
    find_run_dirs,
    group_runs,
    is_evaluated_folder,
    recommend,
)
from segpipe.evaluation.paired_statistics import bootstrap_mean_ci

COLUMNS = "case,class,class_name,dice,iou,hd95,assd,nsd,empty,image_diagonal_mm"


def write_evaluation(folder, dice, *, cases=None):
    """``folder/evaluation/per_case.csv`` with dice = {label: [per-case Dice]}."""
    n = len(next(iter(dice.values())))
    cases = cases or [f"case_{i}" for i in range(n)]
    lines = [COLUMNS]
    for i, case in enumerate(cases):
        for label, values in dice.items():
            d = values[i]
            lines.append(f"{case},{label},c{label},{d},{d / (2 - d)},2.0,1.0,{d},False,50.0")
    (folder / "evaluation").mkdir(parents=True, exist_ok=True)
    (folder / "evaluation" / "per_case.csv").write_text("\n".join(lines) + "\n")
    return folder


def make_run(root, name, dice, *, postprocess=()):
    run = write_evaluation(root / name, dice)
    cases = [f"case_{i}" for i in range(len(dice[1]))]
    config = {"name": name, "data": {"root": "data/x", "fold": None},
              "inference": {"postprocess_largest_component": list(postprocess)}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "splits.json").write_text(json.dumps({"train": ["t0"], "val": cases}))
    return run


def group(name, dice):
    rows = [{"case": f"case_{i}", "class": label, "dice": d}
            for label, values in dice.items() for i, d in enumerate(values)]
    return ConfigRuns(name, [], rows)


def test_recommend_by_hand(tmp_path):
    # per-case foreground Dice = mean of classes 1 and 2:
    #   a: (0.8 + 0.6) / 2 = 0.7 everywhere; b: 0.7 + 0.01 * (i + 1); c: 0.5
    a = group("a", {1: [0.8] * 8, 2: [0.6] * 8})
    b = group("b", {1: [0.8 + 0.02 * (i + 1) for i in range(8)], 2: [0.6] * 8})
    c = group("c", {1: [0.5] * 8, 2: [0.5] * 8})
    for g in (a, b, c):
        g.run_dirs = [tmp_path / g.name]  # no files: post-processing unknown
    rec = recommend([a, c, b], [1, 2])
    assert [r["config"] for r in rec["ranking"]] == ["b", "a", "c"]
    assert rec["ranking"][0]["mean_foreground_dice"] == pytest.approx(0.7 + 0.045)
    assert (rec["best"], rec["runner_up"], rec["n_cases"]) == ("b", "a", 8)
    assert rec["margin"] == pytest.approx(0.045)  # mean of 0.01 .. 0.08
    # b better in all 8 cases: exact two-sided Wilcoxon p = 2 / 2^8
    assert (rec["test"]["wins"], rec["test"]["losses"], rec["test"]["p"]) == (8, 0, pytest.approx(2 / 256))
    assert rec["decisive"] and not rec["tie"]
    ci = rec["ci"]
    assert ci["method"] == "BCa" and 0.01 <= ci["low"] < 0.045 < ci["high"] <= 0.08
    assert recommend([a, c, b], [1, 2])["ci"] == ci  # fixed seed: the same interval
    assert rec["postprocessing"]["source"] is None
    json.dumps(rec)


def test_a_small_or_tied_margin_is_not_decisive():
    five = [group("x", {1: [0.5] * 5}), group("y", {1: [0.6, 0.61, 0.62, 0.63, 0.64]})]
    for g in five:
        g.run_dirs = [g.name]
    rec = recommend(five, [1])
    # 5 wins of 5: the smallest two-sided p of 5 pairs, 2 / 32, is not below 0.05
    assert rec["best"] == "y" and rec["test"]["p"] == pytest.approx(0.0625) and not rec["decisive"]
    assert "not distinguishable from x" in rec["summary"]
    tied = [group("p", {1: [0.5, 0.7]}), group("q", {1: [0.7, 0.5]})]
    for g in tied:
        g.run_dirs = [g.name]
    rec = recommend(tied, [1])
    assert rec["tie"] and rec["best"] == "p" and rec["margin"] == 0.0 and not rec["decisive"]


def test_bootstrap_interval_edge_cases():
    assert bootstrap_mean_ci([0.02, 0.02, 0.02]) == {"low": 0.02, "high": 0.02, "method": "constant",
                                                     "confidence": 0.95, "n_resamples": 9999, "seed": 0}
    assert bootstrap_mean_ci([0.1])["method"] == "none"
    rng = np.random.default_rng(1)
    d = rng.normal(0.03, 0.02, size=40)
    wide, narrow = bootstrap_mean_ci(d, confidence=0.99), bootstrap_mean_ci(d, confidence=0.8)
    assert wide["low"] < narrow["low"] < d.mean() < narrow["high"] < wide["high"]
    # against the textbook normal interval of a mean (the bootstrap should be close for 40 normal values)
    half = 1.96 * d.std(ddof=1) / np.sqrt(d.size)
    ci = bootstrap_mean_ci(d)
    assert (ci["low"] == pytest.approx(d.mean() - half, abs=0.004)
            and ci["high"] == pytest.approx(d.mean() + half, abs=0.004))


def test_postprocessing_is_read_from_the_files(tmp_path):
    run = make_run(tmp_path, "run", {1: [0.5] * 3}, postprocess=[2])
    assert candidate_postprocessing([run]) == {
        "postprocess_largest_component": [2], "postprocess_largest_foreground": False, "chosen_on_data": False,
        "source": f"{run / 'config.yaml'}#inference.postprocess_largest_component"}
    record = {"postprocess_largest_component": [1], "postprocess_largest_foreground": True, "alpha": 0.05}
    (run / "evaluation" / "summary.json").write_text(json.dumps({"postprocessing": record}))
    post = candidate_postprocessing([run])
    assert post["postprocess_largest_component"] == [1] and post["postprocess_largest_foreground"] is True
    assert post["chosen_on_data"] and post["source"].endswith("summary.json#postprocessing")
    folder = write_evaluation(tmp_path / "preds", {1: [0.5] * 3})
    (folder / "bundle").mkdir()
    (folder / "bundle" / "bundle.json").write_text(json.dumps({"inference": {"postprocess_largest_component": [3]}}))
    assert candidate_postprocessing([folder])["postprocess_largest_component"] == [3]
    assert candidate_postprocessing([tmp_path / "nothing"])["source"] is None


def test_compare_takes_evaluated_folders_and_writes_the_recommendation(tmp_path, capsys):
    exp = tmp_path / "exp"
    make_run(exp, "single", {1: [0.70, 0.72, 0.74, 0.76, 0.78, 0.80]})
    # an ensemble folder as the lead's train.py --folds will leave it: evaluation/ and a bundle with its record
    ensemble = write_evaluation(exp / "single_ensemble", {1: [0.80, 0.83, 0.86, 0.89, 0.92, 0.95]})
    (ensemble / "config.yaml").write_text(yaml.safe_dump({"name": "single_ensemble"}))
    (ensemble / "bundle").mkdir()
    (ensemble / "bundle" / "bundle.json").write_text(json.dumps(
        {"postprocessing": {"postprocess_largest_component": [], "postprocess_largest_foreground": True}}))
    write_evaluation(exp / "preds", {1: [0.5] * 6})  # evaluate.py --pred preds/ --ref ...: no config.yaml
    (exp / "not_a_candidate").mkdir()
    assert is_evaluated_folder(ensemble) and is_evaluated_folder(exp / "preds")
    assert [g.name for g in group_runs(find_run_dirs([exp]))] == ["preds", "single", "single_ensemble"]

    assert evaluate.main(["--compare", str(exp), "--reference", "single"]) == 0
    out = exp / "comparison"
    rec = json.loads((out / "recommendation.json").read_text())
    assert json.loads((out / "comparison.json").read_text())["recommendation"] == rec
    assert (rec["best"], rec["runner_up"]) == ("single_ensemble", "single")
    # ensemble - single per case: 0.10, 0.11, ..., 0.15 -> mean 0.125; 6 wins of 6 -> p = 2 / 64
    assert rec["margin"] == pytest.approx(0.125) and rec["test"]["p"] == pytest.approx(2 / 64) and rec["decisive"]
    assert rec["postprocessing"]["postprocess_largest_foreground"] is True and rec["postprocessing"]["chosen_on_data"]
    post = {r["config"]: r["postprocessing"] for r in rec["ranking"]}
    assert post["single"]["postprocess_largest_component"] == [] and post["preds"]["source"] is None
    report = (out / "report.md").read_text()
    assert "## Recommendation" in report and "**single_ensemble**" in report
    assert "largest component of all foreground (chosen on data)" in report
    html = (out / "report.html").read_text()
    assert 'id="recommendation"' in html and 'data-best="single_ensemble"' in html
    assert "## Recommendation" in capsys.readouterr().out


def test_an_evaluated_folder_with_other_cases_is_refused(tmp_path, capsys):
    exp = tmp_path / "exp"
    make_run(exp, "single", {1: [0.7] * 4})
    write_evaluation(exp / "preds", {1: [0.5] * 4}, cases=["case_0", "case_1", "case_2", "other"])
    assert evaluate.main(["--compare", str(exp)]) == 1
    err = capsys.readouterr().err
    assert "only in preds: ['other']" in err and "case_3" in err
    assert not (exp / "comparison" / "recommendation.json").exists()


def test_recommend_needs_two_candidates():
    with pytest.raises(ComparisonError, match="at least two candidates"):
        recommend([group("a", {1: [0.5]})], [1])


def test_a_folder_without_candidates_is_named(tmp_path, capsys):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    assert evaluate.main(["--compare", str(tmp_path / "empty")]) == 1
    assert "or folders with evaluation/per_case.csv" in capsys.readouterr().err
    assert evaluate.main(["--compare", str(tmp_path / "missing")]) == 1
    assert "missing (not found)" in capsys.readouterr().err
