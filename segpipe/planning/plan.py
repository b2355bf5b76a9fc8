"""What a plan is: the machine it is made for, the dataset's facts the steps read, and the result.

:class:`Plan` holds every choice (value + reason), the config keys it sets and what was predicted and
measured; :class:`Hardware` the machine; :class:`PlanInputs` what the planning steps of
:mod:`segpipe.planning.planner` and :mod:`segpipe.planning.time_plan` read. Nothing here imports TensorFlow.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from segpipe.errors import expected
from segpipe.planning import network
from segpipe.planning.rules import Choice

PLAN_VERSION = 1


@dataclass(frozen=True)
class Hardware:
    """The machine a plan is made for."""

    device: str  # "cpu" or "gpu"
    memory_bytes: int  # the training memory budget (RAM share on CPU, device memory on GPU)
    cores: int = 1
    description: str = ""
    # the train.precision values worth timing here (float32 first) and why (hardware.supported_precisions)
    precisions: tuple[str, ...] = ("float32",)
    precision_reason: str = ""

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "gpu"):
            raise ValueError(expected("'cpu' or 'gpu'", key="device", received=self.device))
        if self.memory_bytes <= 0:
            raise ValueError(expected("a positive memory budget", key="memory_bytes", received=self.memory_bytes))


@dataclass
class Plan:
    """Every choice (value + reason) and the config keys the plan sets (dotted key -> value)."""

    choices: dict[str, Choice] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    predicted: dict[str, Any] = field(default_factory=dict)
    measured: dict[str, Any] = field(default_factory=dict)
    dataset: str = ""
    fingerprint_key: str = ""
    hardware: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "plan_version": PLAN_VERSION,
            "dataset": self.dataset,
            "fingerprint_key": self.fingerprint_key,
            "hardware": self.hardware,
            "choices": {k: {"value": _jsonable(c.value), "reason": c.reason} for k, c in self.choices.items()},
            "config": {k: _jsonable(v) for k, v in self.config.items()},
            "predicted": _jsonable(self.predicted),
            "measured": _jsonable(self.measured),
        }

    def table(self) -> str:
        """The printed table: one row per choice with its reason."""
        width = max(len(k) for k in self.choices) if self.choices else 0
        lines = []
        for key, choice in self.choices.items():
            reason = choice.reason.split("\n")
            lines.append(f"{key.ljust(width)}  {reason[0]}")
            lines.extend(f"{' ' * width}  {r}" for r in reason[1:])
        return "\n".join(lines)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


CaseTimer = Callable[[dict[str, Any]], dict[str, Any]]
"""Takes the plan's network keys (as :data:`StepTimer`, with ``train.precision`` and ``data.normalization``)
and returns :func:`segpipe.training.case_timing.case_worker`'s timings of one median case predicted at overlap
0.5 without mirroring: ``predict_seconds``, ``write_seconds``, ``network_seconds``, ``windows``, ...."""

StepTimer = Callable[[dict[str, Any]], dict[str, float]]
"""Takes the plan's config keys (dotted) plus ``_in_channels``/``_num_classes`` and returns
``{"step_seconds", "window_seconds", "peak_bytes", "baseline_bytes"}`` measured on this machine."""


@dataclass(frozen=True)
class PlanInputs:
    """What the planning steps read: the dataset's facts from the fingerprint and the fixed settings."""

    spacings: np.ndarray  # (cases, 3) mm
    shapes: np.ndarray  # (cases, 3) cropped voxels
    channel_names: list[str]
    in_channels: int
    classes: dict[str, Any]
    cases: dict[str, Any]  # the fingerprint's per-case entries (class positions: the mirroring rule)
    num_classes: int
    num_cases: int
    num_val: int
    hardware: Hardware
    model: str
    max_stages: int
    base: int  # features at full resolution
    width_reason: str
    blocks: tuple[int, ...] | None  # residual blocks per stage (resenc_unet)

    @property
    def cpu(self) -> bool:
        return self.hardware.device == "cpu"

    @property
    def budget_text(self) -> str:
        return f"{self.hardware.memory_bytes / 2**30:.1f} GiB"

    def fit_patch(self, spacing: Sequence[float], median: Sequence[float], **options: Any) -> network.PatchPlan:
        """:func:`network.fit_patch` for this dataset, network and memory budget."""
        return network.fit_patch(spacing, median, in_channels=self.in_channels, num_classes=self.num_classes,
                               budget_bytes=self.hardware.memory_bytes, base_features=self.base,
                               max_stages=self.max_stages, blocks_per_stage=self.blocks, **options)


def patches_per_case(median: Sequence[float], patch_plan: network.PatchPlan) -> float:
    """How many patches a case of the median shape holds."""
    return float(np.prod(median)) / int(np.prod(patch_plan.topology.patch_size))


def shape_text(values: Sequence[int]) -> str:
    """``[40, 56, 40]`` -> ``40×56×40``."""
    return "×".join(str(v) for v in values)


def config_keys(patch_plan: network.PatchPlan, spacing: Sequence[float], model: str, blocks: Sequence[int] | None,
                *, batch: int) -> dict[str, Any]:
    """The config keys of the network, its patch, spacing and batch (dotted key -> value)."""
    topo, spec = patch_plan.topology, patch_plan.spec
    keys: dict[str, Any] = {
        "data.target_spacing_mm": list(spacing),
        "data.patch_size": list(topo.patch_size),
        "data.batch_size": batch,
        "model.name": model,
        "model.depth": topo.num_stages,
        "model.base_filters": spec.features[0],
        "model.max_filters": 320,
        "model.strides": [list(s) for s in topo.strides],
        "model.kernel_sizes": [list(k) for k in topo.kernel_sizes],
        "model.init": "he_normal",
    }
    if blocks is not None:
        keys["model.blocks_per_stage"] = list(blocks[: topo.num_stages])
    return keys
