"""Folder evaluation, summary contents and the evaluate.py CLI, on a few small NIfTI pairs."""
import csv
import doctest
import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

import segpipe.evaluation.folders
import segpipe.evaluation.summary
import segpipe.metrics.overlap
import segpipe.metrics.surface
from segpipe.evaluation.folders import evaluate_folders
from segpipe.evaluation.summary import summarize
from segpipe.io import write_json, write_nifti
from segpipe.reports.evaluation_tables import format_summary_markdown


def _load_cli():
    # Load the top-level script by path: an installed package named "evaluate" must not shadow it.
    path = Path(__file__).resolve().parents[1] / "evaluate.py"
    spec = importlib.util.spec_from_file_location("segpipe_evaluate_cli", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


evaluate = _load_cli()

SHAPE = (16, 16, 12)
SPACING_MM = (1.5, 1.0, 2.0)
AFFINE = np.diag([*SPACING_MM, 1.0])
DIAGONAL_MM = math.sqrt(sum((n * s) ** 2 for n, s in zip(SHAPE, SPACING_MM)))


def make_folders(root: Path):
    """Three cases: case_a good; case_b misses class 2; case_c has a spurious class 2.

    Returns (pred_dir, ref_dir).
    """
    pred_dir, ref_dir = root / "pred", root / "ref"
    base = np.zeros(SHAPE, np.uint8)
    base[2:8, 2:8, 2:6] = 1
    base[10:14, 9:13, 6:10] = 2

    ref_a, pred_a = base.copy(), np.roll(base, 1, axis=0)
    ref_b, pred_b = base.copy(), base.copy()
    pred_b[pred_b == 2] = 0  # missed
    ref_c = base.copy()
    ref_c[ref_c == 2] = 0
    pred_c = base.copy()  # spurious class 2
    for name, ref, pred in (("case_a", ref_a, pred_a), ("case_b", ref_b, pred_b), ("case_c", ref_c, pred_c)):
        write_nifti(ref_dir / f"{name}.nii.gz", ref, AFFINE)
        write_nifti(pred_dir / f"{name}.nii.gz", pred, AFFINE)
    return pred_dir, ref_dir


def read_csv(path: Path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_folder_mode_outputs(tmp_path):
    pred_dir, ref_dir = make_folders(tmp_path)
    out = tmp_path / "eval"
    summary = evaluate_folders(pred_dir, ref_dir, out, class_names=["background", "liver", "tumour"], workers=1)

    rows = read_csv(out / "per_case.csv")
    assert len(rows) == 3 * 2  # labels default to the values in the references: 1, 2
    assert [(r["case"], r["class"], r["class_name"]) for r in rows[:2]] == [
        ("case_a", "1", "liver"), ("case_a", "2", "tumour")]
    assert {"dice", "hd95", "nsd", "empty", "tp", "vol_ref_ml", "image_diagonal_mm"} <= set(rows[0])
    by_key = {(r["case"], r["class"]): r for r in rows}
    assert float(by_key["case_a", "1"]["dice"]) == pytest.approx(5 / 6)  # 6 layers shifted by 1
    assert float(by_key["case_a", "1"]["hd"]) == pytest.approx(1.5)  # one voxel along 1.5 mm axis
    assert by_key["case_b", "2"]["hd95"] == "nan" and float(by_key["case_b", "2"]["dice"]) == 0.0
    assert float(by_key["case_b", "2"]["image_diagonal_mm"]) == pytest.approx(DIAGONAL_MM)

    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["n_cases"] == 3 and on_disk["labels"] == [1, 2]
    tumour = on_disk["per_class"]["2"]
    assert tumour["name"] == "tumour"
    assert (tumour["missed"], tumour["spurious"], tumour["both_empty"]) == (1, 1, 0)
    # Distances: only case_a defines them; worst-filled puts the diagonal in cases b and c.
    assert tumour["metrics"]["hd95"]["n"] == 1
    hd95_a = float(by_key["case_a", "2"]["hd95"])
    assert tumour["metrics"]["hd95"]["mean"] == pytest.approx(hd95_a)
    assert tumour["distances_worst_filled"]["hd95"]["mean"] == pytest.approx((hd95_a + 2 * DIAGONAL_MM) / 3)
    assert tumour["distances_worst_filled"]["hd95"]["median"] == pytest.approx(DIAGONAL_MM)
    # Dice includes the one-empty cases as 0.
    assert tumour["metrics"]["dice"]["n"] == 3
    liver = on_disk["per_class"]["1"]
    fg = on_disk["foreground_mean"]
    assert fg["dice"] == pytest.approx((liver["metrics"]["dice"]["mean"] + tumour["metrics"]["dice"]["mean"]) / 2)
    assert fg["hd95_worst_filled"] > fg["hd95"]
    assert on_disk["tolerance_mm"] == {"1": 1.0, "2": 1.0}
    assert summary["per_class"]["2"]["missed"] == 1  # the returned summary is the same content

    table = format_summary_markdown(summary)
    assert table.splitlines()[0].startswith("| class | name | dice |")
    assert "| 2 | tumour |" in table and "(1/3)" in table and "foreground mean" in table


def test_labels_absent_from_some_cases_get_both_empty_rows(tmp_path):
    pred_dir, ref_dir = make_folders(tmp_path)
    evaluate_folders(pred_dir, ref_dir, tmp_path / "eval", labels=[1, 2, 5], workers=1)
    rows = read_csv(tmp_path / "eval" / "per_case.csv")
    fives = [r for r in rows if r["class"] == "5"]
    assert len(fives) == 3 and all(r["empty"] == "True" and float(r["dice"]) == 1.0 for r in fives)
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["per_class"]["5"]["both_empty"] == 3


def test_parallel_matches_serial(tmp_path):
    pred_dir, ref_dir = make_folders(tmp_path)
    serial = evaluate_folders(pred_dir, ref_dir, tmp_path / "serial", workers=1)
    parallel = evaluate_folders(pred_dir, ref_dir, tmp_path / "parallel", workers=2)
    assert json.dumps(serial, default=str, sort_keys=True) == json.dumps(parallel, default=str, sort_keys=True)
    assert (tmp_path / "serial" / "per_case.csv").read_text() == (tmp_path / "parallel" / "per_case.csv").read_text()


def test_geometry_mismatch_names_each_pair(tmp_path):
    pred_dir, ref_dir = make_folders(tmp_path)
    write_nifti(pred_dir / "case_a.nii.gz", np.zeros((16, 16, 10), np.uint8), AFFINE)  # shape
    shifted = AFFINE.copy()
    shifted[0, 3] = 0.5
    write_nifti(pred_dir / "case_c.nii.gz", np.zeros(SHAPE, np.uint8), shifted)  # origin
    with pytest.raises(ValueError) as info:
        evaluate_folders(pred_dir, ref_dir, tmp_path / "eval", workers=1)
    message = str(info.value)
    assert message.startswith("Expected each prediction to have the shape and affine of its reference")
    assert "Received: pred_dir=2 mismatching pair(s).\n" in message
    assert "case_a: shape pred (16, 16, 10) vs ref (16, 16, 12)" in message
    assert "case_c: affine differs by up to 0.5 mm" in message
    assert "case_b" not in message
    assert not (tmp_path / "eval").exists()  # checked before any scoring


def test_tiny_affine_differences_are_tolerated(tmp_path):
    pred_dir, ref_dir = make_folders(tmp_path)
    nudged = AFFINE.copy()
    nudged[:3, 3] += 1e-5
    write_nifti(pred_dir / "case_a.nii.gz", np.zeros(SHAPE, np.uint8), nudged)
    evaluate_folders(pred_dir, ref_dir, tmp_path / "eval", workers=1)


def test_missing_predictions_are_listed(tmp_path):
    pred_dir, ref_dir = make_folders(tmp_path)
    (pred_dir / "case_a.nii.gz").unlink()
    (pred_dir / "case_c.nii.gz").unlink()
    with pytest.raises(FileNotFoundError,
                       match=r"^Expected a prediction for every reference case\. Received: pred_dir=.*pred \(lacks 2 "
                             r"of 3: case_a, case_c\)\.$"):
        evaluate_folders(pred_dir, ref_dir, tmp_path / "eval", workers=1)


def test_extra_predictions_warn_and_nii_matches_nii_gz(tmp_path):
    pred_dir, ref_dir = make_folders(tmp_path)
    write_nifti(pred_dir / "case_z.nii", np.zeros(SHAPE, np.uint8), AFFINE)
    data = (pred_dir / "case_b.nii.gz")
    write_nifti(pred_dir / "case_b.nii", np.zeros(SHAPE, np.uint8), AFFINE)
    data.unlink()
    with pytest.warns(UserWarning, match=r"Ignoring 1 predictions without a reference.*case_z"):
        evaluate_folders(pred_dir, ref_dir, tmp_path / "eval", workers=1)


def test_float_probability_map_is_rejected_with_file_name(tmp_path):
    pred_dir, ref_dir = make_folders(tmp_path)
    write_nifti(pred_dir / "case_b.nii.gz", np.full(SHAPE, 0.3, np.float32), AFFINE)
    with pytest.raises(ValueError,
                       match=r"case_b\.nii\.gz: Expected whole non-negative label values\. Received: dtype=float32 "
                             r"with fractional or negative values\. Is this a probability map\?"):
        evaluate_folders(pred_dir, ref_dir, tmp_path / "eval", workers=1)


def test_summarize_counts_and_worst_value():
    nan = float("nan")
    rows = [
        {"case": "a", "class": 1, "dice": 0.8, "hd": 4.0, "hd95": 2.0, "assd": 1.0, "n_ref": 5, "n_pred": 6,
         "image_diagonal_mm": 100.0},
        {"case": "b", "class": 1, "dice": 0.0, "hd": nan, "hd95": nan, "assd": nan, "n_ref": 5, "n_pred": 0,
         "image_diagonal_mm": 50.0},
        {"case": "c", "class": 1, "dice": 0.0, "hd": nan, "hd95": nan, "assd": nan, "n_ref": 0, "n_pred": 3,
         "image_diagonal_mm": 60.0},
        {"case": "d", "class": 1, "dice": 1.0, "hd": 0.0, "hd95": 0.0, "assd": 0.0, "n_ref": 0, "n_pred": 0,
         "image_diagonal_mm": 60.0},
    ]
    s = summarize(rows, class_names={1: "organ"})["per_class"]["1"]
    assert (s["name"], s["missed"], s["spurious"], s["both_empty"]) == ("organ", 1, 1, 1)
    assert s["metrics"]["hd95"] == {"mean": 1.0, "std": 1.0, "median": 1.0, "n": 2}
    assert s["distances_worst_filled"]["hd95"]["mean"] == pytest.approx((2 + 50 + 60 + 0) / 4)
    assert s["metrics"]["dice"]["mean"] == pytest.approx(1.8 / 4)


def test_cli_folder_mode(tmp_path, capsys):
    pred_dir, ref_dir = make_folders(tmp_path)
    write_json(tmp_path / "ds" / "dataset.json", {
        "labels": {"0": "background", "1": "liver", "2": "tumour"}, "modality": {"0": "CT"}, "training": []})
    out = tmp_path / "eval"
    code = evaluate.main([
        "--pred", str(pred_dir), "--ref", str(ref_dir), "--out", str(out),
        "--dataset-json", str(tmp_path / "ds" / "dataset.json"), "--tolerance-mm", "1=2", "2=0.5",
        "--workers", "1",
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| 1 | liver |" in printed and "per_case.csv" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tolerance_mm"] == {"1": 2.0, "2": 0.5}
    assert summary["class_names"] == {"1": "liver", "2": "tumour"}


def test_cli_default_out_labels_and_errors(tmp_path, capsys):
    pred_dir, ref_dir = make_folders(tmp_path)
    assert evaluate.main(["--pred", str(pred_dir), "--ref", str(ref_dir), "--labels", "1", "--workers", "1"]) == 0
    rows = read_csv(pred_dir / "evaluation" / "per_case.csv")
    assert {r["class"] for r in rows} == {"1"}
    (pred_dir / "case_b.nii.gz").unlink()
    assert evaluate.main(["--pred", str(pred_dir), "--ref", str(ref_dir), "--workers", "1"]) == 1
    assert "lacks 1 of 3: case_b" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main(["--pred", str(pred_dir)])  # --ref missing
    with pytest.raises(SystemExit):
        evaluate.main(["runs/x", "--pred", str(pred_dir), "--ref", str(ref_dir)])
    with pytest.raises(SystemExit):
        evaluate.main(["--pred", "p", "--ref", "r", "--tolerance-mm", "1", "x"])


@pytest.mark.parametrize("module", [segpipe.metrics.overlap, segpipe.metrics.surface, segpipe.evaluation.folders,
                                    segpipe.evaluation.summary])
def test_docstring_examples(module):
    result = doctest.testmod(module, extraglobs={"np": np}, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


def test_cli_run_mode_uses_predict_run(tmp_path, monkeypatch, capsys):
    # segpipe.evaluation.predictions imports TensorFlow; a stand-in module checks the wiring only.
    import types

    pred_dir, ref_dir = make_folders(tmp_path)
    run_dir = tmp_path / "runs" / "r1"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("{}\n")  # a run: evaluate_run refuses a folder without its config
    calls = []

    def predict_run(path, model=None):
        calls.append((Path(path), model))
        return pred_dir, ref_dir, [1, 2], ["background", "liver", "tumour"]

    monkeypatch.setitem(sys.modules, "segpipe.evaluation.predictions", types.SimpleNamespace(predict_run=predict_run))
    assert evaluate.main([str(run_dir), "--workers", "1"]) == 0
    assert evaluate.main([str(run_dir), "--workers", "1", "--model", "final"]) == 0
    assert calls == [(run_dir, None), (run_dir, "final")]
    summary = json.loads((run_dir / "evaluation" / "summary.json").read_text())
    assert summary["class_names"] == {"1": "liver", "2": "tumour"}
    assert "| 2 | tumour |" in capsys.readouterr().out
