"""Assemble a plan from a dataset fingerprint, the hardware and an optional time budget.

:func:`make_plan` applies the rules of :mod:`segpipe.planning.rules` in order (spacing, patch and
topology under the memory budget, batch, normalisation, sampling, loss) and, given a time budget
and a step timer, times real training steps of the planned network and fits the schedule and the
inference settings into the budget. The result is a :class:`Plan`: every choice with its reason
and the config keys it sets. Nothing here imports TensorFlow; the timer is passed in
(:mod:`segpipe.planning.timing` provides the real one).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from segpipe.errors import expected
from segpipe.planning import network, rules
from segpipe.planning.rules import Choice

PLAN_VERSION = 1
MODELS = ("unet3d", "resenc_unet")
# nnU-Net's residual-encoder presets: residual blocks per encoder stage
RESENC_BLOCKS = (1, 3, 4, 6, 6, 6, 6)
MAX_TIMINGS = 3  # timings of the planned network: a step much slower than predicted re-plans once or twice
MIN_TOTAL_STEPS = 1000  # a time budget shrinks the patch until at least this many training steps fit
FINAL_EVAL_SHARE = 0.15  # of the budget for the final sliding-window evaluation of the validation cases
MARGIN_SECONDS = 120.0  # start-up, preprocessing of a cached dataset, export: kept free in the budget
# The training loop's step is slower than an isolated train_on_batch (the tf.data loader sampling and
# augmenting on the same cores, metrics, per-step bookkeeping): measured here 0.27 s per loop step
# (median of epochs 2-8) against 0.13 s timed in isolation for a 40×40×10 patch; 0.40 against
# 0.36 s for the hippocampus recipe (docs/planning.md, "The time budget").
LOOP_OVERHEAD_SECONDS = 0.15
LOOP_STEP_FACTOR = 1.1
EPOCH_OVERHEAD_SECONDS = 2.0  # per epoch: checkpoint, history row, loader restart
WHOLE_VALIDATION_MAX_RATIO = 8.0  # whole-volume validation while a median case is at most 8 patches


@dataclass(frozen=True)
class Hardware:
    """The machine a plan is made for."""

    device: str  # "cpu" or "gpu"
    memory_bytes: int  # the training memory budget (RAM share on CPU, device memory on GPU)
    cores: int = 1
    description: str = ""

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


StepTimer = Callable[[dict[str, Any]], dict[str, float]]
"""Takes the plan's config keys (dotted) plus ``_in_channels``/``_num_classes`` and returns
``{"step_seconds", "window_seconds", "peak_bytes", "baseline_bytes"}`` measured on this machine."""


def make_plan(
    fingerprint: dict[str, Any],
    *,
    hardware: Hardware,
    model: str = "unet3d",
    time_budget_minutes: float | None = None,
    step_timer: StepTimer | None = None,
    num_val_cases: int | None = None,
    val_fraction: float = 0.2,
    max_stages: int = 6,
    base_features: int | None = None,
    spacing_mm: Sequence[float] | None = None,
    patch_size: Sequence[int] | None = None,
    batch_size: int | None = None,
) -> Plan:
    """Plan a training run for the dataset described by ``fingerprint`` on ``hardware``.

    The steps, in order (each adds its choices to the plan): spacing, network (patch and topology
    under the memory budget; with a time budget, shrunk until enough timed steps fit), batch, data
    (normalisation, sampling, validation, loss), time (schedule and inference settings), config keys.

    Parameters
    ----------
    fingerprint : from :func:`segpipe.data.fingerprint.compute_fingerprint` (``cases`` with spacing,
        cropped shape and class voxels; ``channel_names``; ``classes``; ``intensity``).
    hardware : device and memory budget (:func:`segpipe.planning.hardware.detect_hardware`).
    model : ``unet3d`` (plain, nnU-Net's default) or ``resenc_unet`` (residual encoder).
    time_budget_minutes : if given (with ``step_timer``), the schedule and inference settings fit it.
    step_timer : measures the planned network's training step on this machine.
    num_val_cases : validation cases (default: ``round(num_cases * val_fraction)``, at least 1).
    max_stages, base_features : caps of the topology and the width (default: 16 on a CPU, else 32).
    spacing_mm, patch_size, batch_size : values the user fixed; the dependent choices follow them
        (a fixed patch gets the deepest topology that divides it; a fixed batch is costed as is).
    """
    if model not in MODELS:
        raise ValueError(expected(f"one of {list(MODELS)}", key="model", received=model))
    if time_budget_minutes is not None and time_budget_minutes <= 0:
        raise ValueError(expected("a positive time budget", key="train.time_budget_minutes", received=time_budget_minutes))
    inputs = _read_inputs(fingerprint, hardware=hardware, model=model, num_val_cases=num_val_cases,
                          val_fraction=val_fraction, max_stages=max_stages, base_features=base_features)
    plan = Plan(dataset=str(fingerprint.get("dataset", "")), fingerprint_key=str(fingerprint.get("key", "")),
                hardware={"device": hardware.device, "memory_budget_bytes": hardware.memory_bytes,
                          "cores": hardware.cores, "description": hardware.description})

    spacing, median = _plan_spacing(plan, inputs, spacing_mm)
    patch_plan = _plan_patch(inputs, spacing, median, patch_size)
    timed = None
    if time_budget_minutes is not None and step_timer is not None:
        patch_plan, timed = _fit_time_budget(plan, inputs, spacing, median, patch_plan, budget_minutes=time_budget_minutes,
                                             step_timer=step_timer, patch_size=patch_size, timer_batch=batch_size or 2)
    _record_network(plan, inputs, patch_plan)
    batch = _plan_batch(plan, inputs, patch_plan, median, batch_size)
    _plan_data(plan, inputs, patch_plan, median)
    if timed is not None:
        _plan_time(plan, inputs, patch_plan, median, timed, budget_minutes=time_budget_minutes, batch=batch,
                   timer_batch=batch_size or 2)
    elif time_budget_minutes is not None:
        raise ValueError(expected("a step timer with a time budget (the schedule is fitted to measured steps)",
                                  key="step_timer", received=None))
    plan.config = _plan_config(plan, patch_plan, spacing, inputs, batch)
    return plan


@dataclass(frozen=True)
class _Inputs:
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


def _read_inputs(fingerprint: dict[str, Any], *, hardware: Hardware, model: str, num_val_cases: int | None,
                 val_fraction: float, max_stages: int, base_features: int | None) -> _Inputs:
    cases = fingerprint.get("cases") or {}
    if not cases:
        raise ValueError(expected("a fingerprint with per-case entries", key="cases", received=None,
                                  where=f"the fingerprint of {fingerprint.get('dataset')}"))
    channel_names = list(fingerprint.get("channel_names") or [])
    classes = fingerprint.get("classes") or {}
    num_cases = len(cases)
    cpu = hardware.device == "cpu"
    return _Inputs(
        spacings=np.array([c["spacing_mm"] for c in cases.values()], dtype=np.float64),
        shapes=np.array([c.get("cropped_shape", c["shape"]) for c in cases.values()], dtype=np.float64),
        channel_names=channel_names,
        in_channels=max(1, len(channel_names), len(fingerprint.get("intensity") or [])),
        classes=classes,
        cases=cases,
        num_classes=max(int(k) for k in classes) + 1 if classes else 2,
        num_cases=num_cases,
        num_val=num_val_cases if num_val_cases is not None else min(num_cases - 1, max(1, round(num_cases * val_fraction))),
        hardware=hardware,
        model=model,
        max_stages=max_stages,
        # the network width: the hardware's rule
        base=base_features or (16 if cpu else 32),
        width_reason=("CPU: 16 (32 costs 3.3× the step time here, docs/hippocampus.md)" if cpu and not base_features
                      else "nnU-Net's 32" if not base_features else "given"),
        blocks=RESENC_BLOCKS if model == "resenc_unet" else None,
    )


def _plan_spacing(plan: Plan, inputs: _Inputs, spacing_mm: Sequence[float] | None) -> tuple[list[float], Any]:
    """Step 1: the target spacing and the median shape at that spacing."""
    c = plan.choices
    c["spacing"] = rules.plan_target_spacing(inputs.spacings, inputs.shapes)
    if spacing_mm is not None:
        c["spacing"] = Choice([float(v) for v in spacing_mm], f"{_x(spacing_mm)} mm: given (data.target_spacing_mm)")
    spacing = c["spacing"].value
    return spacing, rules.shape_at_spacing(inputs.shapes, inputs.spacings, spacing)


def _plan_patch(inputs: _Inputs, spacing: Sequence[float], median: Sequence[float],
                patch_size: Sequence[int] | None) -> network.PatchPlan:
    """Step 2: patch and topology under the memory budget, or the deepest topology of a given patch."""
    patch_plan = inputs.fit_patch(spacing, median, budget_text=inputs.budget_text)  # also fails a budget too small for any patch
    if patch_size is not None:
        patch_plan = _fixed_patch(patch_size, spacing, inputs.in_channels, inputs.num_classes, inputs.base,
                                  inputs.max_stages, inputs.blocks)
    return patch_plan


def _fit_time_budget(plan: Plan, inputs: _Inputs, spacing: Sequence[float], median: Sequence[float],
                     patch_plan: network.PatchPlan, *, budget_minutes: float, step_timer: StepTimer,
                     patch_size: Sequence[int] | None, timer_batch: int) -> tuple[network.PatchPlan, dict[str, float]]:
    """Step 3, with a time budget: calibrate seconds per FLOP on a small reference network, then shrink
    the patch further until MIN_TOTAL_STEPS predicted steps fit; the final network is timed again.

    Returns the patch plan and the last timing of the planned network.
    """
    shape_keys = {"_in_channels": inputs.in_channels, "_num_classes": inputs.num_classes}
    train_seconds = budget_minutes * 60 * (1 - FINAL_EVAL_SHARE) - MARGIN_SECONDS
    max_step = max(train_seconds, 1.0) / MIN_TOTAL_STEPS  # an isolated step (the loop's overhead comes on top)
    ref_topo = network.pool_and_kernels([32, 32, 32], [1.0, 1.0, 1.0], max_stages=4)
    ref_spec = network.unet_spec(ref_topo, inputs.in_channels, inputs.num_classes, base=16)
    ref = step_timer({**_config_keys(network.PatchPlan(ref_topo, ref_spec, 0), [1.0, 1.0, 1.0], "unet3d", None, batch=2),
                      **shape_keys})
    seconds_per_flop = ref["step_seconds"] / (2 * network.training_flops(ref_topo, ref_spec))
    plan.measured["reference"] = {"network": "unet3d 32³ × 2, 16 base features, 4 stages", **ref}
    plan.predicted["seconds_per_flop"] = seconds_per_flop

    def fast_enough(topo: network.Topology, spec: network.NetworkSpec) -> bool:
        return timer_batch * network.training_flops(topo, spec) * seconds_per_flop <= max_step

    attempts = plan.measured.setdefault("attempts", [])
    for _ in range(MAX_TIMINGS):
        if patch_size is None:
            patch_plan = inputs.fit_patch(spacing, median, fits=fast_enough,
                                          budget_text=f"{inputs.budget_text} and {MIN_TOTAL_STEPS} steps in "
                                                      f"{budget_minutes:g} min")
        flops = timer_batch * network.training_flops(patch_plan.topology, patch_plan.spec)
        predicted_step = flops * seconds_per_flop
        timed = step_timer({**_config_keys(patch_plan, spacing, inputs.model, inputs.blocks, batch=timer_batch), **shape_keys})
        attempts.append({"patch_size": list(patch_plan.topology.patch_size), "predicted_step_seconds": predicted_step,
                         "step_seconds": timed["step_seconds"]})
        if patch_size is not None or timed["step_seconds"] <= 1.1 * max_step:
            break
        # slower than predicted (a less efficient network, or a busy machine): calibrate on this one
        seconds_per_flop = timed["step_seconds"] / flops
    plan.predicted["step_seconds"] = predicted_step
    return patch_plan, timed


def _record_network(plan: Plan, inputs: _Inputs, patch_plan: network.PatchPlan) -> None:
    """The network's choices: patch, stages, strides, kernels, features (and residual blocks)."""
    topo, spec, c = patch_plan.topology, patch_plan.spec, plan.choices
    c["patch_size"] = Choice(list(topo.patch_size), patch_plan.reason)
    c["stages"] = Choice(topo.num_stages, f"{topo.num_stages}: the axes pool while they have >= {2 * network.MIN_EDGE} "
                                          f"voxels (pools per axis {_x(topo.pools_per_axis)}), at most {inputs.max_stages}")
    c["strides"] = Choice([list(s) for s in topo.strides], "per stage; an axis halves while its spacing is within 2× of the finest")
    c["kernel_sizes"] = Choice([list(k) for k in topo.kernel_sizes],
                               "\n".join(network.topology_reasons(topo, plan.choices["spacing"].value)))
    c["features"] = Choice(list(spec.features), f"{inputs.base}·2^stage capped at 320; base {inputs.width_reason}")
    if inputs.model == "resenc_unet":
        c["blocks_per_stage"] = Choice(list(inputs.blocks[: topo.num_stages]),
                                       "nnU-Net ResEnc presets: residual blocks per encoder stage, one conv block per decoder stage")


def _plan_batch(plan: Plan, inputs: _Inputs, patch_plan: network.PatchPlan, median: Sequence[float],
                batch_size: int | None) -> int:
    """Step 4: the batch under the memory budget, and the predicted memory and size of the network."""
    topo, spec, c = patch_plan.topology, patch_plan.spec, plan.choices
    budget = inputs.hardware.memory_bytes
    c["batch_size"] = rules.plan_batch_size(
        lambda b: network.estimate_training_memory(topo, spec, b), budget, patch_voxels=int(np.prod(topo.patch_size)),
        dataset_voxels=float(np.prod(median)) * inputs.num_cases, max_batch=2 if inputs.cpu else None,
        max_batch_reason="CPU: compute-bound, a larger batch lengthens every step by as much")
    if batch_size is not None:
        c["batch_size"] = Choice(int(batch_size), f"{batch_size}: given (data.batch_size)")
    batch = c["batch_size"].value
    memory = network.estimate_training_memory(topo, spec, batch)
    plan.predicted["memory_bytes"] = memory
    plan.predicted["memory_bytes_batch2"] = network.estimate_training_memory(topo, spec, 2)  # what the timer runs
    plan.predicted["activation_units"] = network.activation_units(topo, spec)
    plan.predicted["parameters"] = network.parameter_count(topo, spec)
    plan.predicted["training_flops_per_sample"] = network.training_flops(topo, spec)
    c["memory"] = Choice(memory, f"{memory / 2**30:.2f} GiB estimated for a training step of batch {batch} "
                                 f"(budget {inputs.budget_text})")
    return batch


def _patches_per_case(median: Sequence[float], patch_plan: network.PatchPlan) -> float:
    return float(np.prod(median)) / int(np.prod(patch_plan.topology.patch_size))


def _plan_data(plan: Plan, inputs: _Inputs, patch_plan: network.PatchPlan, median: Sequence[float]) -> None:
    """Step 5: normalisation, sampling, validation, loss."""
    c = plan.choices
    c["normalization"] = rules.plan_normalization(inputs.channel_names or ["image"] * inputs.in_channels)
    c["foreground_fraction"] = rules.plan_foreground_fraction(inputs.classes)
    ratio = _patches_per_case(median, patch_plan)
    if ratio <= WHOLE_VALIDATION_MAX_RATIO:
        c["validation"] = Choice("whole", f"whole: a median case is {ratio:.1f} patches, cheap to predict whole each epoch")
    else:
        c["validation"] = Choice("patches", f"patches: a median case is {ratio:.0f} patches, too slow and large to predict "
                                            f"whole every epoch; whole volumes only in the final evaluation")
    c["loss"] = rules.plan_loss(inputs.classes)
    c["mirror_axes"] = rules.plan_mirror_axes(inputs.cases, {k: v.get("name", k) for k, v in inputs.classes.items()})


def _plan_time(plan: Plan, inputs: _Inputs, patch_plan: network.PatchPlan, median: Sequence[float],
               timed: dict[str, float], *, budget_minutes: float, batch: int, timer_batch: int) -> None:
    """Step 6, with a time budget: the schedule and the inference settings from the measured step."""
    c = plan.choices
    # the timer ran timer_batch; the loop adds its own cost to every step
    step_seconds = timed["step_seconds"] * batch / timer_batch * LOOP_STEP_FACTOR + LOOP_OVERHEAD_SECONDS
    window = timed["window_seconds"]
    if c["validation"].value == "whole":
        val_seconds = inputs.num_val * max(1.0, _patches_per_case(median, patch_plan)) * window
    else:
        val_seconds = inputs.num_val * 4 * window  # val_patches_per_case
    val_seconds += EPOCH_OVERHEAD_SECONDS
    overlap, mirror, final_seconds = rules.plan_inference(
        median_shape=median, patch=patch_plan.topology.patch_size, num_cases=inputs.num_val, window_seconds=window,
        budget_seconds=budget_minutes * 60 * FINAL_EVAL_SHARE, mirror_axes=c["mirror_axes"].value)
    c["inference_overlap"], c["inference_mirror_axes"] = overlap, mirror
    c["schedule"] = rules.plan_schedule(budget_minutes=budget_minutes, step_seconds=step_seconds,
                                        validation_seconds=val_seconds, final_seconds=final_seconds,
                                        overhead_seconds=MARGIN_SECONDS)
    limit = max(budget_minutes - (final_seconds + MARGIN_SECONDS) / 60, 0.1 * budget_minutes)
    c["time_limit"] = Choice(round(limit, 2), f"{limit:.1f} min: the budget minus the final evaluation and the margin; "
                                              f"training stops before an epoch that would end later")
    plan.predicted.update(validation_seconds=val_seconds, final_evaluation_seconds=final_seconds,
                          loop_step_seconds=step_seconds)
    plan.measured.update({k: timed[k] for k in ("step_seconds", "window_seconds", "peak_bytes", "baseline_bytes") if k in timed})
    plan.measured["patch_size"] = list(patch_plan.topology.patch_size)


def _plan_config(plan: Plan, patch_plan: network.PatchPlan, spacing: Sequence[float], inputs: _Inputs,
                 batch: int) -> dict[str, Any]:
    """The config keys the plan sets (dotted key -> value)."""
    c = plan.choices
    config = _config_keys(patch_plan, spacing, inputs.model, inputs.blocks, batch=batch)
    config.update({
        "data.normalization": c["normalization"].value,
        "data.foreground_fraction": c["foreground_fraction"].value,
        "data.validation": c["validation"].value,
        "loss": c["loss"].value,
        "data.augment.mirror.axes": list(c["mirror_axes"].value),
        "inference.mirror_axes": list(c["mirror_axes"].value),  # a copy: YAML would write an alias otherwise
    })
    if "schedule" in c:
        config["train.epochs"] = c["schedule"].value["epochs"]
        config["train.steps_per_epoch"] = c["schedule"].value["steps_per_epoch"]
        config["inference.overlap"] = c["inference_overlap"].value
        config["inference.mirror_axes"] = c["inference_mirror_axes"].value
        config["train.max_train_minutes"] = c["time_limit"].value
    return config


def _fixed_patch(patch_size: Sequence[int], spacing: Sequence[float], in_channels: int, num_classes: int,
                 base: int, max_stages: int, blocks: Sequence[int] | None) -> network.PatchPlan:
    """The deepest topology (at most ``max_stages``) whose padded patch is the given patch itself."""
    for stages in range(max_stages, 0, -1):
        topo = network.pool_and_kernels(patch_size, spacing, max_stages=stages)
        if list(topo.patch_size) == [int(p) for p in patch_size]:
            spec = network.unet_spec(topo, in_channels, num_classes, base=base, blocks_per_stage=blocks)
            return network.PatchPlan(topo, spec, network.estimate_training_memory(topo, spec, 2), (),
                                   f"{_x(patch_size)}: given (data.patch_size); {stages} stages divide it")
    raise AssertionError(expected("a stage count that divides the patch (1 stage always does)", key="data.patch_size",
                                  received=list(patch_size)))  # unreachable


def _x(values: Sequence[int]) -> str:
    return "×".join(str(v) for v in values)


def _config_keys(patch_plan: network.PatchPlan, spacing: Sequence[float], model: str, blocks: Sequence[int] | None,
                 *, batch: int) -> dict[str, Any]:
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
