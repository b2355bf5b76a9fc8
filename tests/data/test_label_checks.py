"""check_labels: label values across cases (rare, undeclared, gaps, absent classes), each problem named."""
from pathlib import Path

import numpy as np
import pytest

from segpipe.data.checks import check_labels, errors
from segpipe.data.layouts import Case, Dataset
from segpipe.data.pipeline import DataError, run_label_check


def dataset(n, labels, layout="msd", root=Path("/data/ds")):
    cases = [Case(f"c{i:02d}", (root / f"imagesTr/c{i:02d}.nii.gz",), root / f"labelsTr/c{i:02d}.nii.gz") for i in range(n)]
    return Dataset(root=root, layout=layout, cases=cases, labels=labels)


def counts(n, values=(0, 1, 2)):
    return {f"c{i:02d}": {v: 100 for v in values} for i in range(n)}


def test_clean_dataset_has_no_problems():
    assert check_labels(dataset(15, {0: "bg", 1: "a", 2: "b"}), counts(15)) == []


def test_one_map_with_an_undeclared_value_is_an_error_naming_the_file():
    voxels = counts(15)
    voxels["c07"][7] = 12
    problems = check_labels(dataset(15, {0: "bg", 1: "a", 2: "b"}), voxels)
    found = errors(problems)
    assert [p.kind for p in found] == ["undeclared-label"]
    assert found[0].path == Path("/data/ds/labelsTr/c07.nii.gz") and found[0].case_id == "c07"
    assert "value 7 (in 1 of 15 cases)" in found[0].received
    assert "[0, 1, 2]" in found[0].expected


def test_a_declared_value_in_few_cases_is_a_warning():
    voxels = counts(15)
    voxels["c03"][7] = 5
    problems = check_labels(dataset(15, {0: "bg", 1: "a", 2: "b", 7: "rare"}), voxels)
    kinds = sorted(p.kind for p in problems)
    # 7 occurs in 1 of 15 cases (<= max(1, 10 % of 15) = 1), and 3..6 are gaps
    assert kinds == ["label-gaps", "rare-label"] and errors(problems) == []
    gap = next(p for p in problems if p.kind == "label-gaps")
    assert "[3, 4, 5, 6] never occur" in gap.received and "4 of 8 outputs unused" in gap.received


def test_values_read_from_the_maps_count_as_undeclared_when_rare(tmp_path):
    # folders layout without labels.json: the classes were read from the maps, so 7 looks declared
    voxels = counts(15)
    voxels["c09"][7] = 3
    ds = dataset(15, {0: "background", 1: "class_1", 2: "class_2", 7: "class_7"}, layout="folders", root=tmp_path)
    found = errors(check_labels(ds, voxels))
    assert [p.case_id for p in found] == ["c09"] and "labels.json" in found[0].expected
    (tmp_path / "labels.json").write_text('{"0": "bg", "1": "a", "2": "b", "7": "rare"}')
    assert errors(check_labels(ds, voxels)) == []  # declared now: only warnings


def test_a_declared_class_that_never_occurs_is_a_warning():
    problems = check_labels(dataset(4, {0: "bg", 1: "a", 2: "b", 3: "c"}), counts(4))
    assert [p.kind for p in problems] == ["absent-class"]
    assert "class 3 ('c') in none of 4 cases" in problems[0].received


def test_small_datasets_have_no_rare_rule():
    voxels = counts(6)
    voxels["c01"][2] = 0
    voxels["c02"][2] = 0
    voxels = {k: {v: n for v, n in c.items() if n} for k, c in voxels.items()}
    assert check_labels(dataset(6, {0: "bg", 1: "a", 2: "b"}), voxels) == []


def test_run_label_check_raises_with_every_file(capsys):
    voxels = counts(12)
    voxels["c01"][5] = 1
    voxels["c04"][5] = 1
    fingerprint = {"cases": {k: {"class_voxels": {str(v): n for v, n in c.items()}} for k, c in voxels.items()}}
    with pytest.raises(DataError, match=r"2 error\(s\)") as info:
        run_label_check(dataset(12, {0: "bg", 1: "a", 2: "b"}), fingerprint, "headers")
    assert "labelsTr/c01.nii.gz" in str(info.value) and "labelsTr/c04.nii.gz" in str(info.value)
    run_label_check(dataset(12, {0: "bg", 1: "a", 2: "b"}), fingerprint, "off")  # off: skipped
