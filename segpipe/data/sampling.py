"""Patch sampling from preprocessed (memory-mapped) volumes, with foreground oversampling.

A patch is placed in one of two ways (nnU-Net's rule):

* foreground: centred on a random voxel of a randomly chosen class present in the case, using
  the per-class voxel locations precomputed once by :func:`class_locations` and stored in the
  cache, so sampling never scans a volume;
* random: a uniformly random position (volumes smaller than the patch are padded).

With a ``batch_size``, the last ``batch_size - round(batch_size * (1 - fraction))`` samples of
every batch are foreground samples; without it, each sample is one with probability ``fraction``.

Every sample is a pure function of ``(seed, index)``: :class:`PatchSampler` seeds a fresh
``np.random.Generator`` per index, so a parallel ``tf.data`` map yields the same patches in any
execution order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, Sequence

import numpy as np

from segpipe.data.spatial import extract_patch, warp
from segpipe.errors import expected

if TYPE_CHECKING:
    from segpipe.data.augment import Augmenter


class SamplingCase(Protocol):
    """What the sampler needs from a case; :class:`segpipe.data.cache.CachedCase` provides it."""

    @property
    def locations(self) -> dict[int, np.ndarray]: ...

    def load_image(self) -> np.ndarray: ...

    def load_label(self) -> np.ndarray: ...


def open_cases(cases: Sequence[SamplingCase]) -> list[SamplingCase]:
    """``cases`` as a list, each one's image, label and locations opened in the calling thread.

    A :class:`segpipe.data.cache.CachedCase` keeps what it opened, so the data loader's threads
    read pages only and never parse a file header (see there why that matters)."""
    cases = list(cases)
    for case in cases:
        case.load_image(), case.load_label(), case.locations
    return cases


@dataclass
class ArrayCase:
    """An in-memory case for the sampler: image (X, Y, Z, C), label (X, Y, Z), class locations."""

    image: np.ndarray
    label: np.ndarray
    locations: dict[int, np.ndarray]

    @classmethod
    def from_arrays(cls, image: np.ndarray, label: np.ndarray, *, seed: int = 0) -> "ArrayCase":
        return cls(image, label, class_locations(label, seed=seed))

    def load_image(self) -> np.ndarray:
        return self.image

    def load_label(self) -> np.ndarray:
        return self.label


@dataclass(frozen=True)
class PatchInfo:
    """Where a patch came from: case index, lower corner, and the class it was centred on (or None)."""

    case_index: int
    lower: tuple[int, int, int]
    foreground_class: int | None


def class_locations(
    label: np.ndarray, *, max_per_class: int = 10_000, min_fraction: float = 0.01, seed: int = 0
) -> dict[int, np.ndarray]:
    """Voxel indices (N, 3) int32 of each foreground class present, subsampled for storage.

    Each class keeps ``max(max_per_class, ceil(min_fraction * count))`` of its voxels (all, if
    fewer), drawn without replacement with ``seed`` (nnU-Net keeps 10,000 or 1%).
    """
    rng = np.random.default_rng(seed)
    flat = label.reshape(-1)
    locations = {}
    for value in np.unique(flat):
        if value == 0:
            continue
        index = np.flatnonzero(flat == value)  # flat indices: 8 bytes per voxel, not 24 as argwhere
        keep = min(index.size, max(max_per_class, math.ceil(min_fraction * index.size)))
        if keep < index.size:
            index = np.sort(rng.choice(index, size=keep, replace=False))
        locations[int(value)] = np.stack(np.unravel_index(index, label.shape), axis=1).astype(np.int32)
    return locations


def pack_locations(locations: dict[int, np.ndarray]) -> np.ndarray:
    """One (N, 4) int32 array ``[class, x, y, z]`` for storage as a single ``.npy``."""
    parts = [np.concatenate([np.full((len(v), 1), k, np.int32), v.astype(np.int32)], axis=1) for k, v in sorted(locations.items())]
    return np.concatenate(parts) if parts else np.zeros((0, 4), np.int32)


def unpack_locations(packed: np.ndarray) -> dict[int, np.ndarray]:
    """Inverse of :func:`pack_locations`."""
    return {int(k): packed[packed[:, 0] == k, 1:] for k in np.unique(packed[:, 0])}


def is_foreground_slot(slot: int, batch_size: int, fraction: float) -> bool:
    """nnU-Net's rule: slot ``j`` of a batch is forced to foreground if ``j >= round(bs * (1 - fraction))``."""
    return slot >= round(batch_size * (1.0 - fraction))


