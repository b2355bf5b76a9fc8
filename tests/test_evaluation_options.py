"""EvaluationOptions and LesionOptions check themselves; the report is drawn from what the evaluation computed."""
import math
from pathlib import Path

import numpy as np
import pytest

from segpipe.evaluation.options import EvaluationOptions, LesionOptions


def test_lesion_options_normalise_and_default():
    options = LesionOptions(labels=[3, 1, 3, np.int64(2)], min_size_mm3=np.float32(2.5), dilation_vox=np.int64(1))
    assert options == LesionOptions(labels=(1, 2, 3), min_size_mm3=2.5, dilation_vox=1)
    assert type(options.min_size_mm3) is float and type(options.dilation_vox) is int and options.enabled
    assert not LesionOptions().enabled and LesionOptions(labels=None).labels == ()
    assert LesionOptions(labels=[2.0]).labels == (2,)  # a whole-number float is a label


@pytest.mark.parametrize("kwargs, message", [
    ({"labels": [0, 1]}, "Expected lesion_labels > 0 (foreground labels). Received: lesion_labels=[0, 1]."),
    ({"labels": [1.5]}, "Expected integer label values. Received: lesion_labels=[1.5]."),
    ({"labels": ["a"]}, "Expected integer label values. Received: lesion_labels=['a']."),
    ({"min_size_mm3": -1.0}, "Expected lesion_min_size_mm3 >= 0. Received: lesion_min_size_mm3=-1.0."),
    ({"min_size_mm3": math.inf}, "Expected lesion_min_size_mm3 >= 0. Received: lesion_min_size_mm3=inf."),
    ({"min_size_mm3": "5"}, "Expected lesion_min_size_mm3 >= 0. Received: lesion_min_size_mm3='5'."),
    ({"dilation_vox": 1.5}, "Expected lesion_dilation_vox as an integer >= 0. Received: lesion_dilation_vox=1.5."),
    ({"dilation_vox": -1}, "Expected lesion_dilation_vox as an integer >= 0. Received: lesion_dilation_vox=-1."),
    ({"dilation_vox": True}, "Expected lesion_dilation_vox as an integer >= 0. Received: lesion_dilation_vox=True."),
])
def test_lesion_options_refuse_bad_values(kwargs, message):
    with pytest.raises(ValueError) as info:
        LesionOptions(**kwargs)
    assert str(info.value) == message


def test_evaluation_options_normalise_and_answer_tolerances(tmp_path):
    options = EvaluationOptions(labels=[2, 1, 2], tolerance_mm={"1": 2, 2: np.float32(0.5)}, image_dir=str(tmp_path))
    assert options.labels == (1, 2) and options.tolerance_mm == {1: 2.0, 2: 0.5} and options.image_dir == tmp_path
    assert (options.tolerance(1), options.tolerance(2)) == (2.0, 0.5)
    with pytest.raises(KeyError):
        options.tolerance(3)
    defaults = EvaluationOptions()
    assert (defaults.labels, defaults.tolerance(7), defaults.workers, defaults.report) == (None, 1.0, None, True)
    assert defaults.lesions == LesionOptions() and isinstance(defaults.image_dir, type(None))
    assert isinstance(EvaluationOptions(image_dir=Path("x")).image_dir, Path)


@pytest.mark.parametrize("kwargs, message", [
    ({"tolerance_mm": -1.0}, "Expected tolerance_mm >= 0 (mm; a number or a mapping of label to number). "
                             "Received: tolerance_mm=-1.0."),
    ({"tolerance_mm": {1: math.nan}}, "Expected tolerance_mm >= 0 (mm; a number or a mapping of label to number). "
                                     "Received: tolerance_mm={1: nan}."),
    ({"tolerance_mm": {"x": 1.0}}, "Expected tolerance_mm >= 0 (mm; a number or a mapping of label to number). "
                                   "Received: tolerance_mm={'x': 1.0}."),
    ({"labels": [1, "b"]}, "Expected integer label values. Received: labels=[1, 'b']."),
    ({"class_names": "organ"}, "Expected a list of names (indexed by label value) or a mapping of label to name. "
                               "Received: class_names='organ'."),
    ({"workers": 1.5}, "Expected an integer number of processes or None. Received: workers=1.5."),
    ({"lesions": {"labels": [1]}}, "Expected LesionOptions. Received: lesions=dict."),
    ({"report": "yes"}, "Expected True or False. Received: report='yes'."),
    ({"image_dir": 3}, "Expected a folder path or None. Received: image_dir=3."),
])
def test_evaluation_options_refuse_bad_values(kwargs, message):
    with pytest.raises(ValueError) as info:
        EvaluationOptions(**kwargs)
    assert str(info.value) == message


