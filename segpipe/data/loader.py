"""tf.data input pipeline over the preprocessed cache: training patches and validation data.

Training batches come from :class:`segpipe.data.sampling.PatchSampler` (foreground oversampling and
:class:`segpipe.data.augment.Augmenter`) reading memory-mapped cached cases, run in a parallel,
deterministic ``tf.data`` map over ``tf.numpy_function`` and prefetched. Every sample is a pure
function of ``(seed, sample index)``, so a resumed run continues with exactly the samples it would
have seen, by starting the index at ``epoch * steps * batch``.

Validation uses whole preprocessed cases (padded at the end to a size the network divides) or fixed
patches (the same ones every epoch). Labels are one-hot encoded in TensorFlow, not in NumPy, so a
large validation case costs one uint8 map in Python instead of a float32 volume per class. Wherever
a function takes ``num_classes`` it also takes a (256, K) target table (:func:`targets_of`): the
ignore label becomes an all-zero one-hot row, regions one channel per region (plus a last
ignore-mask channel with an ignore label); see :mod:`segpipe.data.labels`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

from segpipe.data.augment import Augmenter, AugmentSettings
from segpipe.data.labels import target_table
from segpipe.data.sampling import PatchSampler, SamplingCase, open_cases
from segpipe.errors import expected

if TYPE_CHECKING:
    import tensorflow as tf

    from segpipe.data.settings import DataConfig
    from segpipe.data.pipeline import PreparedData


def make_datasets(
    prepared: "PreparedData", data: "DataConfig", *, seed: int, divisor: int, start_index: int = 0,
    num_outputs: int = 1,
) -> tuple["tf.data.Dataset", "tf.data.Dataset"]:
    """The training and validation datasets of a run, as ``data`` configures them.

    Parameters
    ----------
    prepared
        cached cases and split (:func:`segpipe.data.pipeline.prepare_data`).
    data
        the config's ``data`` section (patch and batch size, augmentation, validation mode).
    seed
        the run's seed; training sample ``i`` depends only on ``(seed, i)``.
    divisor
        every side of a whole validation case is padded to a multiple of it.
    start_index
        the first training sample (``epoch * steps_per_epoch * batch_size`` on resume).
    num_outputs
        the model's outputs; with more than one (deep supervision) every batch's target is
        a tuple, one per output (:func:`with_output_targets`).
    """
    num_classes = targets_of(prepared.dataset)
    train = train_dataset(train_sampler(prepared, data, seed=seed), num_classes, start_index=start_index,
                          num_workers=data.num_workers)
    val_cases = prepared.subset("val")
    if data.validation == "patches":
        val = validation_patch_dataset(
            val_cases, num_classes, data.patch_size, patches_per_case=data.val_patches_per_case,
            batch_size=data.batch_size, foreground_fraction=data.foreground_fraction, seed=seed,
            num_workers=data.num_workers, ignore_label=prepared.dataset.ignore_label,
        )
    else:
        val = validation_dataset(val_cases, num_classes, divisor=divisor)
    return with_output_targets(train, num_outputs), with_output_targets(val, num_outputs)


def targets_of(dataset) -> "int | np.ndarray":
    """What the loader turns a label map into for ``dataset`` (a :class:`segpipe.data.layouts.Dataset`):
    its class count (one-hot targets), or with an ignore label or regions the (256, K) lookup table of
    :func:`segpipe.data.labels.target_table` (ignored voxels: an all-zero one-hot row, or for regions
    an extra last ignore-mask channel)."""
    if dataset.ignore_label is None and not dataset.regions:
        return dataset.num_classes
    return target_table(dataset.num_classes, ignore_label=dataset.ignore_label, regions=dataset.regions)


def with_output_targets(ds: "tf.data.Dataset", num_outputs: int) -> "tf.data.Dataset":
    """Batches ``(image, one-hot)`` -> ``(image, (one-hot, one-hot / 2, ...))`` for a deep-supervision
    model with ``num_outputs`` outputs, full resolution first (each target average-pooled by ``2^i``:
    class fractions, :func:`segpipe.losses.deep_supervision_targets`); unchanged for one output."""
    if num_outputs <= 1:
        return ds
    from segpipe.losses import deep_supervision_targets  # Keras: only for deep-supervision runs

    return ds.map(lambda image, label: (image, deep_supervision_targets(label, num_outputs)))


def train_sampler(prepared: "PreparedData", data: "DataConfig", *, seed: int) -> PatchSampler:
    """The training sampler ``data`` configures: patches of the training cases, augmented, slot rule per batch."""
    return PatchSampler(
        prepared.subset("train"), data.patch_size, foreground_fraction=data.foreground_fraction,
        batch_size=data.batch_size, augmenter=Augmenter(AugmentSettings.from_dict(data.augment)), seed=seed,
        ignore_label=prepared.dataset.ignore_label,
    )


def train_dataset(
    sampler: PatchSampler, num_classes: "int | np.ndarray", *, start_index: int = 0, num_workers: int = 2
) -> "tf.data.Dataset":
    """Endless batches of (image (B, X, Y, Z, C) float32, one-hot (B, X, Y, Z, num_classes) float32).

    Sample ``start_index + i`` is the ``i``-th element; ``sampler.batch_size`` is the batch size.
    """
    import tensorflow as tf

    if not sampler.batch_size:
        raise ValueError(expected("a sampler with a batch_size (its foreground slot rule)", key="sampler.batch_size",
                                  received=sampler.batch_size))
    ds = tf.data.Dataset.range(start_index, np.iinfo(np.int64).max)
    ds = ds.map(_patch_map(sampler, num_classes), num_parallel_calls=num_workers, deterministic=True)
    return ds.batch(sampler.batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def validation_patch_dataset(
    cases: Sequence[SamplingCase],
    num_classes: "int | np.ndarray",
    patch_size: Sequence[int],
    *,
    patches_per_case: int,
    batch_size: int,
    foreground_fraction: float,
    seed: int,
    num_workers: int = 2,
    ignore_label: int | None = None,
) -> "tf.data.Dataset":
    """``patches_per_case`` fixed, unaugmented patches of every case, the same ones every epoch.

    Each patch is foreground-centred with probability ``foreground_fraction`` (drawn per patch, so
    every case gets both kinds, whatever the batch size).
    """
    import tensorflow as tf

    sampler = PatchSampler(cases, patch_size, foreground_fraction=foreground_fraction, batch_size=None,
                           augmenter=None, seed=seed, cycle_cases=True, ignore_label=ignore_label)
    ds = tf.data.Dataset.range(len(cases) * patches_per_case)
    ds = ds.map(_patch_map(sampler, num_classes), num_parallel_calls=num_workers, deterministic=True)
    return ds.batch(batch_size).prefetch(2)


def validation_dataset(cases: Sequence[SamplingCase], num_classes: "int | np.ndarray", divisor: int) -> "tf.data.Dataset":
    """Whole cases, one per batch, padded at the end so each side is divisible by ``divisor``."""
    import tensorflow as tf

    if not cases:
        raise ValueError(expected("at least one validation case", key="cases", received=list(cases)))
    cases = open_cases(cases)  # here: the generator runs in a tf.data thread
    channels = _channels(cases[0])

    def generate():
        for case in cases:
            label = np.asarray(case.load_label())
            shape = tuple(-(-n // divisor) * divisor for n in label.shape)
            image, label = pad_to(np.asarray(case.load_image()), label, shape)
            yield image[None], label[None]

    signature = (
        tf.TensorSpec((1, None, None, None, channels), tf.float32),
        tf.TensorSpec((1, None, None, None), tf.uint8),
    )
    ds = tf.data.Dataset.from_generator(generate, output_signature=signature)
    ds = ds.map(lambda image, label: (image, _one_hot(label, num_classes)))
    return ds.apply(tf.data.experimental.assert_cardinality(len(cases))).prefetch(2)


def pad_to(image: np.ndarray, label: np.ndarray, shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Pad image (with 0) and label (with background) at the end to at least ``shape``."""
    pad = [(0, max(0, s - n)) for s, n in zip(shape, label.shape)]
    if not any(p for _, p in pad):
        return image, label
    return np.pad(image, pad + [(0, 0)]), np.pad(label, pad)


