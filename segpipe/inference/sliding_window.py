"""Sliding-window prediction of a whole (preprocessed) volume with a patch-sized network.

The volume is covered by windows of the training patch size that overlap by ``overlap`` of a
window (nnU-Net's placement: the first window at 0, the last flush with the end, the rest evenly
in between). Each window's softmax output is weighted by a Gaussian importance map (σ = 1/8 of the
window per axis; the centre of a window sees more context than its border, so its predictions count
more), windows are predicted in batches, and optionally every batch is also predicted mirrored along
each combination of ``mirror_axes`` (test-time augmentation; 8 passes for all three axes), the
mirrored outputs flipped back and averaged. The blended result is ``Σ w·p / Σ w``, so it stays a
probability distribution per voxel. A volume smaller than the window along an axis is padded with
zeros (the mean of a z-scored image) and the padding cropped off again.

Everything here is NumPy; the network is any callable mapping a float32 batch
(B, X, Y, Z, Cin) to probabilities (B, X, Y, Z, C), so a Keras model, a TensorFlow SavedModel and an
ONNX session run through the same code (see :mod:`segpipe.inference.segment`).
"""
from __future__ import annotations

import itertools
import math
from typing import Callable, Iterator, Sequence

import numpy as np

from segpipe.errors import SettingError
from segpipe.inference.settings import MAX_OVERLAP, check_mirror_axes

PredictFn = Callable[[np.ndarray], np.ndarray]


def window_starts(size: int, window: int, overlap: float) -> list[int]:
    """Start indices of the windows along one axis of length ``size`` (nnU-Net's placement).

    The number of windows is the smallest that keeps neighbours at most ``window * (1 - overlap)``
    (at least 1 voxel) apart; they are then spread evenly from 0 to ``size - window``, so the last one ends flush with
    the volume. An axis no longer than the window has a single window at 0 (pad it first).

    Example:
        >>> window_starts(100, 32, 0.5)
        [0, 14, 27, 41, 54, 68]
    """
    _check_overlap(overlap)
    if window < 1:
        raise ValueError(f"Expected a window of at least 1 voxel. Received: window={window}")
    if size <= window:
        return [0]
    step = max(1.0, window * (1.0 - overlap))  # an overlap near 1 would repeat windows after rounding
    num = int(math.ceil((size - window) / step)) + 1
    actual = (size - window) / (num - 1)
    return [int(round(actual * i)) for i in range(num)]


def window_slices(
    shape: Sequence[int], window: Sequence[int], overlap: float = 0.5
) -> list[tuple[slice, slice, slice]]:
    """Every window of a volume of spatial ``shape`` (each side at least the window), as index slices."""
    if len(shape) != 3 or len(window) != 3:
        raise ValueError(f"Expected a 3-D shape and window. Received: shape={tuple(shape)}, window={tuple(window)}")
    if any(s < w for s, w in zip(shape, window)):
        raise ValueError(
            f"Expected every side of the volume to be at least the window (pad first). "
            f"Received: shape={tuple(shape)}, window={tuple(window)}"
        )
    starts = [window_starts(s, w, overlap) for s, w in zip(shape, window)]
    return [
        tuple(slice(lo, lo + w) for lo, w in zip(corner, window))
        for corner in itertools.product(*starts)
    ]


def gaussian_importance_map(window: Sequence[int], sigma_scale: float = 0.125) -> np.ndarray:
    """Gaussian weights (X, Y, Z) float32 with maximum 1, σ = ``sigma_scale`` × window per axis.

    The Gaussian is centred between the middle voxels (symmetric for even and odd sizes).
    Values that underflow to zero are replaced by the smallest positive value, so every voxel of a
    window keeps a positive weight and no voxel of the volume ends up with ``Σ w = 0``.
    """
    if sigma_scale <= 0:
        raise ValueError(f"Expected sigma_scale > 0. Received: sigma_scale={sigma_scale}")
    axes = []
    for w in window:
        sigma = max(w * sigma_scale, 1e-6)
        x = np.arange(w, dtype=np.float64) - (w - 1) / 2.0
        axes.append(np.exp(-0.5 * (x / sigma) ** 2))
    weights = (axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]).astype(np.float32)
    weights /= weights.max()
    positive = weights[weights > 0]
    weights[weights == 0] = positive.min()
    return weights


