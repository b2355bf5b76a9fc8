"""Surface metrics: hand-computed cubes, a sphere, anisotropic spacing, empty masks, brute force."""
import math

import numpy as np
import pytest

from segpipe.metrics import case_metrics
from segpipe.metrics.surface import (
    SurfaceDistances,
    average_symmetric_surface_distance,
    hausdorff_distance,
    normalized_surface_dice,
    percentile_hausdorff_distance,
    surface_distances,
    surface_metrics,
    surface_voxels,
)

METHODS = ["auto", "edt", "kdtree"]


def cube_pair(shift: int = 1, size: int = 12):
    """Reference: a 4^3 cube at [4:8]^3; prediction: the same cube shifted by ``shift`` along axis 0."""
    ref = np.zeros((size,) * 3, np.uint8)
    ref[4:8, 4:8, 4:8] = 1
    pred = np.zeros_like(ref)
    pred[4 + shift : 8 + shift, 4:8, 4:8] = 1
    return pred, ref


def test_surface_of_cube_is_all_but_its_interior():
    _, ref = cube_pair()
    surface = surface_voxels(ref == 1)
    assert surface.sum() == 4**3 - 2**3  # 56: only the 2^3 core has all 6 neighbours inside
    assert not surface[5:7, 5:7, 5:7].any()


def test_image_border_counts_as_outside():
    full = np.ones((3, 4, 5), bool)
    surface = surface_voxels(full)
    assert surface.sum() == full.size - 1 * 2 * 3  # only the 1x2x3 core is interior
    assert surface_voxels(np.ones((2, 2, 2), bool)).all()


@pytest.mark.parametrize("method", METHODS)
def test_cubes_shifted_by_one_voxel_hand_computed(method):
    # Along the shift axis each cube has two full 4x4 faces (16 surface voxels) and two 12-voxel
    # rings between them. Prediction -> reference: the rings of layers 5-7 and the ring of the
    # first face lie on the reference surface (36 zeros); the 4 inner voxels of its first face are
    # 1 voxel from the reference face at layer 4 and from the reference ring; its last face
    # (layer 8, 16 voxels) is 1 voxel from the reference face at layer 7. By symmetry the
    # reverse direction is the same: 36 zeros and 20 ones out of 56.
    pred, ref = cube_pair(shift=1)
    d = surface_distances(pred == 1, ref == 1, method=method)
    assert d.pred_surface_size == d.ref_surface_size == 56
    for directed in (d.pred_to_ref_mm, d.ref_to_pred_mm):
        np.testing.assert_allclose(np.sort(directed), [0.0] * 36 + [1.0] * 20)
    m = case_metrics(pred, ref, labels=[1])[1]
    assert m["dice"] == pytest.approx(3 / 4)  # overlap 3 layers of 4: 2*48 / (64+64)
    assert m["iou"] == pytest.approx(3 / 5)  # 48 / 80
    assert m["hd"] == pytest.approx(1.0)
    # 95th percentile of 56 sorted values: position 0.95 * 55 = 52.25, between two ones.
    assert m["hd95"] == pytest.approx(1.0)
    assert m["assd"] == pytest.approx(40 / 112)
    assert m["nsd"] == pytest.approx(1.0)  # every distance <= 1 mm
    assert normalized_surface_dice(d, tolerance_mm=0.5) == pytest.approx(72 / 112)


def test_cubes_shifted_by_two_voxels_hand_computed():
    # Shift 2: prediction layers 6-9. Pred -> ref: face 6 ring on ref ring (12 zeros), its 4
    # inner voxels 1 from the ref ring in-plane; ring 7 on ref face 7 (0); ring 8 is 1 from ref
    # face 7 (12 ones); face 9 is 2 from ref face 7 (16 twos). 24 zeros, 16 ones, 16 twos.
    pred, ref = cube_pair(shift=2)
    d = surface_distances(pred == 1, ref == 1)
    np.testing.assert_allclose(np.sort(d.pred_to_ref_mm), [0.0] * 24 + [1.0] * 16 + [2.0] * 16)
    np.testing.assert_allclose(np.sort(d.ref_to_pred_mm), [0.0] * 24 + [1.0] * 16 + [2.0] * 16)
    m = case_metrics(pred, ref, labels=[1])[1]
    assert m["dice"] == pytest.approx(2 / 4)
    assert m["hd"] == pytest.approx(2.0)
    assert m["hd95"] == pytest.approx(2.0)  # position 52.25 of 56 lies among the 16 twos
    assert m["assd"] == pytest.approx(2 * (16 + 32) / 112)
    assert m["nsd"] == pytest.approx(2 * (24 + 16) / 112)


