"""The tf.data loader over the cached cases: shapes, dtypes, one-hot, determinism, validation modes."""
import dataclasses

import numpy as np
import pytest

from segpipe.config import load_config
from segpipe.data.augment import Augmenter
from segpipe.data.loader import make_datasets, train_dataset, validation_dataset, validation_patch_dataset
from segpipe.data.pipeline import prepare_data
from segpipe.data.sampling import PatchSampler


@pytest.fixture(scope="module")
def prepared(phantom_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("loader")
    config = load_config(None, [f"data.root={phantom_root}", f"output_dir={out}", "data.preprocess_workers=1",
                                "data.val_fraction=0.34", "model.depth=2",
                                "data.patch_size=[16, 16, 8]"])  # fits the 24×24×16 phantoms
    return config, prepare_data(config, progress=False)


def test_train_batches_shapes_dtypes_and_one_hot(prepared):
    _, data = prepared
    sampler = PatchSampler(data.subset("train"), (16, 16, 8), batch_size=3, augmenter=Augmenter(), seed=0)
    images, labels = next(iter(train_dataset(sampler, data.dataset.num_classes)))
    assert images.shape == (3, 16, 16, 8, 1) and images.dtype.name == "float32"
    assert labels.shape == (3, 16, 16, 8, 3) and labels.dtype.name == "float32"
    labels = labels.numpy()
    np.testing.assert_array_equal(labels.sum(-1), 1.0)  # exactly one class per voxel
    assert set(np.unique(labels)) == {0.0, 1.0}
    for i in range(3):  # the batch holds samples 0, 1, 2 of the sampler, the label one-hot encoded
        image, label = sampler(i)
        np.testing.assert_array_equal(images.numpy()[i], image)
        np.testing.assert_array_equal(labels[i].argmax(-1), label)


def test_a_batch_depends_only_on_seed_and_index(prepared):
    """What --resume relies on: starting at sample k gives the batches an unbroken run gives from k."""
    _, data = prepared

    def batches(start, count):
        sampler = PatchSampler(data.subset("train"), (8, 8, 8), batch_size=2, augmenter=Augmenter(), seed=5)
        ds = train_dataset(sampler, data.dataset.num_classes, start_index=start, num_workers=2)
        return [b[0].numpy() for b in ds.take(count)]

    straight, resumed = batches(0, 4), batches(4, 2)  # 2 batches of 2 samples skipped
    for a, b in zip(straight[2:], resumed):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(straight[0], straight[1])


def test_validation_yields_whole_padded_cases(prepared):
    _, data = prepared
    cases = data.subset("val")
    batches = list(validation_dataset(cases, data.dataset.num_classes, divisor=8))
    assert len(batches) == len(cases) == 2
    image, label = batches[0]
    shape = cases[0].meta["shape"]
    assert image.shape == (1, *(-(-n // 8) * 8 for n in shape), 1) and label.shape[-1] == 3
    np.testing.assert_array_equal(label.numpy()[0, : shape[0], : shape[1], : shape[2]].argmax(-1),
                                  cases[0].load_label())
    np.testing.assert_array_equal(label.numpy().sum(-1), 1.0)  # the padding is background
    assert list(validation_dataset(cases[:1], 3, divisor=32))[0][0].shape == (1, 32, 32, 32, 1)


def test_validation_patches_are_fixed(prepared):
    _, data = prepared

    def patches():
        ds = validation_patch_dataset(data.subset("val"), 3, (16, 16, 8), patches_per_case=3, batch_size=2,
                                      foreground_fraction=0.5, seed=0)
        return [b[0].numpy() for b in ds]

    first, second = patches(), patches()
    assert [b.shape[0] for b in first] == [2, 2, 2]  # 2 cases x 3 patches
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("mode", ["whole", "patches"])
def test_make_datasets_follows_the_config(prepared, mode):
    config, data = prepared
    data_config = dataclasses.replace(config.data, validation=mode, patch_size=[16, 16, 8])
    train, val = make_datasets(data, data_config, seed=0, divisor=2)
    images, labels = next(iter(train))
    assert images.shape == (2, 16, 16, 8, 1) and labels.shape == (2, 16, 16, 8, 3)
    val_images, _ = next(iter(val))
    assert val_images.shape[1:4] == ((16, 16, 8) if mode == "patches" else tuple(data.subset("val")[0].meta["shape"]))


def test_the_loader_threads_never_open_a_file(prepared, monkeypatch):
    """The sampler and the validation data open every case where they are built: numpy parses a .npy
    header with ast.literal_eval, which CPython 3.11 does not make safe in a tf.data thread while the
    main thread traces ("SystemError: AST constructor recursion depth mismatch", seen in a run)."""
    import pickle

    from segpipe.data.cache import CachedCase

    _, data = prepared
    train = [CachedCase(case.case_id, case.directory, case.meta) for case in data.subset("train")]  # none opened
    val = [CachedCase(case.case_id, case.directory, case.meta) for case in data.subset("val")]
    sampler = PatchSampler(train, (16, 16, 8), batch_size=2, augmenter=Augmenter(), seed=0)
    train_ds = train_dataset(sampler, data.dataset.num_classes, num_workers=2)
    val_ds = validation_dataset(val, data.dataset.num_classes, divisor=8)
    patches = validation_patch_dataset(val, 3, (16, 16, 8), patches_per_case=2, batch_size=2,
                                       foreground_fraction=0.5, seed=0)

    def no_load(*args, **kwargs):
        raise AssertionError(f"np.load in a loader thread: {args}")

    monkeypatch.setattr(np, "load", no_load)
    assert len(list(train_ds.take(3))) == 3
    assert len(list(val_ds)) == len(val) and len(list(patches)) == len(val)
    monkeypatch.undo()
    # the maps stay in their process: a pickled case is small and opens its files again
    copy = pickle.loads(pickle.dumps(train[0]))
    assert len(pickle.dumps(train[0])) < train[0].load_image().nbytes / 2  # 7 KB (the locations) vs 36 KB
    np.testing.assert_array_equal(copy.load_label(), train[0].load_label())
