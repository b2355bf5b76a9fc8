"""The planning rules: pure functions from fingerprint numbers to one choice each, with its reason.

Every rule returns plain numbers (or a :class:`Choice` holding the value and a one-line reason);
none reads files, imports TensorFlow or looks at the machine, so each can be checked by hand.
The sources of the rules (mostly nnU-Net v2's ``ExperimentPlanner``) are listed in docs/planning.md.

Axis order is RAS (x, y, z), the order preprocessing works in; sizes are voxels, spacings mm.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from segpipe.errors import Received, expected

ANISOTROPY_THRESHOLD = 3.0  # nnU-Net's ANISO_THRESHOLD
MIN_EDGE = 4  # smallest feature-map edge in the bottleneck: an axis pools while it has >= 2 * MIN_EDGE voxels
BYTES_PER_FLOAT = 4
# Memory of a training step = batch × activation units × 4 B × TENSORS_PER_UNIT + 16 B × parameters
# + FIXED_OVERHEAD_BYTES. Fitted to the peak resident memory of timed CPU steps (docs/planning.md,
# "Memory"): 2.6 tensors per unit (convolution, normalisation and activation outputs kept for the
# backward pass, minus what TensorFlow frees early) and ~740 MiB of runtime, weights and traced
# graphs; both rounded up so the estimate errs on the safe side.
TENSORS_PER_UNIT = 3.0
FIXED_OVERHEAD_BYTES = 768 * 2**20


@dataclass(frozen=True)
class Choice:
    """One planned value and the one-line reason for it."""

    value: Any
    reason: str


def _fmt(shape: Sequence[float], digits: int = 0) -> str:
    return "×".join(f"{s:.{digits}f}" if digits else str(int(round(s))) for s in shape)


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
    return Choice([round(float(s), 6) for s in target], f"{_fmt(target, 3)} mm: {reason}")


def shape_at_spacing(shapes: np.ndarray, spacings_mm: np.ndarray, target_mm: Sequence[float]) -> list[float]:
    """Median of the cases' shapes after resampling to ``target_mm``."""
    shapes = np.asarray(shapes, dtype=np.float64).reshape(-1, 3)
    spacings = np.asarray(spacings_mm, dtype=np.float64).reshape(-1, 3)
    return [float(v) for v in np.median(np.round(shapes * spacings / np.asarray(target_mm)), axis=0)]


# ----------------------------------------------------------------------------------- topology


@dataclass(frozen=True)
class Topology:
    """Pooling and convolution layout of a U-Net for one patch size.

    Attributes
    ----------
    patch_size : the patch, padded so each axis divides by its total down-sampling.
    strides : per stage and axis, the stride of the stage's first convolution (stage 0: all 1).
    kernel_sizes : per stage and axis, 1 or 3.
    pools_per_axis : how often each axis is halved.
    """

    patch_size: tuple[int, int, int]
    strides: tuple[tuple[int, int, int], ...]
    kernel_sizes: tuple[tuple[int, int, int], ...]
    pools_per_axis: tuple[int, int, int]

    @property
    def num_stages(self) -> int:
        return len(self.strides)

    @property
    def divisor(self) -> tuple[int, int, int]:
        return tuple(2**p for p in self.pools_per_axis)  # type: ignore[return-value]

    def stage_shapes(self) -> list[tuple[int, int, int]]:
        """Feature-map size of every stage for ``patch_size``."""
        shapes, current = [], np.asarray(self.patch_size)
        for stride in self.strides:
            current = current // np.asarray(stride)
            shapes.append(tuple(int(v) for v in current))
        return shapes


