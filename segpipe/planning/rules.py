"""The planning rules: pure functions from fingerprint numbers to one choice each, with its reason.

Every rule returns plain numbers (or a :class:`Choice` holding the value and a one-line reason);
none reads files, imports TensorFlow or looks at the machine, so each can be checked by hand.
The sources of the rules (mostly nnU-Net v2's ``ExperimentPlanner``) are listed in docs/planning.md.
Here: the target spacing, the batch size, the data rules (normalisation, foreground sampling,
mirroring, loss) and the time rules (inference, schedule); the network's topology, cost model and
patch fitting are :mod:`segpipe.planning.network`.

Axis order is RAS (x, y, z), the order preprocessing works in; sizes are voxels, spacings mm.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from segpipe.errors import Received, expected
from segpipe.planning.network import shape_text

ANISOTROPY_THRESHOLD = 3.0  # nnU-Net's ANISO_THRESHOLD


@dataclass(frozen=True)
class Choice:
    """One planned value and the one-line reason for it."""

    value: Any
    reason: str


# ----------------------------------------------------------------------------------- spacing


def plan_target_spacing(
    spacings_mm: np.ndarray, shapes: np.ndarray, *, anisotropy_threshold: float = ANISOTROPY_THRESHOLD
) -> Choice:
    """The median spacing; the coarse axis of strongly anisotropic data takes its 10th percentile.

    nnU-Net's rule: if the coarsest median spacing is more than ``anisotropy_threshold`` times every
    other median spacing *and* that axis has fewer than 1/threshold of the voxels of the others
    (median shapes), the coarse axis takes the 10th percentile of its spacings (but never finer
    than the other axes), so thick-slice cases are not resampled to many invented slices.

    Parameters
    ----------
    spacings_mm : (N, 3) array, each case's spacing.
    shapes : (N, 3) array, each case's shape (after cropping to the foreground/non-zero box).

    Examples
    --------
    >>> plan_target_spacing(np.array([[0.8, 0.8, 3.0], [0.8, 0.8, 5.0], [0.8, 0.8, 5.0]]),
    ...                     np.array([[512, 512, 60]] * 3)).value
    [0.8, 0.8, 3.4]
    """
    spacings = np.asarray(spacings_mm, dtype=np.float64).reshape(-1, 3)
    shapes = np.asarray(shapes, dtype=np.float64).reshape(-1, 3)
    if spacings.shape != shapes.shape or len(spacings) == 0:
        raise ValueError(expected("one spacing and one shape per case", key="spacings_mm, shapes",
                                  received=Received(f"{len(spacings)} spacings, {len(shapes)} shapes")))
    target = np.median(spacings, axis=0)
    median_shape = np.median(shapes, axis=0)
    worst = int(np.argmax(target))
    others = [a for a in range(3) if a != worst]
    aniso_spacing = target[worst] > anisotropy_threshold * max(target[others])
    aniso_voxels = median_shape[worst] * anisotropy_threshold < min(median_shape[others])
    axis = "xyz"[worst]
    if aniso_spacing and aniso_voxels:
        p10 = float(np.percentile(spacings[:, worst], 10))
        value = max(p10, float(max(target[others])) + 1e-5) if p10 < max(target[others]) else p10
        target[worst] = value
        reason = (f"median spacing, but {axis} is {target[worst] / max(target[others]):.1f}× coarser with few slices: "
                  f"its 10th percentile {value:.3g} mm instead of the median (nnU-Net's anisotropy rule)")
    else:
        reason = "median spacing of the cases"
    return Choice([round(float(s), 6) for s in target], f"{shape_text(target, 3)} mm: {reason}")


def shape_at_spacing(shapes: np.ndarray, spacings_mm: np.ndarray, target_mm: Sequence[float]) -> list[float]:
    """Median of the cases' shapes after resampling to ``target_mm``."""
    shapes = np.asarray(shapes, dtype=np.float64).reshape(-1, 3)
    spacings = np.asarray(spacings_mm, dtype=np.float64).reshape(-1, 3)
    return [float(v) for v in np.median(np.round(shapes * spacings / np.asarray(target_mm)), axis=0)]


# ----------------------------------------------------------------------------------- batch


