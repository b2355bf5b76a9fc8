"""segpipe.data.pipeline with training and inference: checks, cache reuse, shared splits, k-fold, predict_run."""
import json
import os
from pathlib import Path

import numpy as np
import pytest

import train
from segpipe.config import ConfigError, load_config
from segpipe.data.cache import build_cache
from segpipe.data.layouts import load_dataset, read_case_label
from segpipe.data.pipeline import (
    DataError,
    dataset_cache_dir,
    load_or_make_split,
    make_folds,
    open_dataset,
    prepare_data,
    read_split_file,
    run_integrity_check,
)
from segpipe.data.preprocess import PreprocessSettings
from segpipe.evaluation.predictions import predict_run
from segpipe.inference.segment import restore_probabilities
from segpipe.io import read_nifti

from . import make_case, make_dataset, save


def config_for(root: Path, out: Path, *extra: str):
    """A tiny config on ``root`` that preprocesses in this process (so tests may count calls)."""
    return load_config(None, [f"data.root={root}", f"output_dir={out}", "data.preprocess_workers=1",
                              "model.depth=2", "data.patch_size=[8, 8, 8]", *extra])


# ------------------------------------------------------------------------------------ integrity


def broken_dataset(root: Path) -> Path:
    """An MSD dataset with four problems in four files."""
    make_dataset(root, "msd", num_cases=5)
    (root / "labelsTr" / "case_001.nii.gz").unlink()  # missing-label
    save(root / "labelsTr" / "case_002.nii.gz", np.zeros((12, 10, 9), np.uint8))  # shape-mismatch
    save(root / "labelsTr" / "stray.nii.gz", np.zeros((12, 10, 8), np.uint8))  # orphan-label
    _, label = make_case()
    label[5, 5, 5] = 7
    save(root / "labelsTr" / "case_003.nii.gz", label)  # undeclared-label (voxel values: full check only)
    return root


def test_training_refuses_a_broken_dataset_and_lists_every_error(tmp_path, capsys):
    root = broken_dataset(tmp_path / "raw")
    code = train.main(["--set", f"data.root={root}", "data.phantoms=null", f"output_dir={tmp_path / 'runs'}", "data.check=full",
                       "model.depth=2", "data.patch_size=[8, 8, 8]", "name=broken"])
    assert code == 1
    err = capsys.readouterr().err
    assert "4 error(s)" in err
    for kind, name in [("missing-label", "case_001"), ("shape-mismatch", "case_002.nii.gz"),
                       ("orphan-label", "stray.nii.gz"), ("undeclared-label", "case_003.nii.gz")]:
        assert any(f"[{kind}]" in line and name in line for line in err.splitlines()), (kind, err)
    assert not (tmp_path / "runs" / "broken").exists()
    assert not (tmp_path / "runs" / ".cache").exists()  # nothing preprocessed


def test_header_check_lists_what_headers_show_and_off_skips(tmp_path):
    dataset = load_dataset(broken_dataset(tmp_path / "raw"))
    with pytest.raises(DataError) as info:
        run_integrity_check(dataset, "headers")
    message = str(info.value)
    assert "3 error(s)" in message and "undeclared-label" not in message
    assert "labelsTr/case_002.nii.gz: Expected the image shape (12, 10, 8). Received: shape (12, 10, 9)" in message
    run_integrity_check(dataset, "off")


# ------------------------------------------------------------------------------------ cache


def test_cache_is_reused_and_a_changed_setting_gets_its_own_folder(phantom_root, tmp_path, count_preprocessing):
    first = prepare_data(config_for(phantom_root, tmp_path), progress=False)
    assert len(count_preprocessing) == 6
    again = prepare_data(config_for(phantom_root, tmp_path), progress=False)
    assert len(count_preprocessing) == 6  # nothing preprocessed again
    assert again.cache_dir == first.cache_dir and again.settings == first.settings

    other = prepare_data(config_for(phantom_root, tmp_path, "data.normalization=zscore_nonzero"), progress=False)
    assert len(count_preprocessing) == 12
    assert other.cache_dir != first.cache_dir and other.cache_dir.parent == first.cache_dir.parent
    assert other.cases["phantom_000"].meta["normalization"][0]["scheme"] == "zscore_nonzero"
    prepare_data(config_for(phantom_root, tmp_path), progress=False)
    assert len(count_preprocessing) == 12  # the first setting's folder is still there and valid