def pool_and_kernels(
    patch_size: Sequence[float], spacing_mm: Sequence[float], *, min_edge: int = MIN_EDGE, max_stages: int = 6
) -> Topology:
    """Pooling per axis and kernel sizes per stage for a patch (nnU-Net's ``get_pool_and_conv_props``).

    Repeatedly, an axis may be halved if it has at least ``2 * min_edge`` voxels (``3 * min_edge`` if
    it is the only one) and its current spacing is less than 2× the finest current spacing of those
    axes; pooled axes double their spacing. A stage's kernel is 1 along an axis until that axis's
    current spacing is within 2× of the finest, then 3 from there on; the last stage (bottleneck) is
    3 along every axis. Finally the patch is padded up to a multiple of 2**(pools) per axis.

    Examples
    --------
    >>> t = pool_and_kernels([64, 64, 16], [0.8, 0.8, 3.0])
    >>> t.strides[:3], t.kernel_sizes[:2]
    (((1, 1, 1), (2, 2, 1), (2, 2, 2)), ((3, 3, 1), (3, 3, 3)))
    """
    if len(patch_size) != 3 or len(spacing_mm) != 3 or min(spacing_mm) <= 0:
        raise ValueError(f"Expected 3 sizes and 3 positive spacings. Received: patch_size={list(patch_size)}, spacing_mm={list(spacing_mm)}")
    spacing = [float(s) for s in spacing_mm]
    size = [float(s) for s in patch_size]
    pools = [0, 0, 0]
    kernel = [1, 1, 1]
    strides: list[tuple[int, int, int]] = [(1, 1, 1)]
    kernels: list[tuple[int, int, int]] = []
    while len(strides) < max_stages:
        big_enough = [a for a in range(3) if size[a] >= 2 * min_edge]
        if not big_enough:
            break
        finest = min(spacing[a] for a in big_enough)
        valid = [a for a in big_enough if spacing[a] / finest < 2]
        if len(valid) == 1 and size[valid[0]] < 3 * min_edge:
            break
        if not valid:
            break
        # the kernel of the stage about to be left: 3 once the axis is within 2x of the finest spacing
        kernel = [3 if (kernel[a] == 3 or spacing[a] / min(spacing) < 2) else 1 for a in range(3)]
        kernels.append(tuple(kernel))  # type: ignore[arg-type]
        stride = tuple(2 if a in valid else 1 for a in range(3))
        for a in valid:
            pools[a] += 1
            spacing[a] *= 2
            size[a] = math.ceil(size[a] / 2)
        strides.append(stride)  # type: ignore[arg-type]
    kernels.append((3, 3, 3))  # bottleneck
    divisor = [2**p for p in pools]
    padded = tuple(int(math.ceil(float(s) / d) * d) for s, d in zip(patch_size, divisor))
    return Topology(padded, tuple(strides), tuple(kernels), tuple(pools))  # type: ignore[arg-type]


def features_per_stage(num_stages: int, *, base: int = 32, cap: int = 320) -> list[int]:
    """``base * 2**stage``, capped at ``cap`` (nnU-Net: 32 and 320 for 3D)."""
    return [min(base * 2**s, cap) for s in range(num_stages)]


# ----------------------------------------------------------------------------------- cost model


@dataclass(frozen=True)
class NetworkSpec:
    """What the cost model needs to know about a U-Net besides its topology."""

    in_channels: int
    num_classes: int
    features: tuple[int, ...]
    encoder_convs: tuple[int, ...]  # convolutions per encoder stage (resenc: 2 per residual block + 1 stem/projection)
    decoder_convs: int = 2
    encoder_extra_maps: tuple[int, ...] = ()  # further kept feature maps per stage (resenc: 1 per block for the sum)


def unet_spec(topology: Topology, in_channels: int, num_classes: int, *, base: int, cap: int = 320,
              convs_per_stage: int = 2, blocks_per_stage: Sequence[int] | None = None) -> NetworkSpec:
    """The spec of the plain U-Net (``blocks_per_stage`` None) or the residual-encoder U-Net."""
    n = topology.num_stages
    features = tuple(features_per_stage(n, base=base, cap=cap))
    if blocks_per_stage is None:
        return NetworkSpec(in_channels, num_classes, features, (convs_per_stage,) * n, convs_per_stage)
    blocks = list(blocks_per_stage)[:n]
    if len(blocks) < n:
        raise ValueError(f"Expected a block count for each of {n} stages. Received: blocks_per_stage={list(blocks_per_stage)}")
    # stage 0 has a stem convolution; every residual block has two 3x3x3 convs (and a 1x1x1 skip
    # projection where the shape changes, counted as one more feature map)
    convs = tuple(2 * b + 1 for b in blocks)
    return NetworkSpec(in_channels, num_classes, features, convs, 1, tuple(blocks))