def plan_batch_size(
    memory_for_batch: Any,
    budget_bytes: float,
    *,
    patch_voxels: int,
    dataset_voxels: float,
    min_batch: int = 2,
    max_batch: int | None = None,
    max_dataset_fraction: float = 0.05,
    max_batch_reason: str = "",
) -> Choice:
    """The largest batch whose memory fits, at least ``min_batch``, at most 5 % of the dataset's voxels.

    ``memory_for_batch(b)`` is the estimated training memory of batch ``b`` (bytes). nnU-Net caps
    the batch so one step sees at most 5 % of the dataset (an over-fitting precaution) and never
    goes below 2.
    """
    batch = min_batch
    while memory_for_batch(batch + 1) <= budget_bytes and batch < 4096:
        batch += 1
    if batch == min_batch:
        fits = memory_for_batch(min_batch) <= budget_bytes
        reason = (f"{min_batch}: the minimum (nnU-Net's); a larger batch would exceed the memory budget" if fits
                  else f"{min_batch}: the minimum (nnU-Net's), although its estimate exceeds the memory budget")
    else:
        reason = f"{batch}: the largest batch whose estimated memory fits the budget"
    cap = max(min_batch, int(round(dataset_voxels * max_dataset_fraction / patch_voxels)))
    if batch > cap:
        batch, reason = cap, f"{cap}: one batch covers at most {max_dataset_fraction:.0%} of the dataset's voxels"
    if max_batch is not None and batch > max(min_batch, max_batch):
        batch = max(min_batch, max_batch)
        reason = f"{batch}: {max_batch_reason or 'the hardware cap'} (memory would allow more)"
    return Choice(batch, reason)


# ----------------------------------------------------------------------------------- data


def plan_normalization(channel_names: Sequence[str]) -> Choice:
    """Per channel: ``ct`` for a channel named CT (clip to the dataset's foreground 0.5/99.5 percentiles,
    z-score with the dataset's foreground mean and std), else per-case ``zscore`` (nnU-Net's mapping)."""
    names = list(channel_names) or ["image"]
    schemes = ["ct" if n.strip().upper() == "CT" else "zscore" for n in names]
    parts = [f"{n}: {s}" for n, s in zip(names, schemes)]
    why = "CT is quantitative (HU): clip + dataset statistics; other modalities per-case z-score"
    value: str | list[str] = schemes[0] if len(set(schemes)) == 1 and len(schemes) == 1 else schemes
    return Choice(value, f"{', '.join(parts)} ({why})")


def plan_foreground_fraction(classes: dict[str, dict[str, Any]]) -> Choice:
    """A third of each batch centred on foreground (nnU-Net's ``oversample_foreground_percent``)."""
    fg = [c["voxel_fraction"] for k, c in classes.items() if int(k) > 0]
    smallest = min(fg) if fg else 0.0
    return Choice(0.33, f"0.33 of the patches centred on foreground (nnU-Net's default; smallest class "
                        f"{smallest:.2%} of the voxels)")


MIRROR_MIN_GAP = 0.15  # classes whose centroids differ by this fraction of the foreground extent ...
MIRROR_MIN_AGREEMENT = 0.9  # ... in the same direction in this share of the cases have a fixed order


