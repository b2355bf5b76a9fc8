"""The network side of planning: the U-Net topology for a patch, its cost, and the patch that fits.

Pure functions like the rest of :mod:`segpipe.planning.rules`: the pooling and kernels per stage
(:func:`pool_and_kernels`, nnU-Net v2's ``get_pool_and_conv_props``), the cost model of a training
step (activations, parameters, FLOPs, memory: :func:`estimate_training_memory`), and the largest
patch whose step fits a memory budget (:func:`fit_patch`), each with its reason.

Axis order is RAS (x, y, z); sizes are voxels, spacings mm.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from segpipe.errors import Received, expected

MIN_EDGE = 4  # smallest feature-map edge in the bottleneck: an axis pools while it has >= 2 * MIN_EDGE voxels
BYTES_PER_FLOAT = 4
# Memory of a training step = batch × activation units × 4 B × TENSORS_PER_UNIT + 16 B × parameters
# + FIXED_OVERHEAD_BYTES. Fitted to the peak resident memory of timed CPU steps (docs/planning.md,
# "Memory"): 2.6 tensors per unit (convolution, normalisation and activation outputs kept for the
# backward pass, minus what TensorFlow frees early) and ~740 MiB of runtime, weights and traced
# graphs; both rounded up so the estimate errs on the safe side.
TENSORS_PER_UNIT = 3.0
FIXED_OVERHEAD_BYTES = 768 * 2**20


def shape_text(shape: Sequence[float], digits: int = 0) -> str:
    """``128×128×64`` (whole voxels) or, with ``digits``, ``0.800×0.800×3.000``."""
    return "×".join(f"{s:.{digits}f}" if digits else str(int(round(s))) for s in shape)


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
        raise ValueError(expected("3 sizes and 3 positive spacings", key="patch_size",
                                  received=Received(f"{list(patch_size)}, spacing_mm={list(spacing_mm)}")))
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
        raise ValueError(expected(f"a block count for each of {n} stages", key="blocks_per_stage",
                                  received=list(blocks_per_stage)))
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


def initial_patch_size(spacing_mm: Sequence[float], median_shape: Sequence[float], *,
                       max_voxels: float = 256**3) -> list[int]:
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
        step = (pool_and_kernels(trial, spacing_mm, max_stages=max_stages).divisor[axis] if trial[axis] > 0
                else topo.divisor[axis])
        patch[axis] -= step
        if patch[axis] < 1 or min(patch) < 1:
            what = budget_text or f"{budget_bytes / 2**30:.2f} GiB"
            raise ValueError(expected(f"a memory budget that a patch of at least one voxel per axis fits ({what})",
                                      key="memory budget", received=Received(
                                          f"{what}, exceeded even by {shape_text(topo.patch_size)} "
                                          f"(estimate {memory / 2**30:.2f} GiB)")))
        topo, spec, memory = build(patch)
        shrunk.append((axis, topo.patch_size[axis]))
    return PatchPlan(topo, spec, memory, tuple(shrunk),
                     _patch_reason(start, topo, shrunk, median, budget_text or f"{budget_bytes / 2**30:.1f} GiB"))


def _patch_reason(start: Sequence[int], topo: Topology, shrunk: Sequence[tuple[int, int]], median: np.ndarray,
                  budget: str) -> str:
    text = f"{shape_text(topo.patch_size)}: "
    if list(start) == [round(m) for m in median]:
        text += f"the median shape {shape_text(median)} at target spacing"
    else:
        text += f"{shape_text(start)} (equal extent in mm, clipped to the median shape {shape_text(median)})"
    if list(start) != list(topo.patch_size) and not shrunk:
        text += f", padded to a multiple of {shape_text(topo.divisor)}"
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
        lines.append(f"stage {s}: kernel {shape_text(kernel)}, stride {shape_text(stride)} ({why}; spacing "
                     f"{shape_text(spacing, 2)} mm)")
    return lines
