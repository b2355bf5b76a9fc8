"""The ignore label and regions (segpipe.data.labels): dataset.json parsing, config keys, targets,
region -> label conversion, sampling, label checks, fingerprint and evaluation (hand-computed)."""
import json

import numpy as np
import pytest

from segpipe.config import Config
from segpipe.data.checks import check_labels
from segpipe.data.labels import Region, parse_label_declaration, region_targets, regions_to_labels, target_table
from segpipe.data.layouts import Dataset, load_dataset
from segpipe.data.pipeline import apply_label_settings
from segpipe.data.sampling import ArrayCase, PatchSampler, choose_patch
from segpipe.io import write_nifti
from segpipe.metrics.regions import mask_ignored

BRATS = {"background": 0, "whole_tumor": [1, 2, 3], "tumor_core": [2, 3], "enhancing_tumor": 3}
REGIONS = (Region("whole_tumor", (1, 2, 3)), Region("tumor_core", (2, 3)), Region("enhancing_tumor", (3,)))


# ---------------------------------------------------------------------------------------------- parsing
def test_parse_ignore_label():
    scheme = parse_label_declaration({"background": 0, "liver": 1, "tumor": 2, "ignore": 3})
    assert scheme.labels == {0: "background", 1: "liver", 2: "tumor"}
    assert scheme.ignore_label == 3 and scheme.regions is None


def test_ignore_label_must_be_the_highest_value():
    with pytest.raises(ValueError, match=r"highest: 2.*labels\['ignore'\]=1"):
        parse_label_declaration({"background": 0, "a": 1, "b": 2, "ignore": 1})


def test_parse_regions_and_class_order():
    scheme = parse_label_declaration({**BRATS, "ignore": 4}, regions_class_order=[1, 2, 3])
    assert scheme.regions == REGIONS
    assert scheme.regions_class_order == (1, 2, 3)
    assert scheme.labels == {0: "background", 1: "label_1", 2: "label_2", 3: "enhancing_tumor"}
    assert scheme.ignore_label == 4


def test_regions_need_their_class_order():
    with pytest.raises(ValueError, match="regions_class_order"):
        parse_label_declaration(BRATS)
    with pytest.raises(ValueError, match="regions_class_order"):
        parse_label_declaration(BRATS, regions_class_order=[1, 2])
    with pytest.raises(ValueError, match=r"labels\['core'\]"):
        parse_label_declaration({"background": 0, "core": [2, "x"]}, regions_class_order=[2])


def _nnunet(root, labels, **extra):
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1", "1": "FLAIR"}, "labels": labels,
                                                   "numTraining": 0, "file_ending": ".nii.gz", **extra}))
    return root


def test_nnunet_dataset_json_with_regions_and_ignore(tmp_path):
    root = _nnunet(tmp_path / "ds", {**BRATS, "ignore": 4}, regions_class_order=[1, 2, 3])
    dataset = load_dataset(root)
    assert dataset.layout == "nnunet"
    assert dataset.regions == REGIONS and dataset.regions_class_order == (1, 2, 3)
    assert dataset.ignore_label == 4 and 4 not in dataset.labels
    assert dataset.num_classes == 4 and dataset.num_outputs == 3
    assert dataset.output_names == ["whole_tumor", "tumor_core", "enhancing_tumor"]
    assert dataset.declared_values == {0, 1, 2, 3, 4}


def test_msd_label_named_ignore(tmp_path):
    root = tmp_path / "msd"
    root.mkdir()
    (root / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "a", "2": "ignore"},
                                                   "training": []}))
    dataset = load_dataset(root, "msd")
    assert dataset.labels == {0: "background", 1: "a"} and dataset.ignore_label == 2


def test_config_keys_set_ignore_label_and_regions():
    dataset = Dataset(root=".", layout="folders", cases=[], labels={0: "bg", 1: "edema", 2: "core", 3: "class_3"})
    config = Config.from_dict({"data": {"ignore_label": 3, "regions": {"lesion": [1, 2], "core": 2},
                                         "regions_class_order": [1, 2]}})
    apply_label_settings(dataset, config.data)
    assert dataset.ignore_label == 3 and dataset.labels == {0: "bg", 1: "edema", 2: "core"}
    assert dataset.regions == (Region("lesion", (1, 2)), Region("core", (2,)))
    bad = Config.from_dict({"data": {"regions": {"lesion": [1, 5]}, "regions_class_order": [1]}})
    with pytest.raises(ValueError, match=r"data.regions.*Undeclared values: \[5\]"):
        apply_label_settings(Dataset(root=".", layout="folders", cases=[], labels={0: "bg", 1: "a"}), bad.data)
    low = Config.from_dict({"data": {"ignore_label": 1}})
    with pytest.raises(ValueError, match="data.ignore_label"):
        apply_label_settings(Dataset(root=".", layout="folders", cases=[], labels={0: "bg", 1: "a", 2: "b"}), low.data)