def activation_units(topology: Topology, spec: NetworkSpec) -> int:
    """Sum of the sizes (voxels × channels) of every feature map a training step keeps, one sample.

    Counted: the input; per encoder stage ``encoder_convs[s]`` convolution outputs of ``features[s]``
    channels; per decoder stage the transposed-convolution output, the concatenation (2 × features)
    and ``decoder_convs`` convolution outputs; the logits and softmax of the head. nnU-Net uses the
    same proxy (the sum of convolution output sizes). A residual block adds one map for its sum.
    """
    shapes = [int(np.prod(s)) for s in topology.stage_shapes()]
    units = shapes[0] * spec.in_channels
    for s, voxels in enumerate(shapes):
        extra = spec.encoder_extra_maps[s] if spec.encoder_extra_maps else 0
        units += (spec.encoder_convs[s] + extra) * voxels * spec.features[s]
    for s in range(topology.num_stages - 1):
        units += shapes[s] * spec.features[s] * (1 + 2 + spec.decoder_convs)
    units += 2 * shapes[0] * spec.num_classes
    return int(units)


def parameter_count(topology: Topology, spec: NetworkSpec) -> int:
    """Weights of the convolutions (biases and normalisation parameters neglected).

    Exact for the plain U-Net; for the residual encoder it counts each stage's 1×1×1 projection as a
    full-size kernel (about 9 % too many at 40×56×40, 4 stages: 7.04 M against Keras's 6.48 M).
    """
    total, previous = 0, spec.in_channels
    for s in range(topology.num_stages):
        k = int(np.prod(topology.kernel_sizes[s]))
        f = spec.features[s]
        total += k * previous * f + (spec.encoder_convs[s] - 1) * k * f * f
        previous = f
    for s in reversed(range(topology.num_stages - 1)):
        k = int(np.prod(topology.kernel_sizes[s]))
        f = spec.features[s]
        total += int(np.prod(topology.strides[s + 1])) * spec.features[s + 1] * f  # transposed conv
        total += k * 2 * f * f + (spec.decoder_convs - 1) * k * f * f
    return int(total + spec.features[0] * spec.num_classes)


def training_flops(topology: Topology, spec: NetworkSpec) -> float:
    """Multiply-adds × 2 of one sample's forward pass, × 3 for forward and backward."""
    shapes = [int(np.prod(s)) for s in topology.stage_shapes()]
    macs, previous = 0.0, spec.in_channels
    for s, voxels in enumerate(shapes):
        k = int(np.prod(topology.kernel_sizes[s]))
        f = spec.features[s]
        macs += voxels * k * (previous * f + (spec.encoder_convs[s] - 1) * f * f)
        previous = f
    for s in range(topology.num_stages - 1):
        k = int(np.prod(topology.kernel_sizes[s]))
        f = spec.features[s]
        macs += shapes[s + 1] * int(np.prod(topology.strides[s + 1])) * spec.features[s + 1] * f
        macs += shapes[s] * k * (2 * f * f + (spec.decoder_convs - 1) * f * f)
    macs += shapes[0] * spec.features[0] * spec.num_classes
    return 6.0 * macs


