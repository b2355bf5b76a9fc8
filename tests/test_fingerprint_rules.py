"""The fingerprint's target-spacing and patch-size suggestions, derived by hand."""
import numpy as np
import pytest

from segpipe.planning.fingerprint import suggest_patch_size, suggest_target_spacing


def test_isotropic_data_takes_the_median_spacing():
    spacings = np.array([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.2, 1.2, 1.2]])
    assert suggest_target_spacing(spacings) == [1.0, 1.0, 1.0]


def test_thick_slices_take_the_10th_percentile_of_the_coarse_axis():
    # median z 5 mm > 3 x 0.8 mm, and at that spacing z has 40 voxels, < 512 / 3: nnU-Net's anisotropy rule
    spacings = np.array([[0.8, 0.8, z] for z in (5.0, 4.0, 3.0, 6.0, 5.0)])
    shapes = np.array([[512, 512, 40]] * 5)
    # 10th percentile of [3, 4, 5, 5, 6] (linear): 3 + 0.4 x (4 - 3) = 3.4
    assert suggest_target_spacing(spacings, shapes) == pytest.approx([0.8, 0.8, 3.4])


def test_coarse_spacing_with_many_slices_keeps_the_median():
    spacings = np.array([[0.8, 0.8, z] for z in (5.0, 4.0, 3.0, 6.0, 5.0)])
    shapes = np.array([[100, 100, 200]] * 5)  # z at the median spacing: 200 voxels, not < 100 / 3
    assert suggest_target_spacing(spacings, shapes) == [0.8, 0.8, 5.0]
    assert suggest_target_spacing(spacings) == pytest.approx([0.8, 0.8, 3.4])  # without shapes: spacing alone


def test_patch_size_rounds_up_to_the_divisor_and_caps():
    assert suggest_patch_size([37, 64, 200]) == [40, 64, 128]
    assert suggest_patch_size([3, 3, 3]) == [8, 8, 8]  # never below one divisor
    assert suggest_patch_size([150, 17, 1], divisor=16, max_size=100) == [96, 32, 16]  # cap 100 // 16 x 16
