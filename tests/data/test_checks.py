import gzip
import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest

from segpipe.data.checks import KINDS, check_dataset, errors
from segpipe.data.layouts import load_dataset

from . import make_case, make_dataset, save

_CLI = Path(__file__).resolve().parents[2] / "data_prep" / "check_dataset.py"


def _cli_main():
    spec = importlib.util.spec_from_file_location("check_dataset_cli", _CLI)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _edit_json(root, fn):
    meta = json.loads((root / "dataset.json").read_text())
    fn(meta)
    (root / "dataset.json").write_text(json.dumps(meta))


def _corrupt_gzip(root):
    data = gzip.compress(b"\x00" * 100)
    (root / "imagesTr" / "case_001.nii.gz").write_bytes(data[: len(data) // 2])


def _label_4d(root):
    _, label = make_case()
    save(root / "labelsTr" / "case_001.nii.gz", np.stack([label, label], axis=-1))


def _shape_mismatch(root):
    _, label = make_case(shape=(12, 10, 9))
    save(root / "labelsTr" / "case_001.nii.gz", label)


def _affine_mismatch(root):
    _, label = make_case()
    save(root / "labelsTr" / "case_001.nii.gz", label, np.diag([1.0, 1.0, 1.2, 1.0]))


def _nan_image(root):
    image, _ = make_case()
    image[3, 3, 3, 0] = np.nan
    image[4, 4, 4, 0] = np.inf
    save(root / "imagesTr" / "case_001.nii.gz", image[..., 0])


def _fractional_label(root):
    _, label = make_case()
    label = label.astype(np.float32)
    label[5, 5, 5] = 0.5
    save(root / "labelsTr" / "case_001.nii.gz", label)


def _undeclared_label(root):
    _, label = make_case()
    label[5, 5, 5] = 7
    save(root / "labelsTr" / "case_001.nii.gz", label)


def _duplicate(root):
    _edit_json(root, lambda m: m["training"].append(dict(m["training"][0])))


def _two_channel_image(root):
    save(root / "imagesTr" / "case_001.nii.gz", make_case(channels=2)[0])


CASES_MSD = {
    "missing-file": (lambda r: (r / "imagesTr" / "case_001.nii.gz").unlink(), r"imagesTr/case_001.nii.gz: Expected an image file. Received: no such file"),
    "unreadable": (_corrupt_gzip, r"imagesTr/case_001.nii.gz: Expected a readable NIfTI image. Received: \w+"),
    "missing-label": (lambda r: (r / "labelsTr" / "case_001.nii.gz").unlink(), r"labelsTr/case_001.nii.gz: Expected a label map at this path. Received: no such file"),
    "orphan-label": (lambda r: save(r / "labelsTr" / "stray.nii.gz", make_case()[1]), r"labelsTr/stray.nii.gz: Expected an image for every label file. Received: a label with no image"),
    "duplicate-case": (_duplicate, r"Received: a second case 'case_000'"),
    "dimensions": (_label_4d, r"labelsTr/case_001.nii.gz: Expected a 3-D label map \(X, Y, Z\). Received: shape \(12, 10, 8, 2\)"),
    "channel-count": (_two_channel_image, r"imagesTr/case_001.nii.gz: Expected 1 channel\(s\) \(declared channels \['mod0'\]\). Received: 2 channel\(s\)"),
    "shape-mismatch": (_shape_mismatch, r"labelsTr/case_001.nii.gz: Expected the image shape \(12, 10, 8\). Received: shape \(12, 10, 9\)"),
    "affine-mismatch": (_affine_mismatch, r"labelsTr/case_001.nii.gz: Expected the image affine \(tolerance 0.001 mm\). Received: max difference 0.2 mm"),
    "non-finite": (_nan_image, r"imagesTr/case_001.nii.gz: Expected finite intensities. Received: 2 NaN/inf voxels"),
    "non-integer-label": (_fractional_label, r"labelsTr/case_001.nii.gz: Expected integer label values. Received: 1 voxels with values like 0.5"),
    "undeclared-label": (_undeclared_label, r"Expected values among the declared classes \[0, 1, 2\]. Received: values \[0, 1, 2, 7\] \(undeclared: \[7\]\)"),
}


def test_clean_dataset_has_no_problems(tmp_path):
    make_dataset(tmp_path, "msd")
    assert check_dataset(load_dataset(tmp_path)) == []
    assert check_dataset(load_dataset(tmp_path), read_data=False) == []


@pytest.mark.parametrize("kind", sorted(CASES_MSD))
def test_each_problem_produces_its_message(tmp_path, kind):
    make_dataset(tmp_path, "msd")
    corrupt, pattern = CASES_MSD[kind]
    corrupt(tmp_path)
    problems = check_dataset(load_dataset(tmp_path))
    assert [p.kind for p in problems] == [kind], [p.format(tmp_path) for p in problems]
    line = problems[0].format(tmp_path)
    assert line.startswith(f"{KINDS[kind].upper()} [{kind}] ")
    assert "\n" not in line
    assert re.search(pattern, line), line


@pytest.mark.parametrize("kind", ["channel-shape", "channel-affine", "missing-file"])
def test_channel_problems_in_nnunet_layout(tmp_path, kind):
    make_dataset(tmp_path, "nnunet", channels=2)
    path = tmp_path / "imagesTr" / "case_002_0001.nii.gz"
    if kind == "channel-shape":
        save(path, make_case(shape=(12, 10, 7))[0][..., 0])
    elif kind == "channel-affine":
        save(path, make_case()[0][..., 0], np.diag([2.0, 1.0, 1.0, 1.0]))
    else:
        path.unlink()
    problems = check_dataset(load_dataset(tmp_path))
    assert [p.kind for p in problems] == [kind]
    assert problems[0].path.name == "case_002_0001.nii.gz"
    assert "case_002_0000.nii.gz" in problems[0].expected or kind == "missing-file"


def test_all_problems_are_listed_at_once(tmp_path):
    make_dataset(tmp_path, "msd", num_cases=3)
    _nan_image(tmp_path)
    _undeclared_label(tmp_path)
    (tmp_path / "labelsTr" / "case_002.nii.gz").unlink()
    problems = check_dataset(load_dataset(tmp_path))
    assert sorted(p.kind for p in problems) == ["missing-label", "non-finite", "undeclared-label"]
    assert len(errors(problems)) == 3


def test_headers_only_skips_voxel_values_but_sees_geometry(tmp_path):
    make_dataset(tmp_path, "msd")
    _undeclared_label(tmp_path)
    assert check_dataset(load_dataset(tmp_path), read_data=False) == []
    _shape_mismatch(tmp_path)
    assert [p.kind for p in check_dataset(load_dataset(tmp_path), read_data=False)] == ["shape-mismatch"]


def test_affine_tolerance(tmp_path):
    make_dataset(tmp_path, "msd", num_cases=1)
    _, label = make_case()
    save(tmp_path / "labelsTr" / "case_000.nii.gz", label, np.diag([1.0, 1.0, 1.0004, 1.0]))
    assert check_dataset(load_dataset(tmp_path)) == []
    assert [p.kind for p in check_dataset(load_dataset(tmp_path), affine_tolerance_mm=1e-4)] == ["affine-mismatch"]


def test_cli_exit_codes_and_one_line_per_problem(tmp_path, capsys):
    main = _cli_main()
    make_dataset(tmp_path, "msd")
    assert main([str(tmp_path)]) == 0
    assert capsys.readouterr().out == ""
    _nan_image(tmp_path)
    _undeclared_label(tmp_path)
    assert main([str(tmp_path)]) == 1
    lines = capsys.readouterr().out.splitlines()
    # the two errors, and the warning planning gives for the stray 7 (the label checks run too)
    assert [line.split("]")[0] for line in lines] == ["ERROR [non-finite", "ERROR [undeclared-label", "WARNING [label-gaps"]
    assert main([str(tmp_path / "nowhere")]) == 2