def estimate_training_memory(topology: Topology, spec: NetworkSpec, batch_size: int, *,
                             tensors_per_unit: float = TENSORS_PER_UNIT,
                             fixed_bytes: int = FIXED_OVERHEAD_BYTES, precision: str = "float32") -> int:
    """Bytes of one training step: ``batch × units × B × tensors_per_unit + 16 B × params + fixed``.

    ``B`` is 4 bytes per activation in float32 and 2 under a mixed precision (the activations kept for
    the backward pass are 16-bit; not measured yet: the planner fits patches with the float32 model).
    The 16 bytes per parameter are the weight, its gradient and Adam's two moments (float32 under every
    precision).
    """
    per_value = BYTES_PER_FLOAT if precision == "float32" else BYTES_PER_FLOAT // 2
    per_sample = activation_units(topology, spec) * per_value * tensors_per_unit
    return int(batch_size * per_sample + 4 * BYTES_PER_FLOAT * parameter_count(topology, spec) + fixed_bytes)


# ----------------------------------------------------------------------------------- patch


def initial_patch_size(spacing_mm: Sequence[float], median_shape: Sequence[float], *, max_voxels: float = 256**3) -> list[int]:
    """A patch proportional to 1/spacing (equal extent in mm) of ``max_voxels`` voxels, clipped to the median shape.

    nnU-Net starts from 256³ voxels (deliberately too large, then shrinks to fit memory).
    """
    inverse = 1.0 / np.asarray(spacing_mm, dtype=np.float64)
    scaled = inverse * (max_voxels / np.prod(inverse)) ** (1 / 3)
    return [int(max(1, min(round(s), round(m)))) for s, m in zip(scaled, median_shape)]


@dataclass(frozen=True)
class PatchPlan:
    topology: Topology
    spec: NetworkSpec
    memory_bytes: int
    shrunk: tuple[tuple[int, int], ...] = field(default=())  # (axis, new size) in order
    reason: str = ""


def fit_patch(
    spacing_mm: Sequence[float],
    median_shape: Sequence[float],
    *,
    in_channels: int,
    num_classes: int,
    budget_bytes: float,
    base_features: int,
    max_features: int = 320,
    max_stages: int = 6,
    batch_size: int = 2,
    max_voxels: float = 256**3,
    blocks_per_stage: Sequence[int] | None = None,
    fits: Any = None,
    budget_text: str | None = None,
) -> PatchPlan:
    """The largest aspect-preserving patch whose estimated training memory fits ``budget_bytes``.

    Start from :func:`initial_patch_size`; while the estimate for ``batch_size`` samples exceeds the
    budget (or ``fits(topology, spec)`` is false, e.g. a time limit), shrink the axis whose size is
    largest relative to the median shape by its current divisibility step, and recompute the
    topology (nnU-Net's loop). Raises ValueError if no patch of at least one step fits.
    """
    def build(patch: Sequence[float]) -> tuple[Topology, NetworkSpec, int]:
        topo = pool_and_kernels(patch, spacing_mm, max_stages=max_stages)
        spec = unet_spec(topo, in_channels, num_classes, base=base_features, cap=max_features,
                         blocks_per_stage=blocks_per_stage)
        return topo, spec, estimate_training_memory(topo, spec, batch_size)

    median = np.asarray(median_shape, dtype=np.float64)
    start = initial_patch_size(spacing_mm, median, max_voxels=max_voxels)
    topo, spec, memory = build(start)
    shrunk: list[tuple[int, int]] = []
    while memory > budget_bytes or (fits is not None and not fits(topo, spec)):
        patch = list(topo.patch_size)
        ratio = [p / m for p, m in zip(patch, median)]
        axis = int(np.argmax(ratio))
        # step by the divisor the smaller patch will need (a smaller patch may pool less often)
        trial = list(patch)
        trial[axis] -= topo.divisor[axis]
        step = pool_and_kernels(trial, spacing_mm, max_stages=max_stages).divisor[axis] if trial[axis] > 0 else topo.divisor[axis]
        patch[axis] -= step
        if patch[axis] < 1 or min(patch) < 1:
            what = budget_text or f"{budget_bytes / 2**30:.2f} GiB"
            raise ValueError(expected(f"a memory budget that a patch of at least one voxel per axis fits ({what})",
                                      key="memory budget", received=Received(
                                          f"{what}, exceeded even by {_fmt(topo.patch_size)} "
                                          f"(estimate {memory / 2**30:.2f} GiB)")))
        topo, spec, memory = build(patch)
        shrunk.append((axis, topo.patch_size[axis]))
    return PatchPlan(topo, spec, memory, tuple(shrunk), _patch_reason(start, topo, shrunk, median, budget_text or f"{budget_bytes / 2**30:.1f} GiB"))


