"""The fingerprint's target spacing (planning's rule, the one both training paths use) and patch-size hint."""
import numpy as np
import pytest

from segpipe.data.fingerprint import compute_fingerprint, suggest_patch_size
from segpipe.data.layouts import load_dataset
from segpipe.planning.rules import plan_target_spacing


def test_isotropic_data_takes_the_median_spacing():
    spacings = np.array([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.2, 1.2, 1.2]])
    assert plan_target_spacing(spacings, np.array([[40, 40, 40]] * 3)).value == [1.0, 1.0, 1.0]


def test_thick_slices_take_the_10th_percentile_of_the_coarse_axis():
    # median z 5 mm > 3 x 0.8 mm, and z has 40 voxels, < 512 / 3: nnU-Net's anisotropy rule
    spacings = np.array([[0.8, 0.8, z] for z in (5.0, 4.0, 3.0, 6.0, 5.0)])
    shapes = np.array([[512, 512, 40]] * 5)
    # 10th percentile of [3, 4, 5, 5, 6] (linear): 3 + 0.4 x (4 - 3) = 3.4
    assert plan_target_spacing(spacings, shapes).value == pytest.approx([0.8, 0.8, 3.4])


def test_coarse_spacing_with_many_slices_keeps_the_median():
    spacings = np.array([[0.8, 0.8, z] for z in (5.0, 4.0, 3.0, 6.0, 5.0)])
    shapes = np.array([[100, 100, 200]] * 5)  # z: 200 voxels, not < 100 / 3
    assert plan_target_spacing(spacings, shapes).value == [0.8, 0.8, 5.0]


def test_the_coarse_axis_must_be_coarser_than_every_other_axis():
    # nnU-Net compares the coarse axis with the *largest* other spacing: 2.5 mm is more than 3 x 0.5 mm but
    # not more than 3 x 1.0 mm, so the median stays (the fingerprint's former rule compared with the smallest
    # and took the 10th percentile, 2.1 mm)
    spacings = np.array([[0.5, 1.0, z] for z in (2.1, 2.5, 2.5, 2.5, 2.5)])
    assert plan_target_spacing(spacings, np.array([[400, 200, 40]] * 5)).value == [0.5, 1.0, 2.5]


def test_the_fingerprint_takes_the_planners_target_spacing(phantom_root):
    fingerprint = compute_fingerprint(load_dataset(phantom_root), samples_per_case=100)
    cases = list(fingerprint["cases"].values())
    spacings = np.array([c["spacing_mm"] for c in cases])
    cropped = np.array([c["cropped_shape"] for c in cases])
    assert fingerprint["target_spacing_mm"] == plan_target_spacing(spacings, cropped).value == [1.0, 1.0, 1.5]


def test_patch_size_rounds_up_to_the_divisor_and_caps():
    assert suggest_patch_size([37, 64, 200]) == [40, 64, 128]
    assert suggest_patch_size([3, 3, 3]) == [8, 8, 8]  # never below one divisor
    assert suggest_patch_size([150, 17, 1], divisor=16, max_size=100) == [96, 32, 16]  # cap 100 // 16 x 16