def test_anisotropic_spacing_scales_only_the_shift_axis():
    pred, ref = cube_pair(shift=1)
    # 2 mm along the shift: the faces are 2 mm apart; the 4 inner voxels of the leading face
    # stay 1 mm (in-plane) from the ring. Both directions: 36 zeros, 4 ones, 16 twos.
    m = case_metrics(pred, ref, labels=[1], spacing_mm=(2.0, 1.0, 1.0))[1]
    assert m["hd"] == pytest.approx(2.0)
    assert m["hd95"] == pytest.approx(2.0)
    assert m["assd"] == pytest.approx(2 * (4 + 32) / 112)
    assert m["nsd"] == pytest.approx(2 * 40 / 112)
    assert m["vol_ref_ml"] == pytest.approx(64 * 2.0 / 1000)
    # 3 mm across the shift: the same distances as at 1 mm isotropic (the in-plane path of the
    # inner voxels runs along axis 2, still 1 mm).
    m = case_metrics(pred, ref, labels=[1], spacing_mm=(1.0, 3.0, 1.0))[1]
    assert m["hd"] == pytest.approx(1.0)
    assert m["assd"] == pytest.approx(40 / 112)
    # Dice does not depend on spacing.
    assert m["dice"] == pytest.approx(3 / 4)


def test_hd95_is_max_of_directed_percentiles_not_pooled():
    # Prediction = reference cube + a 4-voxel line 5 voxels beyond its face. Pred -> ref has
    # 56 zeros and 4 fives: 4/60 > 5 %, so its 95th percentile is 5. Pooled with the 56 zeros of
    # ref -> pred, 4/116 < 5 %: a pooled HD95 (MedPy, seg-metrics) would be 0.
    _, ref = cube_pair(size=16)
    pred = ref.copy()
    pred[12, 4:8, 5] = 1
    d = surface_distances(pred == 1, ref == 1)
    assert hausdorff_distance(d) == pytest.approx(5.0)
    assert percentile_hausdorff_distance(d) == pytest.approx(5.0)
    pooled = np.percentile(np.concatenate([d.pred_to_ref_mm, d.ref_to_pred_mm]), 95)
    assert pooled == 0.0
    assert average_symmetric_surface_distance(d) == pytest.approx(4 * 5 / 116)


def test_single_far_voxel_moves_hd_but_not_hd95():
    _, ref = cube_pair(size=20)
    pred = ref.copy()
    pred[18, 5, 5] = 1  # 11 voxels beyond the face at layer 7
    m = case_metrics(pred, ref, labels=[1])[1]
    assert m["hd"] == pytest.approx(11.0)
    assert m["hd95"] == pytest.approx(0.0)  # 1 of 57 pred surface voxels: below the 5 % tail
    assert m["assd"] == pytest.approx(11 / (57 + 56))


@pytest.mark.parametrize("spacing_mm", [(1.0, 1.0, 1.0), (0.7, 1.3, 2.5)])
def test_sphere_against_itself(spacing_mm):
    z, y, x = np.ogrid[:24, :24, :24]
    sphere = (((z - 11.5) ** 2 + (y - 12) ** 2 + (x - 11) ** 2) <= 8**2).astype(np.uint8)
    m = case_metrics(sphere, sphere, labels=[1], spacing_mm=spacing_mm)[1]
    assert (m["dice"], m["iou"], m["nsd"]) == (1.0, 1.0, 1.0)
    assert (m["hd"], m["hd95"], m["assd"]) == (0.0, 0.0, 0.0)
    assert m["empty"] is False


def test_empty_rules():
    assert surface_metrics(SurfaceDistances.empty()) == {"hd": 0.0, "hd95": 0.0, "assd": 0.0, "nsd": 1.0}
    one = surface_metrics(SurfaceDistances.empty(pred_surface_size=5))
    assert math.isnan(one["hd"]) and math.isnan(one["hd95"]) and math.isnan(one["assd"])
    assert one["nsd"] == 0.0
    empty = np.zeros((6, 6, 6), bool)
    some = empty.copy()
    some[2:4, 2:4, 2:4] = True
    assert surface_distances(empty, empty).pred_to_ref_mm.size == 0
    d = surface_distances(some, empty)
    assert d.pred_surface_size == 8 and d.ref_empty and d.pred_to_ref_mm.size == 0