# ----------------------------------------------------------------------------------------------


def _patch_map(sampler: PatchSampler, num_classes: "int | np.ndarray"):
    """A tf.data map: sample index -> (image patch float32, one-hot label patch float32)."""
    import tensorflow as tf

    channels = _channels(sampler.cases[0])

    def sample(index):
        return sampler(int(index))

    def map_fn(index):
        # stateful=False: the output depends on the index only, which lets tf.data run calls in parallel.
        image, label = tf.numpy_function(sample, [index], [tf.float32, tf.uint8], stateful=False)
        image.set_shape((*sampler.patch_size, channels))
        label.set_shape(sampler.patch_size)
        return image, _one_hot(label, num_classes)

    return map_fn


def _one_hot(label: "tf.Tensor", num_classes: "int | np.ndarray") -> "tf.Tensor":
    """One-hot targets of ``num_classes`` classes, or rows of a (256, K) target table."""
    import tensorflow as tf

    if isinstance(num_classes, np.ndarray):
        return tf.gather(tf.constant(num_classes), tf.cast(label, tf.int32))
    return tf.one_hot(tf.cast(label, tf.int32), num_classes, dtype=tf.float32)


def _channels(case: SamplingCase) -> int:
    return int(case.load_image().shape[-1])  # a memory map: reads the header only