def plan_mirror_axes(cases: dict[str, dict[str, Any]], class_names: dict[str, str] | None = None) -> Choice:
    """The axes to mirror along (training augmentation and test-time mirroring): those along which
    no two foreground classes lie in a fixed order.

    *segpipe* rule, not nnU-Net's (which mirrors every axis): mirroring along an axis where class A
    always lies before class B (anterior and posterior hippocampus along y) shows the network
    layouts that never occur, which it then has to unlearn — on MSD hippocampus, x-only mirroring
    scored 2 Dice points above mirroring all axes (docs/hippocampus.md). For every pair of classes
    present in a case, the difference of their centroids along an axis, as a fraction of the
    foreground's bounding box (``class_positions`` of the fingerprint), is taken per case; the order
    is fixed when the median difference is at least ``MIRROR_MIN_GAP`` and at least
    ``MIRROR_MIN_AGREEMENT`` of the cases agree in sign. One foreground class: every axis.

    Examples
    --------
    >>> cases = {str(i): {"class_positions": {"1": [0.5, 0.3, 0.5], "2": [0.5, 0.7, 0.5]}} for i in range(5)}
    >>> plan_mirror_axes(cases).value
    [0, 2]
    """
    names = class_names or {}
    if any("class_positions" not in c for c in cases.values()):
        return Choice([0, 1, 2], "[0, 1, 2]: every axis (the fingerprint has no class positions)")
    differences: dict[tuple[str, str], list[list[float]]] = {}
    for case in cases.values():
        positions = {str(k): v for k, v in case["class_positions"].items()}
        keys = sorted(positions, key=int)
        for i, a in enumerate(keys):
            for b in keys[i + 1:]:
                differences.setdefault((a, b), []).append(np.subtract(positions[a], positions[b]).tolist())
    axes, fixed = [], []
    for axis in range(3):
        ordered = []
        for (a, b), rows in differences.items():
            d = np.asarray(rows)[:, axis]
            median = float(np.median(d))
            agreement = float(np.mean(np.sign(d) == np.sign(median))) if median else 0.0
            if abs(median) >= MIRROR_MIN_GAP and agreement >= MIRROR_MIN_AGREEMENT:
                first, second = (a, b) if median < 0 else (b, a)
                ordered.append(f"{names.get(first, first)} before {names.get(second, second)} "
                               f"by {abs(median):.2f} of the extent in {agreement:.0%} of {len(d)} cases")
        if ordered:
            fixed.append(f"{'xyz'[axis]}: {ordered[0]}")
        else:
            axes.append(axis)
    if not fixed:
        return Choice(axes, f"{axes}: every axis (no two classes lie in a fixed order along any axis)")
    return Choice(axes, f"{axes}: not along {'; '.join(fixed)} — a flip would swap them (segpipe rule)")


def plan_loss(classes: dict[str, dict[str, Any]]) -> Choice:
    """Dice + cross-entropy, nnU-Net's default loss."""
    value = {"terms": [{"name": "dice", "weight": 1.0, "include_background": False}, {"name": "ce", "weight": 1.0}]}
    return Choice(value, "Dice + CE (nnU-Net's default): Dice for class imbalance, CE for stable gradients")


# ----------------------------------------------------------------------------------- time


def sliding_windows(shape: Sequence[float], patch: Sequence[int], overlap: float) -> int:
    """Number of windows a sliding-window pass over ``shape`` takes (step = patch × (1 − overlap))."""
    total = 1
    for s, p in zip(shape, patch):
        step = max(1, int(p * (1 - overlap)))
        total *= 1 if s <= p else math.ceil((s - p) / step) + 1
    return total


def plan_inference(
    *, median_shape: Sequence[float], patch: Sequence[int], num_cases: int, window_seconds: float,
    budget_seconds: float, mirror_axes: Sequence[int] = (0, 1, 2), case_overhead_seconds: float = 0.0,
) -> tuple[Choice, Choice, float]:
    """Overlap and mirroring whose final evaluation of ``num_cases`` fits ``budget_seconds``.

    Try, in order, overlap 0.5 with mirroring along all of ``mirror_axes`` (the axes the model is
    trained to mirror, :func:`plan_mirror_axes`), then along fewer of them, then none, then overlap
    0.25 and 0 without mirroring; the first that fits is chosen. ``window_seconds`` is the forward
    time of one window; ``case_overhead_seconds`` what a case costs besides its windows (blending,
    mapping the probabilities back onto the original grid, writing), measured on a median case.
    Returns (overlap, mirror axes, predicted seconds).
    """
    allowed = list(mirror_axes)
    options = [(0.5, allowed[:k]) for k in range(len(allowed), 0, -1)] + [(0.5, []), (0.25, []), (0.0, [])]
    cost = None
    for overlap, axes in options:
        windows = sliding_windows(median_shape, patch, overlap)
        cost = num_cases * (windows * 2 ** len(axes) * window_seconds + case_overhead_seconds)
        if cost <= budget_seconds:
            break
    per_case = cost / max(1, num_cases)
    reason_o = f"{overlap}: {windows} windows per median case"
    mirror = f"{len(axes)} axes ({2 ** len(axes)} passes)" if axes else "off"
    besides = f" ({case_overhead_seconds:.1f} s besides the windows)" if case_overhead_seconds else ""
    reason_m = (f"{axes}: mirroring {mirror}; {per_case:.1f} s per case{besides}, {cost / 60:.1f} min for {num_cases} "
                f"validation cases (budget {budget_seconds / 60:.1f} min)")
    if cost > budget_seconds:
        reason_m += " — over budget even without mirroring at overlap 0"
    return Choice(overlap, reason_o), Choice(axes, reason_m), float(cost)