def test_default_cache_lives_under_output_dir_and_explicit_one_is_used(phantom_root, tmp_path):
    config = config_for(phantom_root, tmp_path)
    dataset = open_dataset(config.data)
    default = dataset_cache_dir(config, dataset)
    assert default.parent == tmp_path / ".cache" and default.name.startswith("ds-")
    explicit = config_for(phantom_root, tmp_path, f"data.cache_dir={tmp_path / 'mine'}", "data.check=off")
    prepared = prepare_data(explicit, progress=False)
    assert prepared.cache_dir.parent == tmp_path / "mine"
    assert (tmp_path / "mine" / "fingerprint.json").is_file() and (tmp_path / "mine" / "splits.json").is_file()


def test_target_spacing_defaults_to_the_fingerprint(phantom_root, tmp_path):
    prepared = prepare_data(config_for(phantom_root, tmp_path, "data.check=off"), progress=False)
    assert prepared.settings.target_spacing_mm == tuple(prepared.fingerprint["target_spacing_mm"]) == (1.0, 1.0, 1.5)
    assert prepared.settings.intensity_stats[0]["percentile_99_5"] > 0  # resolved statistics, for export
    override = prepare_data(config_for(phantom_root, tmp_path, "data.target_spacing_mm=[1.5, 1.5, 1.5]",
                                       "data.check=off"), progress=False)
    assert override.cases["phantom_000"].meta["shape"] == [16, 16, 16]


def test_one_normalization_per_channel_must_match_the_channels(phantom_root, tmp_path):

    with pytest.raises(ConfigError, match=r"Expected one scheme, or one per channel \(1 in .*\). Received: data.normalization=\["):
        prepare_data(config_for(phantom_root, tmp_path, "data.normalization=[zscore, none]"), progress=False)


# ------------------------------------------------------------------------------------ splits


def test_runs_with_different_losses_share_the_dataset_split(tiny_overrides, tmp_path, fit_skipped):
    # no epochs (fit_skipped): the split, the cache and the run's copies of them are written before training
    assert train.main(["--set", *tiny_overrides, "name=dice", "loss={name: dice}"]) == 0
    cache_root = next((tmp_path / "runs" / ".cache").iterdir())
    metas = sorted(cache_root.glob("preprocessed-*/*/meta.json"))
    stamps = [os.stat(p).st_mtime_ns for p in metas]
    assert train.main(["--set", *tiny_overrides, "name=ce", "loss={name: ce}"]) == 0
    assert fit_skipped == ["dice", "ce"]  # both went as far as training

    runs = tmp_path / "runs"
    a, b = (json.loads((runs / name / "splits.json").read_text()) for name in ("dice", "ce"))
    assert a == b and a["split"] == "seed=0,val_fraction=0.34"
    stored = json.loads((cache_root / "splits.json").read_text())["splits"]
    assert list(stored) == [a["split"]] and stored[a["split"]] == {"train": a["train"], "val": a["val"]}
    # the second run reused the first run's cache and wrote the same resolved preprocessing
    assert [os.stat(p).st_mtime_ns for p in metas] == stamps and len(metas) == 6
    settings = [json.loads((runs / name / "preprocessing.json").read_text()) for name in ("dice", "ce")]
    assert settings[0] == settings[1]
    assert PreprocessSettings(**settings[0]).target_spacing_mm == (1.0, 1.0, 1.5)


def test_k_fold_validates_every_case_exactly_once(phantom_root, tmp_path):
    vals = []
    for fold in range(3):
        config = config_for(phantom_root, tmp_path, "data.folds=3", f"data.fold={fold}", "data.check=off")
        split = prepare_data(config, progress=False).split
        assert split["fold"] == fold and split["split"] == "seed=0,folds=3"
        assert not set(split["train"]) & set(split["val"])
        assert sorted(split["train"] + split["val"]) == [f"phantom_{i:03d}" for i in range(6)]
        vals.append(split["val"])
    assert sorted(sum(vals, [])) == [f"phantom_{i:03d}" for i in range(6)]
    assert [len(v) for v in vals] == [2, 2, 2]