# ---------------------------------------------------------------------------------------------- targets
def test_region_targets_by_hand():
    label = np.array([0, 1, 2, 3, 4])
    targets = region_targets(label, REGIONS, ignore_label=4)
    expected = [[0, 0, 0, 0],   # background: in no region
                [1, 0, 0, 0],   # 1: whole tumour only
                [1, 1, 0, 0],   # 2: whole tumour and core
                [1, 1, 1, 0],   # 3: all three
                [0, 0, 0, 1]]   # ignore: no region, mask channel set
    assert targets.tolist() == expected
    assert region_targets(label[:4], REGIONS).shape == (4, 3)


def test_one_hot_table_with_ignore_is_an_all_zero_row():
    table = target_table(3, ignore_label=3)
    assert table[[0, 1, 2, 3]].tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0]]


def test_regions_to_labels_with_overlapping_regions():
    # later regions overwrite earlier ones; non-nested overlap too (order [2, 1, 3])
    p = np.array([[0.9, 0.1, 0.1],    # region 0 only       -> its value
                  [0.9, 0.9, 0.1],    # regions 0 and 1     -> region 1's value
                  [0.9, 0.9, 0.9],    # all                 -> region 2's value
                  [0.1, 0.1, 0.9],    # region 2 alone      -> region 2's value
                  [0.5, 0.2, 0.2],    # exactly 0.5: not above the threshold -> 0
                  [0.2, 0.6, 0.2]])   # region 1 alone
    assert regions_to_labels(p, [1, 2, 3]).tolist() == [1, 2, 3, 3, 0, 2]
    assert regions_to_labels(p, [2, 1, 3]).tolist() == [2, 1, 3, 3, 0, 1]
    # a round trip through the nested BraTS regions gives the labels back
    label = np.array([0, 1, 2, 3])
    assert regions_to_labels(region_targets(label, REGIONS), [1, 2, 3]).tolist() == label.tolist()


# ---------------------------------------------------------------------------------------------- sampling
def test_no_patch_is_centred_on_the_ignore_label():
    rng = np.random.default_rng(0)
    only_ignore = {3: np.array([[5, 5, 5]], np.int32)}
    corner, cls = choose_patch((16, 16, 16), (8, 8, 8), rng, locations=only_ignore, force_foreground=True,
                               ignore_label=3)
    assert cls is None  # nothing else to centre on: a random patch
    label = np.zeros((20, 20, 20), np.uint8)
    label[2:18, 2:18, 2:18] = 3          # a big unannotated block
    label[15:17, 15:17, 15:17] = 1       # a small annotated structure
    case = ArrayCase.from_arrays(np.zeros((20, 20, 20, 1), np.float32), label)
    sampler = PatchSampler([case], (6, 6, 6), foreground_fraction=1.0, ignore_label=3)
    for index in range(40):
        _, _, info = sampler.sample(index)
        assert info.foreground_class == 1
    unguarded = PatchSampler([case], (6, 6, 6), foreground_fraction=1.0)
    assert {unguarded.sample(i)[2].foreground_class for i in range(40)} == {1, 3}  # the guard matters


# ---------------------------------------------------------------------------------------------- checks
def test_label_check_knows_the_ignore_label(tmp_path):
    dataset = Dataset(root=tmp_path, layout="nnunet", cases=[], labels={0: "bg", 1: "a"}, ignore_label=2)
    voxels = {f"c{i}": {0: 100, 1: 10, 2: 5 if i == 0 else 0} for i in range(12)}  # ignore in 1 case only
    assert check_labels(dataset, voxels) == []
    dataset.ignore_label = None
    kinds = {p.kind for p in check_labels(dataset, voxels)}
    assert "undeclared-label" in kinds