PRECISION_MIN_GAIN = 0.05  # a mixed precision must be this much faster than float32 to be chosen


def plan_precision(step_seconds: dict[str, float], *, supported_reason: str,
                   min_gain: float = PRECISION_MIN_GAIN) -> Choice:
    """The fastest precision of the timed training steps (``{precision: seconds}``, float32 included).

    A mixed precision is chosen only when its step is at least ``min_gain`` faster than float32's:
    with less to gain, float32's exact arithmetic wins. ``supported_reason`` says why the others were
    (not) timed on this machine.

    Examples
    --------
    >>> plan_precision({"float32": 4.2, "mixed_bfloat16": 2.7}, supported_reason="bf16: the CPU has avx512_bf16").value
    'mixed_bfloat16'
    >>> plan_precision({"float32": 1.0, "mixed_bfloat16": 0.97}, supported_reason="").value
    'float32'
    """
    if "float32" not in step_seconds:
        raise ValueError(expected("a float32 step time among the timings", key="step_seconds",
                                  received=Received(", ".join(step_seconds) or "none")))
    fastest = min(step_seconds, key=lambda p: (step_seconds[p], p != "float32"))
    reference = step_seconds["float32"]
    if fastest != "float32" and step_seconds[fastest] > (1 - min_gain) * reference:
        fastest = "float32"
    times = ", ".join(f"{p} {t:.2f} s" for p, t in step_seconds.items())
    if len(step_seconds) == 1:
        why = "the only precision timed"
    elif fastest == "float32":
        why = f"no mixed precision was {100 * min_gain:.0f} % faster"
    else:
        why = f"{reference / step_seconds[fastest]:.2f}× faster than float32"
    return Choice(fastest, f"{fastest}: {why} (timed steps: {times}); {supported_reason}".rstrip("; "))


class BudgetTooSmall(ValueError):
    """:func:`plan_schedule`'s error: not even one epoch fits; ``need_minutes`` is what one would need."""

    def __init__(self, message: str, need_minutes: float):
        super().__init__(message)
        self.need_minutes = need_minutes


def plan_schedule(
    *, budget_minutes: float, step_seconds: float, validation_seconds: float, final_seconds: float,
    overhead_seconds: float = 0.0, max_steps_per_epoch: int = 250, min_epochs: int = 4,
) -> Choice:
    """Epochs × steps per epoch whose training, per-epoch validation and final evaluation fit the budget.

    Steps per epoch: enough that validation costs about 10 % of an epoch (9 × validation / step),
    between 10 and ``max_steps_per_epoch`` (nnU-Net: 250), fewer if that leaves under
    ``min_epochs`` epochs. Epochs: as many as fit in what remains after the final evaluation and
    ``overhead_seconds``. Raises :class:`BudgetTooSmall` (a ValueError) if not even one epoch fits.
    """
    available = budget_minutes * 60.0 - final_seconds - overhead_seconds
    steps = int(min(max_steps_per_epoch, max(10, math.ceil(9 * validation_seconds / step_seconds))))
    epochs = int(available // (steps * step_seconds + validation_seconds)) if available > 0 else 0
    if epochs < min_epochs:
        steps = int(max(1, (available / min_epochs - validation_seconds) // step_seconds))
        epochs = int(available // (steps * step_seconds + validation_seconds)) if available > 0 else 0
    if epochs < 1:
        need = (step_seconds + validation_seconds + final_seconds + overhead_seconds) / 60
        raise BudgetTooSmall(expected(f"at least {need:.1f} minutes for one step, one validation and the final "
                                      "evaluation", key="train.time_budget_minutes", received=budget_minutes), need)
    used = epochs * (steps * step_seconds + validation_seconds) + final_seconds + overhead_seconds
    return Choice({"epochs": epochs, "steps_per_epoch": steps},
                  f"{epochs} × {steps} steps at {step_seconds:.2f} s + {validation_seconds:.0f} s "
                  "validation per epoch, "
                  f"{final_seconds / 60:.1f} min final evaluation, {overhead_seconds / 60:.1f} min overhead: "
                  f"{used / 60:.1f} of {round(budget_minutes, 2):g} min")