def test_folds_sizes_and_too_few_cases():
    folds = make_folds([f"c{i}" for i in range(7)], 3, seed=1)
    assert sorted(len(f["val"]) for f in folds) == [2, 2, 3]
    with pytest.raises(ValueError, match=r"^Expected at least 5 cases for 5 folds \(data\.folds\)\. Received: case_ids=\d case\(s\)\.$"):
        make_folds(["a", "b", "c"], 5, seed=0)


def test_splits_file_keeps_every_key_and_remakes_a_stale_one(tmp_path, capsys):
    path = tmp_path / "splits.json"
    ids = [f"c{i}" for i in range(10)]
    a = load_or_make_split(path, ids, seed=0, val_fraction=0.2)
    b = load_or_make_split(path, ids, seed=1, val_fraction=0.2)
    assert len(a["val"]) == len(b["val"]) == 2
    assert load_or_make_split(path, ids, seed=0, val_fraction=0.2) == a
    assert len(json.loads(path.read_text())["splits"]) == 2
    grown = load_or_make_split(path, ids + ["c10"], seed=0, val_fraction=0.2)
    assert "c10" in grown["train"] + grown["val"]
    assert "does not match the dataset's cases" in capsys.readouterr().err


def test_split_file_fixes_the_split_and_bad_files_are_named(phantom_root, tmp_path):
    fixed = {"train": ["phantom_000", "phantom_002", "phantom_003"], "val": ["phantom_005", "phantom_001"]}
    path = tmp_path / "split.json"
    path.write_text(json.dumps(fixed))
    for seed in (0, 7):  # the seed no longer matters
        config = config_for(phantom_root, tmp_path, f"data.split_file={path}", f"seed={seed}", "data.check=off")
        split = prepare_data(config, progress=False).split
        assert split["train"] == fixed["train"] and split["val"] == fixed["val"]
        assert split["split"] == f"file:{path.as_posix()}"

    with pytest.raises(FileNotFoundError, match=r"^Expected a JSON file with train/val case ids\. Received: data\.split_file=.*nope\.json \(not found\)\.$"):
        read_split_file(tmp_path / "nope.json")
    for content, message in [("{", r"split\.json: Expected valid JSON\. Received: contents=invalid JSON \(Expecting"), ('{"train": ["a"]}', r"split\.json: Expected a list of case ids\. Received: val=<missing>\.$"),
                             ('{"train": "a", "val": []}', r"split\.json: Expected a list of case ids\. Received: train=a str\.$"),
                             ('{"train": ["a", "b"], "val": ["b"]}', r"split\.json: Expected val cases that are not in train\. Received: val=1 case\(s\) also in train, e\.g\. \['b'\]\.$")]:
        path.write_text(content)
        with pytest.raises(ValueError, match=message):
            read_split_file(path)
    path.write_text(json.dumps({"train": ["phantom_000"], "val": ["ghost"]}))
    with pytest.raises(ValueError, match=r"^Expected split cases that are in the dataset\. Received: split=1 unknown case id\(s\): \['ghost'\]\.$"):
        prepare_data(config_for(phantom_root, tmp_path, f"data.split_file={path}", "data.check=off"), progress=False)


def test_folds_with_a_split_file_split_its_train_cases_and_hold_its_val_cases_out(phantom_root, tmp_path):
    fixed = {"train": ["phantom_000", "phantom_002", "phantom_003", "phantom_004"], "val": ["phantom_005", "phantom_001"]}
    path = tmp_path / "split.json"
    path.write_text(json.dumps(fixed))
    splits = [prepare_data(config_for(phantom_root, tmp_path, f"data.split_file={path}", "data.folds=2",
                                      f"data.fold={fold}", "data.check=off"), progress=False).split for fold in (0, 1)]
    for fold, split in enumerate(splits):
        assert sorted(split["train"] + split["val"]) == sorted(fixed["train"]) and len(split["val"]) == 2
        assert split["held_out"] == fixed["val"] and split["fold"] == fold
        assert split["split"] == f"file:{path.as_posix()},seed=0,folds=2"
    # every train case of the file validates in exactly one fold: the out-of-fold predictions cover them
    assert sorted(splits[0]["val"] + splits[1]["val"]) == sorted(fixed["train"])


