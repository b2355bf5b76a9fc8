import numpy as np
import pytest

from segpipe.data.augment import Augmenter, AugmentSettings
from segpipe.data.cache import build_cache
from segpipe.data.layouts import load_dataset
from segpipe.data.preprocess import PreprocessSettings
from segpipe.data.sampling import (
    ArrayCase,
    PatchSampler,
    choose_patch,
    class_locations,
    extract_patch,
    is_foreground_slot,
    pack_locations,
    unpack_locations,
)

from . import make_dataset


def _sparse_case(shape=(24, 24, 24)):
    """A case whose foreground is two tiny blobs, so random patches rarely hit them."""
    label = np.zeros(shape, np.uint8)
    label[2, 2, 2] = 1
    label[20:22, 20:22, 20:22] = 2
    image = np.random.default_rng(0).normal(size=shape + (1,)).astype(np.float32)
    return ArrayCase.from_arrays(image, label)


def test_class_locations_subsample_and_pack_round_trip():
    label = np.zeros((20, 20, 20), np.uint8)
    label[:10] = 1
    label[15, 15, 15] = 2
    locations = class_locations(label, max_per_class=100, min_fraction=0.01)
    assert sorted(locations) == [1, 2]
    assert len(locations[1]) == 100 and len(np.unique(locations[1], axis=0)) == 100
    assert np.all(label[tuple(locations[1].T)] == 1)
    np.testing.assert_array_equal(locations[2], [[15, 15, 15]])
    assert len(class_locations(label, max_per_class=10, min_fraction=0.05)[1]) == 200  # 5% of 4000
    unpacked = unpack_locations(pack_locations(locations))
    assert all(np.array_equal(unpacked[k], locations[k]) for k in locations)
    assert unpack_locations(pack_locations({})) == {}


def test_extract_patch_pads_outside_the_volume():
    array = np.arange(27, dtype=np.float32).reshape(3, 3, 3)
    patch = extract_patch(array, (-1, 0, 1), (3, 3, 3), fill=-5)
    assert patch.shape == (3, 3, 3)
    assert np.all(patch[0] == -5) and np.all(patch[:, :, 2] == -5)
    np.testing.assert_array_equal(patch[1:, :, :2], array[:2, :, 1:])


def test_small_volumes_are_padded_to_the_patch():
    label = np.ones((5, 6, 7), np.uint8)
    case = ArrayCase.from_arrays(np.ones((5, 6, 7, 2), np.float32), label)
    sampler = PatchSampler([case], (8, 8, 8), foreground_fraction=0.5)
    for index in range(10):
        image, patch_label, info = sampler.sample(index)
        assert image.shape == (8, 8, 8, 2) and patch_label.shape == (8, 8, 8)
        assert image.sum() == 5 * 6 * 7 * 2 and patch_label.sum() == 5 * 6 * 7  # whole volume inside


def test_foreground_patch_contains_its_class():
    rng = np.random.default_rng(0)
    case = _sparse_case()
    for _ in range(50):
        lower, cls = choose_patch((24, 24, 24), (8, 8, 8), rng, locations=case.locations, force_foreground=True)
        assert cls in (1, 2)
        assert np.any(extract_patch(case.label, lower, (8, 8, 8)) == cls)
        assert np.all(lower >= 0) and np.all(lower <= 16)


def test_batch_rule_matches_nnunet():
    assert [is_foreground_slot(j, 2, 1 / 3) for j in range(2)] == [False, True]
    assert [is_foreground_slot(j, 3, 1 / 3) for j in range(3)] == [False, False, True]
    assert sum(is_foreground_slot(j, 12, 1 / 3) for j in range(12)) == 4


