"""Inputs that slipped past the checks (issue 23): a float64 scan that overflows float32, ``a.nii``
beside ``a.nii.gz``, and the label checks of planning missing from ``data_prep/check_dataset.py``."""
import numpy as np
import pytest

from segpipe.data.checks import check_dataset, errors
from segpipe.data.layouts import load_dataset, read_case_image
from segpipe.data.preprocess import preprocess_case
from segpipe.io import read_nifti

from . import make_case, make_dataset, save
from .test_checks import _cli_main

BEYOND_FLOAT32 = 1e39  # finite in float64; float32 reads it as inf


def _overflowing_image(root, case="case_001", *, value=BEYOND_FLOAT32):
    image = make_case()[0][..., 0].astype(np.float64)
    image[3, 3, 3] = value
    image[4, 4, 4] = -value
    return save(root / "imagesTr" / f"{case}.nii.gz", image)


# ---------------------------------------------------------------- float64 beyond float32's range


def test_the_dataset_check_counts_values_that_overflow_float32(tmp_path):
    root = make_dataset(tmp_path, "msd")
    path = _overflowing_image(root)
    problems = check_dataset(load_dataset(root))
    assert [(p.kind, p.path) for p in problems] == [("non-finite", path)]
    assert problems[0].received == "2 NaN/inf voxels as float32 (2 finite float64 value(s) beyond float32's range ±3.4e+38)"
    assert problems[0].expected == "finite intensities"


def test_the_largest_values_that_round_to_float32_pass_and_the_first_that_overflows_does_not(tmp_path):
    root = make_dataset(tmp_path, "msd")
    largest = float(np.finfo(np.float32).max)
    rounds_to_largest = np.nextafter(2.0**128 - 2.0**103, 0)  # just below half a step above the largest
    assert np.isfinite(np.float32(rounds_to_largest)) and np.float32(rounds_to_largest) == np.float32(largest)
    _overflowing_image(root, value=rounds_to_largest)
    assert check_dataset(load_dataset(root)) == []
    assert np.isfinite(read_case_image(load_dataset(root).case("case_001")).array).all()
    _overflowing_image(root, value=2.0**128 - 2.0**103)
    assert [p.kind for p in check_dataset(load_dataset(root))] == ["non-finite"]


def test_reading_as_float32_names_the_file_instead_of_returning_inf(tmp_path):
    root = make_dataset(tmp_path, "msd")
    path = _overflowing_image(root)
    message = (f"{path}: Expected values within float32's range (|x| <= 3.4e+38). "
               f"Received: values=2 finite float64 voxel(s) beyond it (largest |x| 1e+39).")
    with pytest.raises(ValueError) as info:
        read_nifti(path, dtype=np.float32)
    assert str(info.value) == message
    with pytest.raises(ValueError) as info:  # training's preprocessing and prediction read through it
        preprocess_case(load_dataset(root).case("case_001"), target_spacing_mm=None)
    assert str(info.value) == message
    assert read_nifti(path).array.dtype == np.float64  # read as stored, nothing refused


# ---------------------------------------------------------------- a.nii beside a.nii.gz


@pytest.mark.parametrize("layout", ["msd", "nnunet", "folders"])
@pytest.mark.parametrize("kind", ["images", "labels"])
def test_a_nii_beside_a_nii_gz_is_one_error_naming_both(tmp_path, layout, kind):
    root = make_dataset(tmp_path, layout)
    folder = {"msd": f"{kind}Tr", "nnunet": f"{kind}Tr", "folders": kind}[layout]
    name = "case_001_0000" if layout == "nnunet" and kind == "images" else "case_001"
    twin = root / folder / f"{name}.nii"
    save(twin, make_case()[1] if kind == "labels" else make_case()[0][..., 0])
    with pytest.raises(ValueError) as info:
        load_dataset(root)
    assert str(info.value) == (
        f"{root}: Expected one file per case name (NAME.nii or NAME.nii.gz, not both). "
        f"Received: files={folder}/{name}.nii and {folder}/{name}.nii.gz. Remove or rename one file of each pair.")
    twin.unlink()
    assert len(load_dataset(root).cases) == 3


def test_every_pair_is_named_at_once(tmp_path):
    root = make_dataset(tmp_path, "folders")
    save(root / "images" / "case_000.nii", make_case()[0][..., 0])
    save(root / "labels" / "case_002.nii", make_case()[1])
    with pytest.raises(ValueError, match=r"Received: files=images/case_000\.nii and images/case_000\.nii\.gz; "
                                         r"labels/case_002\.nii and labels/case_002\.nii\.gz\."):
        load_dataset(root)


# ---------------------------------------------------------------- check_dataset.py runs the label checks


def _folders_with_a_stray_value(root, n=10):
    """A folders dataset without labels.json whose maps hold 0-2, one of them also a stray 7."""
    make_dataset(root, "folders", num_cases=n)
    (root / "labels.json").unlink()
    label = make_case(seed=4)[1]
    label[5, 5, 5] = 7
    return save(root / "labels" / "case_004.nii.gz", label)


def test_check_dataset_py_names_the_stray_label_value_planning_names(tmp_path, capsys):
    from segpipe.data.checks import check_labels
    from segpipe.data.fingerprint import compute_fingerprint

    stray = _folders_with_a_stray_value(tmp_path)
    dataset = load_dataset(tmp_path)
    # what planning finds, from the fingerprint
    fingerprint = compute_fingerprint(dataset)
    planned = errors(check_labels(dataset, {k: c["class_voxels"] for k, c in fingerprint["cases"].items()}))
    assert [(p.kind, p.path) for p in planned] == [("undeclared-label", stray)]
    # the per-file checks alone do not see it (classes read from the maps include 7)
    assert check_dataset(dataset) == []
    # the script runs both
    assert _cli_main()([str(tmp_path)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"ERROR [undeclared-label] labels/case_004.nii.gz: {planned[0].format().split(': ', 1)[1]}"
    assert "value 7 only in 1 of 10 cases" in lines[0]
    assert any(line.startswith("WARNING [label-gaps]") for line in lines)


def test_check_dataset_py_with_declared_classes_names_a_file_once(tmp_path, capsys):
    make_dataset(tmp_path, "folders", num_cases=10)
    label = make_case(seed=4)[1]
    label[5, 5, 5] = 7
    save(tmp_path / "labels" / "case_004.nii.gz", label)
    assert _cli_main()([str(tmp_path)]) == 1
    lines = capsys.readouterr().out.splitlines()
    # the per-file check names it; check_labels' own undeclared-label for the same file is dropped
    assert [line.split(": ")[0] for line in lines if line.startswith("ERROR")] == [
        "ERROR [undeclared-label] labels/case_004.nii.gz"]
    assert "Expected values among the declared classes [0, 1, 2]" in lines[0]
