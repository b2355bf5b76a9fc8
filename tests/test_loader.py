import numpy as np
import pytest

from segpipe.data.layouts import load_dataset
from segpipe.data.loader import PatchSampler, load_cases, train_dataset, validation_dataset, zscore


@pytest.fixture(scope="module")
def cases(phantom_root):
    dataset = load_dataset(phantom_root)
    return dataset, load_cases(dataset, [c.case_id for c in dataset.cases])


def test_zscore_per_channel():
    rng = np.random.default_rng(0)
    image = np.stack([rng.normal(5, 2, (8, 8, 8)), rng.normal(-3, 0.5, (8, 8, 8))], -1)
    out = zscore(image)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out.mean(axis=(0, 1, 2)), 0, atol=1e-5)
    np.testing.assert_allclose(out.std(axis=(0, 1, 2)), 1, atol=1e-4)


def test_train_batches_shapes_dtypes_and_one_hot(cases):
    dataset, loaded = cases
    sampler = PatchSampler(loaded, (16, 16, 8), batch_size=3, foreground_fraction=0.33, seed=0)
    images, labels = next(iter(train_dataset(sampler, dataset.num_classes)))
    assert images.shape == (3, 16, 16, 8, 1) and images.dtype.name == "float32"
    assert labels.shape == (3, 16, 16, 8, 3) and labels.dtype.name == "float32"
    labels = labels.numpy()
    np.testing.assert_array_equal(labels.sum(-1), 1.0)  # exactly one class per voxel
    assert set(np.unique(labels)) == {0.0, 1.0}


def test_patches_larger_than_the_volume_are_padded(cases):
    dataset, loaded = cases
    sampler = PatchSampler(loaded, (32, 32, 32), batch_size=2, foreground_fraction=0.5, seed=0)
    image, label = sampler.sample(1)
    assert image.shape == (32, 32, 32, 1) and label.shape == (32, 32, 32)
    assert (label[24:] == 0).all() and (image[24:] == 0).all()


def test_sampling_is_a_function_of_seed_and_index(cases):
    _, loaded = cases
    a = PatchSampler(loaded, (8, 8, 8), batch_size=2, foreground_fraction=0.5, seed=4)
    b = PatchSampler(loaded, (8, 8, 8), batch_size=2, foreground_fraction=0.5, seed=4)
    for index in (0, 1, 17):
        np.testing.assert_array_equal(a.sample(index)[0], b.sample(index)[0])
    assert not np.array_equal(a.sample(0)[0], a.sample(2)[0])


def test_foreground_share_follows_the_batch_rule(cases):
    _, loaded = cases
    # batch 3 with fraction 1/3: sample 2 of every batch is centred on foreground
    sampler = PatchSampler(loaded, (8, 8, 8), batch_size=3, foreground_fraction=1 / 3, seed=0)
    forced = [sampler.sample(i)[1] for i in range(2, 300, 3)]
    assert all((label[4, 4, 4] > 0) or (label > 0).any() for label in forced)
    centred = np.mean([label[4, 4, 4] > 0 for label in forced])
    assert centred > 0.9  # centred on a foreground voxel unless clipped at the border
    # uniformly placed patches of this size rarely contain foreground at their centre
    free = np.mean([sampler.sample(i)[1][4, 4, 4] > 0 for i in range(0, 300, 3)])
    assert free < 0.3


def test_validation_yields_whole_padded_cases(cases):
    dataset, loaded = cases
    batches = list(validation_dataset(loaded[:2], dataset.num_classes, divisor=8))
    assert len(batches) == 2
    image, label = batches[0]
    assert image.shape == (1, 24, 24, 16, 1) and label.shape == (1, 24, 24, 16, 3)
    batches = list(validation_dataset(loaded[:1], dataset.num_classes, divisor=32))
    assert batches[0][0].shape == (1, 32, 32, 32, 1)