def choose_patch(
    shape: Sequence[int],
    patch_size: Sequence[int],
    rng: np.random.Generator,
    *,
    locations: dict[int, np.ndarray] | None = None,
    force_foreground: bool = False,
    ignore_label: int | None = None,
) -> tuple[np.ndarray, int | None]:
    """Lower corner of a patch in a volume of ``shape``, and the class it is centred on (or None).

    The corner ranges over ``[min(0, n - p), max(0, n - p)]`` per axis: inside the volume when it is
    larger than the patch, with padding around it when smaller. A foreground patch is centred on a
    random stored voxel of a random present class, then shifted into that range (the voxel stays
    inside the patch). With no foreground in the case, the patch is random. The ``ignore_label``
    (unannotated voxels, not a class) is never a centre, whatever the locations hold.
    """
    shape, size = np.asarray(shape[:3]), np.asarray(patch_size)
    low, high = np.minimum(0, shape - size), np.maximum(0, shape - size)
    classes = sorted(k for k, v in (locations or {}).items() if len(v) and k != ignore_label)
    if force_foreground and classes:
        cls = classes[int(rng.integers(len(classes)))]
        voxels = locations[cls]
        voxel = voxels[int(rng.integers(len(voxels)))]
        return np.clip(voxel - size // 2, low, high), cls
    return np.array([int(rng.integers(lo, hi + 1)) for lo, hi in zip(low, high)]), None


class PatchSampler:
    """Random training patches from a list of cases, deterministic per ``(seed, index)``.

    Parameters
    ----------
    cases
        cached cases (or :class:`ArrayCase`); images are read through memory maps.
    patch_size
        patch shape (X, Y, Z) in voxels.
    foreground_fraction
        share of foreground-centred patches. Defaults to 1/3.
    batch_size
        apply the fraction per batch with nnU-Net's slot rule (index % batch_size is
        the slot); ``None`` draws each sample independently.
    augmenter
        optional :class:`segpipe.data.augment.Augmenter`; its spatial transform is
        evaluated on the whole volume around the patch, then its patch transforms run.
    seed
        the run's seed.
    cycle_cases
        take case ``index % len(cases)`` instead of a random case (fixed validation
        patches: with ``augmenter=None`` index ``i`` gives the same patch every epoch).
    ignore_label
        the value of unannotated voxels; no patch is centred on it.
    """

    def __init__(
        self,
        cases: Sequence[SamplingCase],
        patch_size: Sequence[int],
        *,
        foreground_fraction: float = 1 / 3,
        batch_size: int | None = None,
        augmenter: "Augmenter | None" = None,
        seed: int = 0,
        cycle_cases: bool = False,
        ignore_label: int | None = None,
    ):
        if not cases:
            raise ValueError(expected("at least one case to sample from", key="cases", received=list(cases)))
        patch_size = tuple(int(p) for p in patch_size)
        if len(patch_size) != 3 or min(patch_size) < 1:
            raise ValueError(expected("3 positive integers", key="patch_size", received=patch_size))
        if not 0.0 <= foreground_fraction <= 1.0:
            raise ValueError(expected("a value in [0, 1]", key="foreground_fraction", received=foreground_fraction))
        self.cases = open_cases(cases)
        self.patch_size = patch_size
        self.foreground_fraction = foreground_fraction
        self.batch_size = batch_size
        self.augmenter = augmenter
        self.seed = int(seed)
        self.cycle_cases = cycle_cases
        self.ignore_label = ignore_label

    def __call__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Image (X, Y, Z, C) float32 and label (X, Y, Z) uint8 of sample ``index``."""
        image, label, _ = self.sample(index)
        return image, label

    def sample(self, index: int) -> tuple[np.ndarray, np.ndarray, PatchInfo]:
        """Sample ``index`` with its :class:`PatchInfo`."""
        index = int(index)
        rng = np.random.default_rng([self.seed, index])
        case_index = index % len(self.cases) if self.cycle_cases else int(rng.integers(len(self.cases)))
        case = self.cases[case_index]
        if self.batch_size:
            force = is_foreground_slot(index % self.batch_size, self.batch_size, self.foreground_fraction)
        else:
            force = bool(rng.random() < self.foreground_fraction)
        image, label = case.load_image(), case.load_label()
        lower, cls = choose_patch(label.shape, self.patch_size, rng, locations=case.locations, force_foreground=force,
                                  ignore_label=self.ignore_label)
        coords = self.augmenter.spatial_coords(self.patch_size, rng) if self.augmenter is not None else None
        if coords is None:
            image = extract_patch(image, lower, self.patch_size)
            label = extract_patch(label, lower, self.patch_size)
        else:
            centre = lower + (np.asarray(self.patch_size) - 1) / 2
            image, label = warp(image, label, coords + centre.reshape(3, 1, 1, 1).astype(np.float32),
                                order=self.augmenter.settings.order)
        if self.augmenter is not None:
            image, label = self.augmenter.augment_patch(image, label, rng)
        info = PatchInfo(case_index, tuple(int(v) for v in lower), cls)
        return np.asarray(image, dtype=np.float32), np.asarray(label, dtype=np.uint8), info