# ---------------------------------------------------------------------------------------------- evaluation
def test_evaluation_ignores_the_ignore_label_hand_computed(tmp_path):
    from segpipe.evaluation.folders import evaluate_case

    ref = np.zeros((4, 4, 4), np.uint8)
    pred = np.zeros_like(ref)
    ref[0, 0, :2] = 1            # 2 voxels of class 1, both found
    pred[0, 0, :2] = 1
    ref[1, :, :] = 9             # 16 unannotated voxels ...
    pred[1, :2, :] = 1           # ... 8 of them predicted as class 1: not false positives
    pred[3, 3, 3] = 1            # one real false positive
    write_nifti(tmp_path / "ref.nii.gz", ref, np.eye(4))
    write_nifti(tmp_path / "pred.nii.gz", pred, np.eye(4))
    with_ignore = evaluate_case(tmp_path / "pred.nii.gz", tmp_path / "ref.nii.gz", labels=[1], ignore_label=9)
    assert with_ignore.metrics[1]["dice"] == pytest.approx(2 * 2 / (2 * 2 + 1))   # TP 2, FP 1, FN 0
    without = evaluate_case(tmp_path / "pred.nii.gz", tmp_path / "ref.nii.gz", labels=[1])
    assert without.metrics[1]["dice"] == pytest.approx(2 * 2 / (2 * 2 + 9))
    p, r = mask_ignored(pred, ref, 9)
    assert not np.any(r == 9) and not np.any(p[1])


def test_evaluation_per_region_hand_computed(tmp_path):
    from segpipe.evaluation.folders import evaluate_folders

    ref = np.zeros((4, 4, 4), np.uint8)
    pred = np.zeros_like(ref)
    ref[0, 0, :] = [1, 2, 3, 3]
    pred[0, 0, :] = [1, 1, 3, 2]
    (tmp_path / "p").mkdir(), (tmp_path / "r").mkdir()
    write_nifti(tmp_path / "p" / "c.nii.gz", pred, np.eye(4))
    write_nifti(tmp_path / "r" / "c.nii.gz", ref, np.eye(4))
    summary = evaluate_folders(tmp_path / "p", tmp_path / "r", tmp_path / "e", regions=REGIONS, report=False,
                               workers=1)
    dice = {name: entry["metrics"]["dice"]["mean"] for name, entry in summary["regions"].items()}
    # whole: 4 vs 4 -> 1; core: ref {1,2,3} pred {2,3} -> 2*2/(3+2) = 0.8; enhancing: ref {2,3} pred {2} -> 2/3
    assert dice == pytest.approx({"whole_tumor": 1.0, "tumor_core": 0.8, "enhancing_tumor": 2 / 3})
    assert (tmp_path / "e" / "regions.csv").is_file()
    assert summary["per_class"]["1"]["metrics"]["dice"]["mean"] == pytest.approx(2 / 3)  # the labels too


def test_evaluate_cli_folder_mode_reads_regions_and_ignore_from_dataset_json(tmp_path, capsys):
    import evaluate

    root = _nnunet(tmp_path / "ds", {**BRATS, "ignore": 4}, regions_class_order=[1, 2, 3])
    ref = np.zeros((4, 4, 4), np.uint8)
    pred = np.zeros_like(ref)
    ref[0, 0, :] = [1, 2, 3, 4]   # the last voxel is unannotated ...
    pred[0, 0, :] = [1, 2, 3, 3]  # ... so predicting enhancing tumour there is no false positive
    (tmp_path / "p").mkdir(), (tmp_path / "r").mkdir()
    write_nifti(tmp_path / "p" / "c.nii.gz", pred, np.eye(4))
    write_nifti(tmp_path / "r" / "c.nii.gz", ref, np.eye(4))
    assert evaluate.main(["--pred", str(tmp_path / "p"), "--ref", str(tmp_path / "r"), "--dataset-json",
                          str(root / "dataset.json"), "--workers", "1", "--no-report"]) == 0
    out = capsys.readouterr().out
    for name in ("whole_tumor", "tumor_core", "enhancing_tumor"):
        assert f"| {name} | 1.0000 |" in out