def test_argument_errors():
    mask = np.ones((3, 3, 3), bool)
    with pytest.raises(TypeError,
                       match=r"^Expected a boolean mask\. Received: pred\.dtype=uint8\. Use e\.g\. `labels == c`\.$"):
        surface_distances(mask.astype(np.uint8), mask)
    with pytest.raises(ValueError,
                       match=r"^Expected pred of the same shape as ref \(3, 3, 4\)\. Received: "
                             r"pred\.shape=\(3, 3, 3\)\.$"):
        surface_distances(mask, np.ones((3, 3, 4), bool))
    with pytest.raises(ValueError,
                       match=r"^Expected 3 positive finite values \(one per array axis\)\. Received: "
                             r"spacing_mm=\(1\.0, 0\.0, 1\.0\)\.$"):
        surface_distances(mask, mask, spacing_mm=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match=r"^Expected one of \['auto', 'edt', 'kdtree'\]\. Received: method='fast'\.$"):
        surface_distances(mask, mask, method="fast")
    with pytest.raises(ValueError, match=r"^Expected a number in \[0, 100\]\. Received: percentile=120\.$"):
        percentile_hausdorff_distance(SurfaceDistances.empty(), percentile=120)


# --- brute force ------------------------------------------------------------------------------


def brute_surface(mask: np.ndarray) -> np.ndarray:
    """Surface by definition: in the mask with a 6-neighbour outside (outside the image counts)."""
    padded = np.pad(mask, 1, constant_values=False)
    surface = np.zeros_like(mask)
    for idx in np.argwhere(mask):
        p = idx + 1
        for axis in range(3):
            for step in (-1, 1):
                q = p.copy()
                q[axis] += step
                if not padded[tuple(q)]:
                    surface[tuple(idx)] = True
    return surface


def brute_metrics(pred, ref, spacing_mm, tolerance_mm):
    a = np.argwhere(brute_surface(pred)) * np.asarray(spacing_mm)
    b = np.argwhere(brute_surface(ref)) * np.asarray(spacing_mm)
    pairwise = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))  # O(n * m)
    a_to_b, b_to_a = pairwise.min(axis=1), pairwise.min(axis=0)
    pooled = np.concatenate([a_to_b, b_to_a])
    return {
        "hd": max(a_to_b.max(), b_to_a.max()),
        "hd95": max(np.percentile(a_to_b, 95), np.percentile(b_to_a, 95)),
        "assd": pooled.mean(),
        "nsd": np.mean(pooled <= tolerance_mm),
    }


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("method", ["edt", "kdtree"])
def test_agrees_with_brute_force_on_random_masks(seed, method):
    rng = np.random.default_rng(seed)
    shape = (10, 12, 9)
    spacing_mm = [(1.0, 1.0, 1.0), (0.6, 1.4, 2.5), (3.0, 0.5, 1.0)][seed % 3]
    # Smooth random blobs (touching the border sometimes) plus scattered voxels.
    def blob():
        noise = rng.random(shape)
        from scipy import ndimage

        return ndimage.uniform_filter(noise, 3) > 0.55

    pred, ref = blob(), blob()
    pred |= rng.random(shape) > 0.98
    assert pred.any() and ref.any()
    d = surface_distances(pred, ref, spacing_mm=spacing_mm, method=method)
    got = surface_metrics(d, tolerance_mm=1.5)
    want = brute_metrics(pred, ref, spacing_mm, 1.5)
    for name in ("hd", "hd95", "assd", "nsd"):
        assert got[name] == pytest.approx(want[name], rel=1e-9, abs=1e-9), name
    # Both methods list the distances in the same (C) order.
    other = surface_distances(pred, ref, spacing_mm=spacing_mm, method="kdtree" if method == "edt" else "edt")
    np.testing.assert_allclose(d.pred_to_ref_mm, other.pred_to_ref_mm, rtol=1e-12)


def test_case_metrics_crop_matches_full_volume_brute_force():
    # Structures far apart in a larger image: case_metrics crops per class; the result must equal
    # the brute force on the whole image.
    rng = np.random.default_rng(7)
    labels = np.zeros((20, 18, 16), np.uint8)
    labels[2:7, 3:9, 1:6] = 1
    labels[12:19, 10:17, 9:16] = 2
    pred = labels.copy()
    pred[rng.random(labels.shape) > 0.97] = 2
    pred[3:6, 4:7, 2:5] = 0
    spacing_mm = (1.2, 0.8, 2.0)
    got = case_metrics(pred, labels, labels=[1, 2], spacing_mm=spacing_mm, tolerance_mm={1: 1.0, 2: 2.0})
    for c, tau in ((1, 1.0), (2, 2.0)):
        want = brute_metrics(pred == c, labels == c, spacing_mm, tau)
        for name in ("hd", "hd95", "assd", "nsd"):
            assert got[c][name] == pytest.approx(want[name], rel=1e-9, abs=1e-9), (c, name)