def test_the_recipe_split_file_is_160_training_and_40_validation_cases():
    split = read_split_file(Path(__file__).resolve().parents[2] / "configs" / "splits" / "hippocampus.json")
    assert len(split["train"]) == 160 and len(split["val"]) == 40
    assert len(set(split["train"]) | set(split["val"])) == 200


# ------------------------------------------------------------------------------------ inference


def test_labels_return_to_the_original_grid_through_reorientation_and_resampling(tmp_path):
    # axes permuted and flipped, anisotropic: LPS-like storage order (y, x, z) with 2 mm slices
    affine = np.array([[0, -1.0, 0, 10], [-1.0, 0, 0, 5], [0, 0, 2.0, -3], [0, 0, 0, 1]])
    dataset = load_dataset(make_dataset(tmp_path / "raw", "msd", num_cases=2, shape=(12, 10, 8), affine=affine))
    # exactly twice as fine on every axis, nearest for labels: the way back is exact
    settings = PreprocessSettings(target_spacing_mm=(0.5, 0.5, 1.0), label_interpolation="nearest")
    for cached, case in zip(build_cache(dataset, tmp_path / "cache", settings, progress=False), dataset.cases):
        label = cached.load_label()
        assert label.shape == (20, 22, 16)  # RAS (10, 12, 8), zero slab cropped: (10, 11, 8), doubled
        probabilities = np.eye(3, dtype=np.float32)[label]
        np.testing.assert_array_equal(np.argmax(restore_probabilities(probabilities, cached.meta), -1),
                                      read_case_label(case))


def test_predict_run_writes_the_original_shape_and_affine(tmp_path, fit_skipped):
    root = tmp_path / "aniso"  # generated by the run: 2.5 mm slices, resampled to 1.5 mm voxels
    overrides = [f"data.root={root}", "data.phantoms={num_cases: 4, shape: [20, 20, 10], spacing_mm: [1, 1, 2.5]}",
                 f"output_dir={tmp_path / 'runs'}", "data.target_spacing_mm=[1.5, 1.5, 1.5]",
                 "data.patch_size=[16, 16, 16]", "data.val_fraction=0.5", "model.depth=2", "model.base_filters=4",
                 "train.epochs=1", "train.steps_per_epoch=2", "data.preprocess_workers=1", "name=aniso",
                 "train.export_bundle=false"]  # predict_run uses the run's model; bundles: test_export.py
    # no epochs (fit_skipped): the untrained model.keras is predicted with; what is checked is the geometry
    assert train.main(["--set", *overrides]) == 0
    assert fit_skipped == ["aniso"]
    run_dir = tmp_path / "runs" / "aniso"
    assert json.loads((run_dir / "preprocessing.json").read_text())["target_spacing_mm"] == [1.5, 1.5, 1.5]

    pred_dir, ref_dir, labels, class_names = predict_run(run_dir)
    assert labels == [1, 2] and class_names == ["background", "organ", "lesion"]
    val = json.loads((run_dir / "splits.json").read_text())["val"]
    assert sorted(p.name for p in pred_dir.iterdir()) == sorted(f"{c}.nii.gz" for c in val)
    for case_id in val:
        prediction = read_nifti(pred_dir / f"{case_id}.nii.gz")
        image = read_nifti(root / "imagesTr" / f"{case_id}.nii.gz")
        assert prediction.array.shape == image.array.shape == (20, 20, 10)
        np.testing.assert_allclose(prediction.affine, image.affine)
        assert prediction.array.dtype == np.uint8 and set(np.unique(prediction.array)) <= {0, 1, 2}
        assert (ref_dir / f"{case_id}.nii.gz").resolve() == (root / "labelsTr" / f"{case_id}.nii.gz").resolve()