def test_lesion_wise_metrics_per_region_hand_computed():
    """Two tumours; label 3 (enhancing) in one of them only, predicted there; the second tumour's
    core (label 2) is missed. whole: 2 reference lesions, both found; core: 2 lesions, 1 found ->
    lesion Dice (1 + 0) / 2; enhancing: 1 lesion, found."""
    from segpipe.metrics.regions import region_lesion_metrics

    ref = np.zeros((10, 10, 10), np.uint8)
    ref[1:4, 1:4, 1:4] = 1
    ref[2, 2, 2] = 3
    ref[6:9, 6:9, 6:9] = 1
    ref[7, 7, 7] = 2
    pred = ref.copy()
    pred[7, 7, 7] = 1  # the second core missed (still whole tumour)
    rows = region_lesion_metrics(pred, ref, REGIONS, spacing_mm=(1.0, 1.0, 1.0))
    assert (rows["whole_tumor"]["n_ref_lesions"], rows["whole_tumor"]["lesion_tp"]) == (2, 2)
    assert rows["whole_tumor"]["lesion_dice"] == pytest.approx(1.0)
    assert (rows["tumor_core"]["n_ref_lesions"], rows["tumor_core"]["lesion_tp"],
            rows["tumor_core"]["lesion_fn"]) == (2, 1, 1)
    assert rows["tumor_core"]["lesion_dice"] == pytest.approx(0.5)
    assert (rows["enhancing_tumor"]["n_ref_lesions"], rows["enhancing_tumor"]["lesion_tp"]) == (1, 1)


@pytest.mark.parametrize("regions", [None, REGIONS])
def test_loader_targets_from_the_table(regions):
    """The loader's batches hold region targets (plus the ignore-mask channel) or one-hot rows with
    all-zero ignored voxels, exactly the table rows of the sampled label patch."""
    from segpipe.data.loader import targets_of, train_dataset

    rng = np.random.default_rng(0)
    label = rng.integers(0, 5, (12, 12, 12)).astype(np.uint8)  # 4 = ignore
    case = ArrayCase.from_arrays(rng.normal(size=(12, 12, 12, 2)).astype(np.float32), label)
    dataset = Dataset(root=".", layout="nnunet", cases=[], labels={0: "bg", 1: "a", 2: "b", 3: "c"},
                      ignore_label=4, regions=regions, regions_class_order=(1, 2, 3) if regions else None)
    sampler = PatchSampler([case], (8, 8, 8), batch_size=2, ignore_label=4)
    _, targets = next(iter(train_dataset(sampler, targets_of(dataset), num_workers=1)))
    patch = sampler(0)[1]
    expected = region_targets(patch, REGIONS, ignore_label=4) if regions else target_table(4, ignore_label=4)[patch]
    assert targets.shape == (2, 8, 8, 8, 4)
    np.testing.assert_array_equal(np.asarray(targets[0]), expected)
    if not regions:
        assert np.all(np.asarray(targets[0])[patch == 4] == 0)


def test_fingerprint_keeps_the_ignore_label_out_of_the_classes(tmp_path):
    """The planner counts outputs from ``classes``: the ignore label has its own entry; a stored
    fingerprint computed without the ignore label is recomputed."""
    from segpipe.data.fingerprint import load_or_compute_fingerprint
    from segpipe.data.phantoms import LESION_IGNORE, PhantomSettings, write_lesion_phantom_dataset

    root = write_lesion_phantom_dataset(tmp_path / "ds", PhantomSettings(num_cases=2, shape=(16, 16, 8)),
                                        annotate_every=2)
    dataset = load_dataset(root)
    fingerprint = load_or_compute_fingerprint(dataset, tmp_path / "fp.json")
    assert sorted(fingerprint["classes"]) == ["0", "1", "2", "3"]
    assert fingerprint["ignore_label"]["value"] == LESION_IGNORE
    assert fingerprint["ignore_label"]["voxel_fraction"] == pytest.approx(0.5)  # every other slice of 8
    dataset.ignore_label = None  # as if the ignore label were unknown: recomputed, and then a class
    again = load_or_compute_fingerprint(dataset, tmp_path / "fp.json")
    assert again["ignore_label"] is None and "4" in again["classes"]


def test_region_loss_from_a_config_with_include_background_false():
    """nnU-Net's compound (Dice without background + CE) becomes a sigmoid loss over every region,
    a single region included; class_weights then have one entry per region."""
    from segpipe.training.train import build_loss

    config = Config.from_dict({"loss": {"terms": [{"name": "dice", "include_background": False}, {"name": "ce"}]}})
    loss = build_loss(config, 1, regions=True)
    assert all(term.options["sigmoid"] and term.options["include_background"] for _, term in loss.terms)
    weighted = Config.from_dict({"loss": {"name": "dice", "class_weights": [1.0, 2.0]}})
    with pytest.raises(ValueError, match="class_weights"):
        build_loss(weighted, 3, regions=True)
    assert build_loss(weighted, 2, regions=True).options["class_weights"] == [1.0, 2.0]
