"""tf.data input pipeline: random training patches and whole validation cases.

Every training sample is a pure function of ``(seed, sample index)``: the sampler draws its random
numbers from ``np.random.default_rng([seed, index])``. A resumed run therefore continues with the
exact samples it would have seen, by starting the index at ``epoch * steps * batch``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from segpipe.data.layouts import Case, Dataset
from segpipe.io import read_nifti

MAX_FOREGROUND_POINTS = 20_000  # per class and case; enough to centre patches, cheap to keep


@dataclass
class LoadedCase:
    """A case in memory: z-scored image (X, Y, Z, C) float32, label (X, Y, Z) uint8, and its affine."""

    case_id: str
    image: np.ndarray
    label: np.ndarray
    foreground: dict[int, np.ndarray]  # class value -> (N, 3) voxel coordinates (subsampled)
    affine: np.ndarray


def zscore(image: np.ndarray) -> np.ndarray:
    """Per-channel z-score normalisation of a channels-last image."""
    axes = tuple(range(image.ndim - 1))
    mean = image.mean(axis=axes, keepdims=True)
    std = image.std(axis=axes, keepdims=True)
    return ((image - mean) / np.maximum(std, 1e-8)).astype(np.float32)


def load_case(case: Case, num_classes: int, rng_seed: int = 0) -> LoadedCase:
    """Read, normalise and index one case for patch sampling."""
    volumes = [read_nifti(path, dtype=np.float32) for path in case.image_paths]
    image = np.stack([v.array for v in volumes], axis=-1)
    label = read_nifti(case.label_path).array
    if label.shape != image.shape[:3]:
        raise ValueError(
            f"Expected label shape to equal image shape for case {case.case_id}. "
            f"Received: image {image.shape[:3]} ({case.image_paths[0]}), label {label.shape} ({case.label_path})"
        )
    label = label.astype(np.uint8)
    rng = np.random.default_rng(rng_seed)
    foreground = {}
    for c in range(1, num_classes):
        points = np.argwhere(label == c)
        if len(points) > MAX_FOREGROUND_POINTS:
            points = points[rng.choice(len(points), MAX_FOREGROUND_POINTS, replace=False)]
        if len(points):
            foreground[c] = points
    return LoadedCase(case.case_id, zscore(image), label, foreground, volumes[0].affine)


def load_cases(dataset: Dataset, case_ids: list[str]) -> list[LoadedCase]:
    from tqdm import tqdm

    return [load_case(dataset.case(cid), dataset.num_classes) for cid in tqdm(case_ids, desc="Loading cases", unit="case")]


def pad_to(image: np.ndarray, label: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Pad image (with 0, the z-scored mean) and label (with background) at the end to at least ``shape``."""
    pad = [(0, max(0, s - n)) for s, n in zip(shape, label.shape)]
    if not any(p for _, p in pad):
        return image, label
    return np.pad(image, pad + [(0, 0)]), np.pad(label, pad)


class PatchSampler:
    """Draws patches; a fixed share of each batch is centred on foreground (nnU-Net's rule).

    Sample ``j`` of a batch (``j = index % batch_size``) is forced to contain foreground when
    ``j >= round(batch_size * (1 - foreground_fraction))``: it is centred on a random voxel of a
    randomly chosen class present in the case. The other samples are placed uniformly.
    """

    def __init__(self, cases: list[LoadedCase], patch_size, batch_size: int, foreground_fraction: float, seed: int):
        if not cases:
            raise ValueError("Expected at least one training case. Received: an empty list")
        self.cases = cases
        self.patch_size = tuple(int(s) for s in patch_size)
        self.batch_size = batch_size
        self.first_forced = round(batch_size * (1.0 - foreground_fraction))
        self.seed = seed

    def sample(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, int(index)])
        case = self.cases[rng.integers(len(self.cases))]
        image, label = pad_to(case.image, case.label, self.patch_size)
        limits = np.asarray(label.shape) - self.patch_size  # valid start corners: 0..limit
        if int(index) % self.batch_size >= self.first_forced and case.foreground:
            classes = sorted(case.foreground)
            points = case.foreground[classes[rng.integers(len(classes))]]
            centre = points[rng.integers(len(points))]
            start = np.clip(centre - np.asarray(self.patch_size) // 2, 0, limits)
        else:
            start = np.array([rng.integers(lim + 1) for lim in limits])
        window = tuple(slice(s, s + p) for s, p in zip(start, self.patch_size))
        return image[window], label[window]


def train_dataset(sampler: PatchSampler, num_classes: int, *, start_index: int = 0, num_workers: int = 2):
    """Infinite batches of (image (B, X, Y, Z, C) float32, one-hot (B, X, Y, Z, num_classes) float32)."""
    import tensorflow as tf

    channels = sampler.cases[0].image.shape[-1]

    def _sample(index):
        image, label = sampler.sample(int(index))
        return image, label

    def _map(index):
        image, label = tf.numpy_function(_sample, [index], [tf.float32, tf.uint8], stateful=False)
        image.set_shape((*sampler.patch_size, channels))
        label.set_shape(sampler.patch_size)
        return image, tf.one_hot(tf.cast(label, tf.int32), num_classes, dtype=tf.float32)

    ds = tf.data.Dataset.range(start_index, np.iinfo(np.int64).max)
    ds = ds.map(_map, num_parallel_calls=num_workers, deterministic=True)
    return ds.batch(sampler.batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def validation_dataset(cases: list[LoadedCase], num_classes: int, divisor: int):
    """Whole cases, one per batch, padded at the end so each side is divisible by ``divisor``."""
    import tensorflow as tf

    channels = cases[0].image.shape[-1]

    def _generate():
        for case in cases:
            shape = tuple(-(-n // divisor) * divisor for n in case.label.shape)
            image, label = pad_to(case.image, case.label, shape)
            yield image[None], np.eye(num_classes, dtype=np.float32)[label][None]

    signature = (
        tf.TensorSpec((1, None, None, None, channels), tf.float32),
        tf.TensorSpec((1, None, None, None, num_classes), tf.float32),
    )
    ds = tf.data.Dataset.from_generator(_generate, output_signature=signature)
    return ds.apply(tf.data.experimental.assert_cardinality(len(cases))).prefetch(2)