def test_run_mode_refuses_bad_options_before_predicting(monkeypatch, tmp_path):
    """The options are checked before the (slow) prediction of the validation cases starts."""
    import segpipe.evaluation.run as run_mode

    def predict_run(*args, **kwargs):  # pragma: no cover - must not be reached
        raise AssertionError("predicted before checking the options")

    import sys
    import types
    monkeypatch.setitem(sys.modules, "segpipe.evaluation.predictions", types.SimpleNamespace(predict_run=predict_run))
    with pytest.raises(ValueError, match="lesion_dilation_vox"):
        run_mode.evaluate_run(tmp_path, lesion_labels=[1], lesion_dilation_vox=-1)


def test_the_report_is_drawn_from_the_results_it_is_handed(tmp_path, monkeypatch):
    """evaluate_folders hands its summary and rows to the report: summary.json and per_case.csv are not re-read."""
    import segpipe.reports.html as html
    from segpipe.evaluation.folders import evaluate_folders
    from segpipe.io import write_nifti

    affine = np.eye(4)
    for case in ("a", "b"):
        ref = np.zeros((12, 12, 12), np.uint8)
        ref[3:8, 3:8, 3:8] = 1
        pred = ref.copy()
        pred[3:5, 3:8, 3:8] = 0 if case == "a" else 1
        write_nifti(tmp_path / "ref" / f"{case}.nii.gz", ref, affine)
        write_nifti(tmp_path / "pred" / f"{case}.nii.gz", pred, affine)

    def refuse(*args, **kwargs):
        raise AssertionError(f"the report re-read {args[0]}")

    monkeypatch.setattr(html, "read_json", refuse)
    monkeypatch.setattr(html, "read_csv", refuse)
    summary = evaluate_folders(tmp_path / "pred", tmp_path / "ref", tmp_path / "eval", workers=1, lesion_labels=[1])
    text = (tmp_path / "eval" / "report.html").read_text()
    assert 'id="summary"' in text and 'id="lesions-per-case"' in text and summary["n_cases"] == 2
    monkeypatch.undo()
    # redrawn later from the files alone, the same page
    html.write_evaluation_report(tmp_path / "eval")
    assert (tmp_path / "eval" / "report.html").read_text() == text


def test_evaluation_options_take_the_ignore_label_and_regions():
    from segpipe.data.labels import Region

    regions = [Region("whole", (1, 2, 3)), Region("core", (2, 3))]
    options = EvaluationOptions(ignore_label=np.int64(4), regions=regions)
    assert options.ignore_label == 4 and options.regions == tuple(regions)
    assert EvaluationOptions().regions == () and EvaluationOptions(regions=None).regions == ()
    for kwargs, message in [
        ({"ignore_label": 0}, "Expected an ignore label in 1..255 or None. Received: ignore_label=0."),
        ({"ignore_label": 2.5}, "Expected an ignore label in 1..255 or None. Received: ignore_label=2.5."),
        ({"regions": [("whole", (1,))]}, "Received: regions=(('whole', (1,)),)."),
        ({"regions": [Region("a", (1,)), Region("a", (2,))]}, "with unique names"),
        ({"regions": [Region("a", (0, 1))]}, "values in 1..255"),
    ]:
        with pytest.raises(ValueError) as info:
            EvaluationOptions(**kwargs)
        assert message in str(info.value), kwargs