@pytest.mark.parametrize("batch_size", [3, None])
def test_foreground_ratio_within_tolerance(batch_size):
    sampler = PatchSampler([_sparse_case()], (6, 6, 6), foreground_fraction=1 / 3, batch_size=batch_size, seed=3)
    n = 600
    infos = [sampler.sample(i)[2] for i in range(n)]
    centred = np.mean([info.foreground_class is not None for info in infos])
    with_foreground = np.mean([sampler(i)[1].any() for i in range(n)])
    if batch_size:
        assert centred == pytest.approx(1 / 3, abs=1e-9)
    else:
        assert centred == pytest.approx(1 / 3, abs=0.06)
    # Random patches hit these blobs rarely: the share of patches with foreground is close to 1/3.
    assert 1 / 3 - 0.06 < with_foreground < 1 / 3 + 0.12
    classes = [info.foreground_class for info in infos if info.foreground_class is not None]
    assert 0.35 < np.mean(np.array(classes) == 1) < 0.65  # a random present class, not by voxel count


def test_sampling_is_deterministic_per_seed_and_index():
    cases = [_sparse_case(), _sparse_case((10, 12, 14))]
    augmenter = Augmenter(AugmentSettings(order=1))
    a = PatchSampler(cases, (8, 8, 8), augmenter=augmenter, seed=7)
    b = PatchSampler(cases, (8, 8, 8), augmenter=augmenter, seed=7)
    forward = [a(i) for i in range(12)]
    backward = [b(i) for i in reversed(range(12))][::-1]  # any execution order, same samples
    for (x1, y1), (x2, y2) in zip(forward, backward):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
    other = PatchSampler(cases, (8, 8, 8), augmenter=augmenter, seed=8)
    assert any(not np.array_equal(other(i)[0], forward[i][0]) for i in range(12))


def test_cycle_cases_gives_fixed_validation_patches():
    cases = [_sparse_case(), _sparse_case((10, 12, 14))]
    sampler = PatchSampler(cases, (8, 8, 8), cycle_cases=True, seed=1)
    assert [sampler.sample(i)[2].case_index for i in range(4)] == [0, 1, 0, 1]
    np.testing.assert_array_equal(sampler(3)[0], sampler(3)[0])


def test_sampling_from_memory_mapped_cache_with_augmentation(tmp_path):
    dataset = load_dataset(make_dataset(tmp_path / "raw", "nnunet", channels=2, shape=(16, 14, 12)))
    cached = build_cache(dataset, tmp_path / "cache", PreprocessSettings(), progress=False)
    settings = AugmentSettings.from_dict({"rotation": {"p": 1.0}, "scaling": {"p": 1.0}, "elastic": {"p": 0.5}})
    sampler = PatchSampler(cached, (8, 8, 8), augmenter=Augmenter(settings), batch_size=2, seed=0)
    # the same cases fully in memory: memory-mapped reads of only the needed box give the same samples
    in_memory = [ArrayCase(np.array(c.load_image()), np.array(c.load_label()), c.locations) for c in cached]
    reference = PatchSampler(in_memory, (8, 8, 8), augmenter=Augmenter(settings), batch_size=2, seed=0)
    assert all(isinstance(c.load_image(), np.memmap) for c in cached)
    for i in range(6):
        image, label, info = sampler.sample(i)
        assert image.shape == (8, 8, 8, 2) and image.dtype == np.float32
        assert label.shape == (8, 8, 8) and label.dtype == np.uint8
        expected_image, expected_label = reference(i)
        np.testing.assert_array_equal(image, expected_image)
        np.testing.assert_array_equal(label, expected_label)


def test_invalid_arguments():
    with pytest.raises(ValueError, match=r"^Expected at least one case to sample from\. Received: cases=\[\]\.$"):
        PatchSampler([], (8, 8, 8))
    with pytest.raises(ValueError, match="Received: patch_size=\\(8, 8\\)"):
        PatchSampler([_sparse_case()], (8, 8))
    with pytest.raises(ValueError, match="Received: foreground_fraction=1.5"):
        PatchSampler([_sparse_case()], (8, 8, 8), foreground_fraction=1.5)
