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

Memory: blending runs per output slab (:func:`iter_blended_slabs`): only a window-thick float32
accumulator is held, and each slab is handed on as soon as no later window touches it. So
:func:`sliding_window_labels` needs, beyond the image, 1 byte per voxel (the label map) and
:func:`sliding_window_predict` the returned array (4·C bytes per voxel, 2·C with float16), instead
of the whole-volume float32 Σ w·p and Σ w of a naive blend (4·(C + 1) bytes per voxel) plus a copy.
:func:`batch_size_for_memory` sizes the windows per call to a memory budget.

The options (overlap, mirroring, windows per call, Gaussian σ) come as one
:class:`segpipe.inference.settings.InferenceSettings`, which validates them. Everything here is NumPy;
the network is any callable mapping a float32 batch (B, X, Y, Z, Cin) to probabilities (B, X, Y, Z, C),
so Keras, a SavedModel, ONNX Runtime and OpenVINO run through the same code (see :mod:`segpipe.inference.runtimes`).
"""
from __future__ import annotations

import itertools
import math
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from segpipe.errors import Received, SettingError, expected
from segpipe.inference.settings import MAX_OVERLAP, InferenceSettings, check_mirror_axes

PredictFn = Callable[[np.ndarray], np.ndarray]


def window_starts(size: int, window: int, overlap: float) -> list[int]:
    """Start indices of the windows along one axis of length ``size`` (nnU-Net's placement).

    The number of windows is the smallest that keeps neighbours at most ``window * (1 - overlap)``
    (at least 1 voxel) apart; they are then spread evenly from 0 to ``size - window``, so the last one ends flush with
    the volume. An axis no longer than the window has a single window at 0 (pad it first).

    Examples
    --------
    >>> window_starts(100, 32, 0.5)
    [0, 14, 27, 41, 54, 68]
    """
    _check_overlap(overlap)
    if window < 1:
        raise ValueError(expected("a window of at least 1 voxel", key="window", received=window))
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
        raise ValueError(expected("a 3-D shape and window", key="shape",
                                  received=Received(f"{tuple(shape)}, window={tuple(window)}")))
    if any(s < w for s, w in zip(shape, window)):
        raise ValueError(expected("every side of the volume at least the window (pad first)", key="shape",
                                  received=Received(f"{tuple(shape)}, window={tuple(window)}")))
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
        raise SettingError("sigma_scale", "a number > 0", sigma_scale)
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

    Examples
    --------
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
    settings: InferenceSettings = InferenceSettings(),
    progress: bool = False,
    dtype: Any = np.float32,
) -> np.ndarray:
    """Softmax probabilities (X, Y, Z, C) of a whole preprocessed image (X, Y, Z, Cin).

    Parameters
    ----------
    predict_fn
        maps a float32 batch (B, *window, Cin) to probabilities (B, *window, C).
    image
        channels-last preprocessed image (the network's input space).
    window
        window (training patch) size; each side must suit the network (divisible by
        ``2 ** (depth - 1)`` for the U-Net).
    settings
        ``overlap`` (fraction of a window shared with its neighbour along each axis),
        ``mirror_axes`` (test-time mirroring: every subset is predicted and averaged, ``()``
        switches it off), ``batch_size`` (windows per network call; a short last batch is
        zero-filled, so every call has one shape) and ``sigma_scale`` (Gaussian σ as a fraction
        of the window side). ``postprocess_largest_component`` is not used here (it acts on labels).
    progress
        show a tqdm progress bar over the windows.
    dtype
        dtype of the returned array. Blending is always float32 (per output slab, see
        :func:`iter_blended_slabs`); ``np.float16`` halves the one full-size array, at a
        relative rounding error of 2^-11 in the stored probabilities.

    Returns
    -------
    np.ndarray
        Probabilities on the grid of ``image``: the Gaussian-weighted average of every window (and
        mirror) that covers a voxel.

    Examples
    --------
    >>> ones = lambda x: np.ones(x.shape[:4] + (2,), np.float32) / 2
    >>> sliding_window_predict(ones, np.zeros((5, 4, 4, 1)), (4, 4, 4),
    ...                        settings=InferenceSettings(mirror_axes=())).shape
    (5, 4, 4, 2)
    """
    out: np.ndarray | None = None
    for rows, slab in iter_blended_slabs(predict_fn, image, window, settings=settings, progress=progress):
        if out is None:  # the class count is known once the network has run
            out = np.empty(image.shape[:3] + slab.shape[-1:], dtype=dtype)
        out[rows] = slab
    return out


def sliding_window_labels(
    predict_fn: PredictFn,
    image: np.ndarray,
    window: Sequence[int],
    *,
    settings: InferenceSettings = InferenceSettings(),
    progress: bool = False,
) -> np.ndarray:
    """The argmax (X, Y, Z) uint8 of :func:`sliding_window_predict`, without a full-size probability array.

    Each output slab is blended in float32 and reduced to labels as soon as no later window touches
    it, so beyond the image itself the peak memory is one window-thick slab of probabilities
    (window[0] × Y × Z × C float32) and the label map (1 byte per voxel). The labels equal
    ``np.argmax(sliding_window_predict(...), -1)`` exactly (ties go to the lower class).

    Parameters
    ----------
    predict_fn, image, window, settings, progress
        as for :func:`sliding_window_predict`.
    """
    labels = np.empty(np.shape(image)[:3], dtype=np.uint8)
    for rows, slab in iter_blended_slabs(predict_fn, image, window, settings=settings, progress=progress):
        if slab.shape[-1] > 256:
            raise ValueError(expected("at most 256 classes for a uint8 label map", key="classes",
                                      received=slab.shape[-1]))
        labels[rows] = np.argmax(slab, axis=-1)
    return labels


def iter_blended_slabs(
    predict_fn: PredictFn,
    image: np.ndarray,
    window: Sequence[int],
    *,
    settings: InferenceSettings = InferenceSettings(),
    progress: bool = False,
) -> Iterator[tuple[slice, np.ndarray]]:
    """The blended probabilities ``Σ w·p / Σ w`` of ``image``, slab by slab along axis 0.

    Windows are visited in order of their start along axis 0; once every window starting at some
    ``x`` has been added, the rows before the next start are final. Only a window-thick float32
    accumulator (window[0] × Y × Z × C, plus Σ w) is held, so the memory of blending does not grow
    with the volume's length along axis 0; callers keep, reduce or write each slab.

    Parameters
    ----------
    predict_fn, image, window, settings, progress
        as for :func:`sliding_window_predict`.

    Yields
    ------
    tuple[slice, np.ndarray]
        ``(rows, probabilities)``: a slice of axis 0 of ``image`` and the float32 probabilities
        (len(rows), Y, Z, C) there, in order, covering the image once.
    """
    image = np.asarray(image)
    if image.ndim != 4:
        raise ValueError(expected("a channels-last image (X, Y, Z, C)", key="image.shape", received=image.shape))
    window = tuple(int(w) for w in window)
    if len(window) != 3 or min(window) < 1:
        raise ValueError(expected("a window of 3 positive sizes", key="window", received=window))
    if not isinstance(settings, InferenceSettings):
        raise TypeError(expected("an InferenceSettings", key="settings", received=Received(type(settings).__name__)))
    flips = mirror_combinations(settings.mirror_axes)
    padded, crop = pad_to_window(image, window)
    slices = window_slices(padded.shape[:3], window, settings.overlap)  # ordered by start along axis 0
    weights = gaussian_importance_map(window, settings.sigma_scale)
    batch_size = int(min(settings.batch_size, len(slices)))
    depth = window[0]

    acc: np.ndarray | None = None  # Σ w·p over rows [base, base + depth), allocated once C is known
    norm = np.zeros((depth, *padded.shape[1:3]), dtype=np.float32)  # Σ w over the same rows
    base = 0
    batch = np.empty((batch_size, *window, padded.shape[-1]), dtype=np.float32)

    def finish(upto: int) -> Iterator[tuple[slice, np.ndarray]]:
        """Yield rows [base, upto) (they are final) and shift the accumulator to start at ``upto``."""
        n = upto - base
        lo, hi = max(base, crop[0].start), min(upto, crop[0].stop)  # the part outside the padding
        if hi > lo:
            rows = slice(lo - base, hi - base)
            yield (slice(lo - crop[0].start, hi - crop[0].start),
                   acc[rows, crop[1], crop[2]] / norm[rows, crop[1], crop[2], None])
        acc[: depth - n] = acc[n:]
        acc[depth - n :] = 0
        norm[: depth - n] = norm[n:]
        norm[depth - n :] = 0

    bar = _progress(len(slices), progress)
    for batch_slices in _chunks(slices, batch_size):
        for i, s in enumerate(batch_slices):
            batch[i] = padded[s]
        # a short last batch keeps its shape (zero-filled): a traced network (Keras, SavedModel)
        # would trace again for a new shape, seconds for a deep U-Net, more than the wasted windows cost
        batch[len(batch_slices):] = 0
        probabilities = _predict_mirrored(predict_fn, batch, flips)
        if acc is None:
            acc = np.zeros((depth, *padded.shape[1:3], probabilities.shape[-1]), dtype=np.float32)
            weighted = np.empty((*window, probabilities.shape[-1]), dtype=np.float32)
        for s, p in zip(batch_slices, probabilities):
            if s[0].start > base:
                yield from finish(s[0].start)
                base = s[0].start
            rows = slice(s[0].start - base, s[0].stop - base)
            np.multiply(p, weights[..., None], out=weighted)
            acc[rows, s[1], s[2]] += weighted
            norm[rows, s[1], s[2]] += weights
        if bar is not None:
            bar.update(len(batch_slices))
    if bar is not None:
        bar.close()
    yield from finish(base + depth)


def batch_size_for_memory(
    window: Sequence[int],
    *,
    in_channels: int,
    num_classes: int,
    budget_mb: float,
    activation_bytes_per_voxel: float = 0.0,
    max_batch_size: int = 64,
) -> int:
    """The largest number of windows per network call whose working memory fits ``budget_mb``.

    Per window it counts the float32 input, the output and its mirrored and weighted copies
    (``4 · (Cin + 3 · C)`` bytes per voxel) plus ``activation_bytes_per_voxel`` (the network's
    intermediate feature maps per input voxel; :func:`segpipe.export.bundle.activation_bytes_per_voxel`
    estimates it for a Keras model). At least 1.

    Examples
    --------
    >>> batch_size_for_memory((64, 64, 64), in_channels=1, num_classes=3, budget_mb=256,
    ...                       activation_bytes_per_voxel=200)
    4
    """
    if budget_mb <= 0:
        raise ValueError(expected("a memory budget > 0", key="budget_mb", received=budget_mb))
    voxels = math.prod(int(w) for w in window)
    per_window = voxels * (4.0 * (in_channels + 3 * num_classes) + float(activation_bytes_per_voxel))
    return int(max(1, min(max_batch_size, budget_mb * 2**20 // per_window)))


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
            raise ValueError(expected(f"the network to return probabilities of shape {batch.shape[:4]} + (classes,)",
                                      key="output.shape", received=p.shape))
        p = np.flip(p, batch_axes) if axes else p
        if out is None:
            out = p if len(flips) == 1 else p.copy()  # a copy: the runtime may own p's buffer
        else:
            out += p
    if len(flips) > 1:
        out /= len(flips)
    return out


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