def _patch_reason(start: Sequence[int], topo: Topology, shrunk: Sequence[tuple[int, int]], median: np.ndarray, budget: str) -> str:
    text = f"{_fmt(topo.patch_size)}: "
    if list(start) == [round(m) for m in median]:
        text += f"the median shape {_fmt(median)} at target spacing"
    else:
        text += f"{_fmt(start)} (equal extent in mm, clipped to the median shape {_fmt(median)})"
    if list(start) != list(topo.patch_size) and not shrunk:
        text += f", padded to a multiple of {_fmt(topo.divisor)}"
    if shrunk:
        axes = "".join(sorted({"xyz"[a] for a, _ in shrunk}))
        text += f", shrunk along {axes} ({len(shrunk)} steps) to fit {budget}"
    return text


def topology_reasons(topology: Topology, spacing_mm: Sequence[float]) -> list[str]:
    """One line per stage: kernel and stride, with the spacing that decided them."""
    lines, spacing = [], np.asarray(spacing_mm, dtype=np.float64)
    for s in range(topology.num_stages):
        spacing = spacing * np.asarray(topology.strides[s])
        kernel, stride = topology.kernel_sizes[s], topology.strides[s]
        ratio = spacing / spacing.min()
        flat = [("xyz"[a], ratio[a]) for a in range(3) if kernel[a] == 1]
        why = ", ".join(f"{ax} spacing {r:.1f}× the finest" for ax, r in flat) or "all spacings within 2× of the finest"
        lines.append(f"stage {s}: kernel {_fmt(kernel)}, stride {_fmt(stride)} ({why}; spacing {_fmt(spacing, 2)} mm)")
    return lines


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


def plan_schedule(
    *, budget_minutes: float, step_seconds: float, validation_seconds: float, final_seconds: float,
    overhead_seconds: float = 0.0, max_steps_per_epoch: int = 250, min_epochs: int = 4,
) -> Choice:
    """Epochs × steps per epoch whose training, per-epoch validation and final evaluation fit the budget.

    Steps per epoch: enough that validation costs about 10 % of an epoch (9 × validation / step),
    between 10 and ``max_steps_per_epoch`` (nnU-Net: 250), fewer if that leaves under
    ``min_epochs`` epochs. Epochs: as many as fit in what remains after the final evaluation and
    ``overhead_seconds``. Raises ValueError if not even one epoch fits.
    """
    available = budget_minutes * 60.0 - final_seconds - overhead_seconds
    steps = int(min(max_steps_per_epoch, max(10, math.ceil(9 * validation_seconds / step_seconds))))
    epochs = int(available // (steps * step_seconds + validation_seconds)) if available > 0 else 0
    if epochs < min_epochs:
        steps = int(max(1, (available / min_epochs - validation_seconds) // step_seconds))
        epochs = int(available // (steps * step_seconds + validation_seconds)) if available > 0 else 0
    if epochs < 1:
        need = (step_seconds + validation_seconds + final_seconds + overhead_seconds) / 60
        raise ValueError(expected(f"at least {need:.1f} minutes for one step, one validation and the final evaluation",
                                  key="train.time_budget_minutes", received=budget_minutes))
    used = epochs * (steps * step_seconds + validation_seconds) + final_seconds + overhead_seconds
    return Choice({"epochs": epochs, "steps_per_epoch": steps},
                  f"{epochs} × {steps} steps at {step_seconds:.2f} s + {validation_seconds:.0f} s validation per epoch, "
                  f"{final_seconds / 60:.1f} min final evaluation, {overhead_seconds / 60:.1f} min overhead: "
                  f"{used / 60:.1f} of {budget_minutes:g} min")
