import numpy as np
import pytest
from scipy import ndimage

from segpipe.data.layouts import load_dataset
from segpipe.data.phantoms import PhantomSettings, make_phantom_case, write_phantom_dataset
from segpipe.io import read_nifti


def test_same_settings_give_identical_cases():
    settings = PhantomSettings(shape=(24, 24, 24), seed=7)
    a_img, a_lab = make_phantom_case(2, settings)
    b_img, b_lab = make_phantom_case(2, settings)
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_lab, b_lab)
    c_img, c_lab = make_phantom_case(3, settings)
    assert not np.array_equal(a_lab, c_lab)  # cases differ from each other
    d_img, _ = make_phantom_case(2, PhantomSettings(shape=(24, 24, 24), seed=8))
    assert not np.array_equal(a_img, d_img)  # and with the seed


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.8, 0.8, 2.0)])
def test_two_touching_classes_of_different_sizes_and_realistic_foreground(spacing):
    shape = (48, 48, 48) if spacing[2] == 1.0 else (60, 60, 24)
    settings = PhantomSettings(shape=shape, spacing_mm=spacing, seed=0)
    for i in range(4):
        image, label = make_phantom_case(i, settings)
        assert image.shape == label.shape == shape
        assert image.dtype == np.float32 and label.dtype == np.uint8
        counts = np.bincount(label.ravel(), minlength=3)
        assert set(np.unique(label)) == {0, 1, 2}
        assert 0.03 <= (counts[1] + counts[2]) / label.size <= 0.10
        assert counts[1] > 2 * counts[2]  # organ larger than lesion
        # touching: the lesion dilated by one voxel reaches the organ
        assert (ndimage.binary_dilation(label == 2) & (label == 1)).any()
        # noisy, biased intensities: classes differ on average but overlap voxel-wise
        assert image[label == 2].mean() > image[label == 1].mean() > image[label == 0].mean()
        assert image[label == 0].std() > 0


def test_writes_msd_layout_readable_by_the_loader(tmp_path):
    settings = PhantomSettings(num_cases=3, shape=(16, 16, 12), spacing_mm=(1.0, 1.0, 2.0), seed=1)
    root = write_phantom_dataset(tmp_path / "ds", settings)
    assert sorted(p.name for p in root.iterdir()) == ["dataset.json", "imagesTr", "labelsTr"]
    dataset = load_dataset(root)
    assert dataset.layout == "msd"
    assert dataset.labels == {0: "background", 1: "organ", 2: "lesion"}
    assert [c.case_id for c in dataset.cases] == ["phantom_000", "phantom_001", "phantom_002"]
    volume = read_nifti(dataset.cases[1].image_paths[0])
    assert volume.spacing_mm == (1.0, 1.0, 2.0)
    expected_image, expected_label = make_phantom_case(1, settings)
    np.testing.assert_array_equal(volume.array, expected_image)
    np.testing.assert_array_equal(read_nifti(dataset.cases[1].label_path).array, expected_label)
    assert not list(tmp_path.glob(".ds.*"))  # the temporary folder was renamed into place


def test_refuses_to_overwrite(tmp_path):
    (tmp_path / "ds").mkdir()
    with pytest.raises(FileExistsError, match="ds"):
        write_phantom_dataset(tmp_path / "ds", PhantomSettings(num_cases=2, shape=(8, 8, 8)))


def test_command_line_script(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "data_prep" / "make_phantoms.py"
    args = [sys.executable, str(script), str(tmp_path / "ds"), "--num-cases", "2", "--shape", "12", "12", "8",
            "--spacing-mm", "1", "1", "2.5", "--seed", "5"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    dataset = load_dataset(tmp_path / "ds")
    assert len(dataset.cases) == 2
    assert read_nifti(dataset.cases[0].image_paths[0]).spacing_mm == (1.0, 1.0, 2.5)
    again = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert again.returncode == 1 and "exists" in again.stderr