def mirror_combinations(mirror_axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every subset of ``mirror_axes`` (the empty one first): the flips test-time mirroring averages.

    Example:
        >>> mirror_combinations([0, 2])
        [(), (0,), (2,), (0, 2)]
    """
    axes = check_mirror_axes(mirror_axes)
    return [combo for r in range(len(axes) + 1) for combo in itertools.combinations(axes, r)]


def pad_to_window(image: np.ndarray, window: Sequence[int]) -> tuple[np.ndarray, tuple[slice, slice, slice]]:
    """Zero-pad the spatial axes of ``image`` (X, Y, Z, C) to at least ``window``, centred.

    Returns the padded image and the slices that cut the original back out of it.
    """
    pads = []
    for size, w in zip(image.shape[:3], window):
        missing = max(0, int(w) - size)
        pads.append((missing // 2, missing - missing // 2))
    crop = tuple(slice(lo, lo + size) for (lo, _), size in zip(pads, image.shape[:3]))
    if not any(lo or hi for lo, hi in pads):
        return image, crop
    return np.pad(image, pads + [(0, 0)] * (image.ndim - 3)), crop


def sliding_window_predict(
    predict_fn: PredictFn,
    image: np.ndarray,
    window: Sequence[int],
    *,
    overlap: float = 0.5,
    mirror_axes: Sequence[int] = (0, 1, 2),
    batch_size: int = 2,
    sigma_scale: float = 0.125,
    progress: bool = False,
) -> np.ndarray:
    """Softmax probabilities (X, Y, Z, C) float32 of a whole preprocessed image (X, Y, Z, Cin).

    Args:
        predict_fn: maps a float32 batch (B, *window, Cin) to probabilities (B, *window, C).
        image: channels-last preprocessed image (the network's input space).
        window: window (training patch) size; each side must suit the network (divisible by
            ``2 ** (depth - 1)`` for the U-Net).
        overlap: fraction of a window shared with its neighbour along each axis, in [0, 0.95].
            Defaults to 0.5.
        mirror_axes: spatial axes (0, 1, 2) to mirror for test-time augmentation; every subset is
            predicted and averaged (``2 ** len(mirror_axes)`` passes). ``()`` switches it off.
        batch_size: windows per network call (a short last batch is zero-filled, so every call has
            one shape).
        sigma_scale: Gaussian σ as a fraction of the window side. Defaults to 1/8.
        progress: show a tqdm progress bar over the windows.

    Returns:
        Probabilities on the grid of ``image``: the Gaussian-weighted average of every window (and
        mirror) that covers a voxel.
    """
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 4:
        raise ValueError(f"Expected a channels-last image (X, Y, Z, C). Received: shape {image.shape}")
    window = tuple(int(w) for w in window)
    if len(window) != 3 or min(window) < 1:
        raise ValueError(f"Expected a window of 3 positive sizes. Received: window={window}")
    if batch_size < 1:
        raise ValueError(f"Expected batch_size >= 1. Received: batch_size={batch_size}")
    flips = mirror_combinations(mirror_axes)
    padded, crop = pad_to_window(image, window)
    slices = window_slices(padded.shape[:3], window, overlap)
    weights = gaussian_importance_map(window, sigma_scale)
    batch_size = min(batch_size, len(slices))

    total: np.ndarray | None = None  # Σ w·p, allocated once the class count is known
    norm = np.zeros(padded.shape[:3], dtype=np.float32)  # Σ w
    bar = _progress(len(slices), progress)
    for batch_slices in _chunks(slices, batch_size):
        batch = np.stack([padded[s] for s in batch_slices])
        if len(batch) < batch_size:
            # a short last batch would make a traced network (Keras, SavedModel) trace again: seconds
            # for a deep U-Net, more than the wasted windows cost
            batch = np.concatenate([batch, np.zeros((batch_size - len(batch), *batch.shape[1:]), batch.dtype)])
        probabilities = _predict_mirrored(predict_fn, batch, flips)[: len(batch_slices)]
        if total is None:
            total = np.zeros(padded.shape[:3] + probabilities.shape[-1:], dtype=np.float32)
        for s, p in zip(batch_slices, probabilities):
            total[s] += p * weights[..., None]
            norm[s] += weights
        if bar is not None:
            bar.update(len(batch_slices))
    if bar is not None:
        bar.close()
    total /= norm[..., None]
    return np.ascontiguousarray(total[crop])


def keras_predict_fn(model) -> PredictFn:
    """A ``predict_fn`` of a Keras model: ``predict_on_batch`` (one traced graph, inference mode).

    A deep-supervision model returns several outputs; the first, full-resolution one is used.
    """

    def predict(x: np.ndarray) -> np.ndarray:
        out = model.predict_on_batch(x)
        return np.asarray(out[0] if isinstance(out, (list, tuple)) else out)

    return predict


# ----------------------------------------------------------------------------------------------


def _predict_mirrored(predict_fn: PredictFn, batch: np.ndarray, flips: list[tuple[int, ...]]) -> np.ndarray:
    """Average of ``predict_fn`` over mirrored copies of ``batch``, each flipped back."""
    out = None
    for axes in flips:
        batch_axes = tuple(a + 1 for a in axes)  # axis 0 of the batch is the window index
        x = np.ascontiguousarray(np.flip(batch, batch_axes)) if axes else batch
        p = np.asarray(predict_fn(x), dtype=np.float32)
        if p.ndim != 5 or p.shape[:4] != batch.shape[:4]:
            raise ValueError(
                f"Expected the network to return probabilities of shape {batch.shape[:4]} + (classes,). "
                f"Received: shape {p.shape}"
            )
        p = np.flip(p, batch_axes) if axes else p
        out = p.copy() if out is None else out + p
    return out / len(flips)


def _chunks(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="Windows", unit="win", leave=False)


def _check_overlap(overlap: float) -> None:
    if not 0.0 <= overlap <= MAX_OVERLAP:  # the rule of InferenceSettings, for direct callers
        raise SettingError("overlap", f"a number in [0, {MAX_OVERLAP}]", overlap)
