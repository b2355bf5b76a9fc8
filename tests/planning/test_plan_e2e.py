"""A thick-slice phantom dataset planned and trained end to end through the commands (tiny network)."""
import json

import numpy as np
import pytest

import predict
import train
from segpipe.cli import plan as plan_cli
from segpipe.config import load_config
from segpipe.data.phantoms import PhantomSettings, write_phantom_dataset
from segpipe.io import read_nifti

# 0.8 × 0.8 × 3.2 mm: z is 4× coarser, so the plan uses 3×3×1 kernels at full resolution and pools
# only x, y first
THICK = PhantomSettings(num_cases=6, shape=(40, 40, 10), spacing_mm=(0.8, 0.8, 3.2), seed=11)


@pytest.fixture(scope="module")
def thick_root(tmp_path_factory):
    return write_phantom_dataset(tmp_path_factory.mktemp("thick_e2e") / "thick", THICK)


def test_segpipe_plan_writes_and_prints_the_plan(thick_root, tmp_path, capsys):
    out = tmp_path / "plan"
    assert plan_cli.main([str(thick_root), "--out", str(out), "--device", "cpu", "--memory-gib", "2",
                          "--set", f"output_dir={tmp_path / 'runs'}"]) == 0
    text = capsys.readouterr().out
    assert "kernel 3×3×1" in text and "patch_size" in text and "train with: python train.py --config" in text
    config = load_config(out / "plan.yaml")  # the written config is complete and valid
    assert config.model.kernel_sizes[0] == [3, 3, 1] and config.model.strides[1] == [2, 2, 1]
    assert config.data.target_spacing_mm == pytest.approx([0.8, 0.8, 3.2])
    assert config.name == "thick" and config.model.init == "he_normal"


def test_bad_dataset_is_one_clear_error(tmp_path, capsys):
    assert plan_cli.main([str(tmp_path / "missing"), "--device", "cpu"]) == 2
    assert "error:" in capsys.readouterr().err


def test_train_with_only_data_root_plans_trains_and_predicts_on_the_original_grid(thick_root, tmp_path, capsys):
    runs = tmp_path / "runs"
    # only data.root plus what keeps the test seconds-long: explicit keys win over the plan
    overrides = [f"data.root={thick_root}", f"output_dir={runs}", "model.base_filters=4", "train.epochs=1",
                 "train.steps_per_epoch=2", "data.val_fraction=0.34", "data.preprocess_workers=1",
                 "inference.mirror_axes=[]"]
    assert train.main(["--plan-only", "--set", *overrides]) == 0
    assert not (runs / "thick").exists()  # plan only
    printed = capsys.readouterr().out
    assert "kernel 3×3×1" in printed and "features" in printed and "wrote" in printed
    assert train.main(["--set", *overrides]) == 0
    run_dir = runs / "thick"
    config = load_config(run_dir / "config.yaml")
    assert config.model.kernel_sizes[0] == [3, 3, 1] and config.model.base_filters == 4
    assert config.train.epochs == 1 and config.loss["terms"][0]["name"] == "dice"
    bundle = json.loads((run_dir / "bundle" / "bundle.json").read_text())
    assert bundle["patch_size"] == config.data.patch_size
    assert bundle["preprocessing"]["target_spacing_mm"] == pytest.approx([0.8, 0.8, 3.2])
    scan = thick_root / "imagesTr" / "thick_000.nii.gz" if (thick_root / "imagesTr" / "thick_000.nii.gz").exists() \
        else sorted((thick_root / "imagesTr").iterdir())[0]
    out = tmp_path / "pred"
    assert predict.main(["--model", str(run_dir / "bundle"), "--input", str(scan), "--output",
                         str(out), "--quiet"]) == 0
    image = read_nifti(scan)
    prediction = read_nifti(next(out.iterdir()))
    assert prediction.array.shape == image.array.shape == THICK.shape
    np.testing.assert_allclose(prediction.affine, image.affine)
    assert set(np.unique(prediction.array)) <= {0, 1, 2}


@pytest.mark.parametrize("layout, channels", [("nnunet", 2), ("folders", 1)])
def test_only_data_root_plans_and_trains_other_layouts(layout, channels, tmp_path):
    from data import make_dataset  # tests/data: tiny datasets in each layout

    root = make_dataset(tmp_path / f"ds_{layout}", layout, num_cases=4, shape=(24, 20, 16), channels=channels)
    runs = tmp_path / "runs"
    assert train.main(["--set", f"data.root={root}", f"output_dir={runs}", "model.base_filters=4", "train.epochs=1",
                       "train.steps_per_epoch=2", "data.preprocess_workers=1", "data.val_fraction=0.25",
                       "train.export_bundle=false"]) == 0
    config = load_config(runs / f"ds_{layout}" / "config.yaml")
    # cropped 23×20×16 (a zero slab at x = 0): two pools per axis, padded to multiples of 4
    assert config.model.init == "he_normal" and config.data.patch_size == [24, 20, 16]
    assert config.data.normalization == (["zscore"] * 2 if channels == 2 else "zscore")
    assert (runs / f"ds_{layout}" / "model.keras").is_file()
