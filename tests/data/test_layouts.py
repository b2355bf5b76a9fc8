import json

import numpy as np
import pytest

from segpipe.data.layouts import detect_layout, load_dataset, read_case_image, read_case_label

from . import LABELS, make_case, make_dataset, save


@pytest.mark.parametrize("layout", ["msd", "nnunet", "folders"])
@pytest.mark.parametrize("channels", [1, 2])
def test_each_layout_is_detected_and_read(tmp_path, layout, channels):
    make_dataset(tmp_path, layout, channels=channels)
    dataset = load_dataset(tmp_path)
    assert dataset.layout == layout == detect_layout(tmp_path)
    assert [c.case_id for c in dataset.cases] == ["case_000", "case_001", "case_002"]
    assert dataset.labels == LABELS
    assert dataset.num_classes == 3
    if layout != "folders":
        assert dataset.channel_names == [f"mod{c}" for c in range(channels)]
    image = read_case_image(dataset.cases[1])
    expected_image, expected_label = make_case(channels=channels, seed=1)
    assert image.array.shape == (12, 10, 8, channels)
    np.testing.assert_allclose(image.array, expected_image)
    np.testing.assert_array_equal(read_case_label(dataset.cases[1]), expected_label)


def test_named_layout_and_nii_suffix(tmp_path):
    make_dataset(tmp_path, "nnunet", suffix=".nii", channels=3)
    dataset = load_dataset(tmp_path, "nnunet")
    assert len(dataset.cases[0].image_paths) == 3
    assert dataset.cases[0].label_path.name == "case_000.nii"
    assert read_case_image(dataset.cases[0]).array.shape == (12, 10, 8, 3)


def test_trailing_singleton_axes_are_squeezed(tmp_path):
    make_dataset(tmp_path, "msd", num_cases=1)
    image, label = make_case()
    save(tmp_path / "imagesTr" / "case_000.nii.gz", image)  # (X, Y, Z, 1)
    save(tmp_path / "labelsTr" / "case_000.nii.gz", label[..., None, None])  # (X, Y, Z, 1, 1)
    case = load_dataset(tmp_path).cases[0]
    assert read_case_image(case).array.shape == (12, 10, 8, 1)
    assert read_case_label(case).shape == (12, 10, 8)


def test_float_labels_with_integer_values_are_accepted(tmp_path):
    make_dataset(tmp_path, "msd", num_cases=1)
    _, label = make_case()
    save(tmp_path / "labelsTr" / "case_000.nii.gz", label.astype(np.float32))
    out = read_case_label(load_dataset(tmp_path).cases[0])
    assert out.dtype == np.uint8 and out.max() == 2


def test_folders_mixed_suffixes_classes_from_maps_or_argument(tmp_path):
    make_dataset(tmp_path, "folders", num_cases=2)
    (tmp_path / "images" / "case_001.nii.gz").rename(tmp_path / "images" / "case_001.nii")
    (tmp_path / "labels.json").unlink()
    dataset = load_dataset(tmp_path)
    assert [c.case_id for c in dataset.cases] == ["case_000", "case_001"]
    assert dataset.labels == {0: "background", 1: "class_1", 2: "class_2"}  # read from the label maps
    assert load_dataset(tmp_path, labels={"0": "bg", "1": "a", "2": "b"}).class_names == ["bg", "a", "b"]
    (tmp_path / "labels.json").write_text(json.dumps({"0": "bg", "1": "organ", "2": "lesion", "3": "x"}))
    assert load_dataset(tmp_path).num_classes == 4


@pytest.mark.parametrize("layout", ["msd", "nnunet", "folders"])
def test_orphan_labels_and_missing_labels_are_recorded(tmp_path, layout):
    make_dataset(tmp_path, layout, num_cases=2)
    folder = "labels" if layout == "folders" else "labelsTr"
    images = "images" if layout == "folders" else "imagesTr"
    _, label = make_case()
    save(tmp_path / folder / "stray.nii.gz", label)
    if layout != "msd":  # MSD lists its cases in dataset.json; elsewhere an image defines a case
        (tmp_path / folder / "case_001.nii.gz").unlink()
    dataset = load_dataset(tmp_path)
    assert [p.name for p in dataset.orphan_labels] == ["stray.nii.gz"]
    if layout != "msd":
        assert not dataset.cases[1].label_path.exists()
        assert dataset.cases[1].label_path.parent.name == folder
    assert (tmp_path / images).is_dir()


def test_unknown_folder_and_bad_arguments_name_what_was_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="Expected a dataset folder.*Received: .*no such folder"):
        load_dataset(tmp_path / "missing")
    make_dataset(tmp_path, "msd", num_cases=1)
    with pytest.raises(ValueError, match="Expected one of .*Received: layout='bogus'"):
        load_dataset(tmp_path, "bogus")


def test_nnunet_region_labels_need_regions_class_order(tmp_path):
    make_dataset(tmp_path, "nnunet", num_cases=1)
    meta = json.loads((tmp_path / "dataset.json").read_text())
    meta["labels"]["whole"] = [1, 2]
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"dataset\.json: Expected one label value in 1\.\.255 per region .*"
                                         r"Received: regions_class_order=None\.$"):
        load_dataset(tmp_path)


def test_msd_requires_background(tmp_path):
    make_dataset(tmp_path, "msd", num_cases=1)
    meta = json.loads((tmp_path / "dataset.json").read_text())
    meta["labels"] = {"1": "organ"}
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="background value 0"):
        load_dataset(tmp_path)
