"""Assemble a plan from a dataset fingerprint, the hardware and an optional time budget.

:func:`make_plan` applies the rules of :mod:`segpipe.planning.rules` in order (spacing, patch and
topology under the memory budget, batch, normalisation, sampling, loss) and, given a time budget
and a step timer, times real training steps of the planned network and fits the schedule and the
inference settings into the budget. The result is a :class:`Plan`: every choice with its reason
and the config keys it sets. Nothing here imports TensorFlow; the timer is passed in
(:mod:`segpipe.planning.timing` provides the real one).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from segpipe.errors import Received, expected
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
# k-fold with a time budget (the whole command): the ensemble at the end (copying the out-of-fold
# predictions, choosing post-processing on them, one bundle of every fold) is kept free too
ENSEMBLE_SECONDS = 60.0
ENSEMBLE_SECONDS_PER_FOLD = 20.0
# each fold after the first trains in the same process (no new start-up, the cache is built): only its
# bundle export is kept free per fold; the command's start-up margin is kept once
FOLD_MARGIN_SECONDS = 30.0
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
    precision: str = "auto",
    case_timer: CaseTimer | None = None,
    folds: int | None = None,
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
    precision : ``train.precision``. ``auto`` with a time budget: the planned network's step is timed in
        each precision ``hardware.precisions`` lists and the fastest is chosen (:func:`rules.plan_precision`);
        a given precision is timed alone.
    case_timer : with a time budget: predicts one median case as the final evaluation will and times its
        parts; the final evaluation is then costed as windows + the case's other costs (blending, mapping
        back, writing) instead of windows alone.
    folds : k-fold training (``--folds K``): the time budget is for the whole command, so each fold is
        planned for its share (the budget less the timings, the start-up margin and the ensemble, divided
        by ``folds``), and
        the validation cases are a fold's (``num_val_cases`` default: ``round(num_cases / folds)``).
    """
    if model not in MODELS:
        raise ValueError(expected(f"one of {list(MODELS)}", key="model", received=model))
    if time_budget_minutes is not None and time_budget_minutes <= 0:
        raise ValueError(expected("a positive time budget", key="train.time_budget_minutes",
                                  received=time_budget_minutes))
    if folds is not None and (isinstance(folds, bool) or not isinstance(folds, int) or folds < 2):
        raise ValueError(expected("a number of folds >= 2", key="data.folds", received=folds))
    if folds is not None and num_val_cases is None:
        num_val_cases = max(1, round(len(fingerprint.get("cases") or {}) / folds))
    inputs = _read_inputs(fingerprint, hardware=hardware, model=model, num_val_cases=num_val_cases,
                          val_fraction=val_fraction, max_stages=max_stages, base_features=base_features)
    plan = Plan(dataset=str(fingerprint.get("dataset", "")), fingerprint_key=str(fingerprint.get("key", "")),
                hardware={"device": hardware.device, "memory_budget_bytes": hardware.memory_bytes,
                          "cores": hardware.cores, "description": hardware.description})

    spacing, median = _plan_spacing(plan, inputs, spacing_mm)
    patch_plan = _plan_patch(inputs, spacing, median, patch_size)
    timed = None
    timers_seconds = [0.0]  # the timings' own wall time: spent from the budget before training starts
    step_timer = _clocked(step_timer, timers_seconds) if step_timer is not None else None
    case_timer = _clocked(case_timer, timers_seconds) if case_timer is not None else None
    if time_budget_minutes is not None and step_timer is not None:
        fitting = "float32" if precision == "auto" else precision
        patch_plan, timed = _fit_time_budget(plan, inputs, spacing, median, patch_plan,
                                             budget_minutes=_run_budget_minutes(time_budget_minutes, folds, 0.0),
                                             step_timer=step_timer, patch_size=patch_size, timer_batch=batch_size or 2,
                                             precision=fitting)
        timed = _plan_precision(plan, inputs, spacing, patch_plan, timed, step_timer=step_timer, setting=precision,
                                timer_batch=batch_size or 2)
    else:
        plan.choices["precision"] = (
            Choice(precision, f"{precision}: given (train.precision)") if precision != "auto" else
            Choice("float32", "float32: auto is decided by timed steps, and there is no time budget to time them"))
    _record_network(plan, inputs, patch_plan)
    batch = _plan_batch(plan, inputs, patch_plan, median, batch_size)
    _plan_data(plan, inputs, patch_plan, median)
    if timed is not None:
        case = None
        if case_timer is not None:
            keys = {**_config_keys(patch_plan, spacing, inputs.model, inputs.blocks, batch=batch),
                    "train.precision": plan.choices["precision"].value,
                    "data.normalization": plan.choices["normalization"].value,
                    "data.foreground_fraction": plan.choices["foreground_fraction"].value,
                    "data.augment.mirror.axes": list(plan.choices["mirror_axes"].value),
                    "loss": plan.choices["loss"].value,
                    "_in_channels": inputs.in_channels, "_num_classes": inputs.num_classes}
            case = case_timer(keys)
        plan.measured["timing_seconds"] = timers_seconds[0]
        run_budget, spent = time_budget_minutes, timers_seconds[0]
        if folds is not None:
            run_budget, spent = _plan_folds(plan, time_budget_minutes, folds, spent), 0.0
        try:
            _plan_time(plan, inputs, patch_plan, median, timed, budget_minutes=run_budget, batch=batch,
                       timer_batch=batch_size or 2, case=case, spent_seconds=spent,
                       margin_seconds=MARGIN_SECONDS if folds is None else FOLD_MARGIN_SECONDS)
        except rules.BudgetTooSmall as exc:
            if folds is None:
                raise
            # the schedule's message names a fold's share as if it were the budget: name the budget
            raise ValueError(expected(
                f"at least {exc.need_minutes:.1f} minutes per fold for one step, one validation and the fold's "
                "evaluation",
                key="train.time_budget_minutes",
                received=Received(f"{time_budget_minutes:g} ({run_budget:.1f} min per fold of {folds}, after the "
                                  f"timings and the ensemble)"),
                hint=f"Give a larger budget, or fewer folds than {folds}.")) from exc
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
        num_val=(num_val_cases if num_val_cases is not None
                 else min(num_cases - 1, max(1, round(num_cases * val_fraction)))),
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
    # also fails a budget too small for any patch
    patch_plan = inputs.fit_patch(spacing, median, budget_text=inputs.budget_text)
    if patch_size is not None:
        patch_plan = _fixed_patch(patch_size, spacing, inputs.in_channels, inputs.num_classes, inputs.base,
                                  inputs.max_stages, inputs.blocks)
    return patch_plan


def _fit_time_budget(plan: Plan, inputs: _Inputs, spacing: Sequence[float], median: Sequence[float],
                     patch_plan: network.PatchPlan, *, budget_minutes: float, step_timer: StepTimer,
                     patch_size: Sequence[int] | None, timer_batch: int,
                     precision: str = "float32") -> tuple[network.PatchPlan, dict[str, float]]:
    """Step 3, with a time budget: calibrate seconds per FLOP on a small reference network, then shrink
    the patch further until MIN_TOTAL_STEPS predicted steps fit; the final network is timed again.

    Returns the patch plan and the last timing of the planned network.
    """
    shape_keys = {"_in_channels": inputs.in_channels, "_num_classes": inputs.num_classes, "train.precision": precision}
    train_seconds = budget_minutes * 60 * (1 - FINAL_EVAL_SHARE) - MARGIN_SECONDS
    max_step = max(train_seconds, 1.0) / MIN_TOTAL_STEPS  # an isolated step (the loop's overhead comes on top)
    ref_topo = network.pool_and_kernels([32, 32, 32], [1.0, 1.0, 1.0], max_stages=4)
    ref_spec = network.unet_spec(ref_topo, inputs.in_channels, inputs.num_classes, base=16)
    ref = step_timer({**_config_keys(network.PatchPlan(ref_topo, ref_spec, 0), [1.0, 1.0, 1.0], "unet3d", None,
                                     batch=2),
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
        timed = step_timer({**_config_keys(patch_plan, spacing, inputs.model, inputs.blocks, batch=timer_batch),
                            **shape_keys})
        attempts.append({"patch_size": list(patch_plan.topology.patch_size), "predicted_step_seconds": predicted_step,
                         "step_seconds": timed["step_seconds"]})
        if patch_size is not None or timed["step_seconds"] <= 1.1 * max_step:
            break
        # slower than predicted (a less efficient network, or a busy machine): calibrate on this one
        seconds_per_flop = timed["step_seconds"] / flops
    plan.predicted["step_seconds"] = predicted_step
    return patch_plan, timed


def _plan_precision(plan: Plan, inputs: _Inputs, spacing: Sequence[float], patch_plan: network.PatchPlan,
                    timed: dict[str, float], *, step_timer: StepTimer, setting: str,
                    timer_batch: int) -> dict[str, float]:
    """Step 3b, with a time budget: the planned network's step in each precision this machine supports (``auto``),
    the fastest chosen; returns the timing the schedule is fitted to.

    The final evaluation's windows are costed at the slower of float32 and the chosen precision: a bundle may
    predict in float32 whatever the training precision.
    """
    hardware = inputs.hardware
    if setting != "auto":
        plan.choices["precision"] = Choice(setting, f"{setting}: given (train.precision), "
                                                    f"{timed['step_seconds']:.2f} s per timed step")
        plan.measured["precision"] = {setting: timed}
        return timed
    timings = {"float32": timed}
    keys = {**_config_keys(patch_plan, spacing, inputs.model, inputs.blocks, batch=timer_batch),
            "_in_channels": inputs.in_channels, "_num_classes": inputs.num_classes}
    for precision in hardware.precisions:
        if precision not in timings:
            timings[precision] = step_timer({**keys, "train.precision": precision})
    choice = rules.plan_precision({p: t["step_seconds"] for p, t in timings.items()},
                                  supported_reason=hardware.precision_reason)
    plan.choices["precision"] = choice
    plan.measured["precision"] = timings
    chosen = dict(timings[choice.value])
    chosen["window_seconds"] = max(chosen["window_seconds"], timings["float32"]["window_seconds"])
    return chosen


def _clocked(timer: Callable[[dict[str, Any]], dict[str, Any]], total: list[float]):
    """``timer`` adding its calls' wall time to ``total[0]``."""
    def clocked(keys: dict[str, Any]) -> dict[str, Any]:
        start = time.monotonic()
        try:
            return timer(keys)
        finally:
            total[0] += time.monotonic() - start

    return clocked


def _record_network(plan: Plan, inputs: _Inputs, patch_plan: network.PatchPlan) -> None:
    """The network's choices: patch, stages, strides, kernels, features (and residual blocks)."""
    topo, spec, c = patch_plan.topology, patch_plan.spec, plan.choices
    c["patch_size"] = Choice(list(topo.patch_size), patch_plan.reason)
    c["stages"] = Choice(topo.num_stages, f"{topo.num_stages}: the axes pool while they have >= {2 * network.MIN_EDGE} "
                                          f"voxels (pools per axis {_x(topo.pools_per_axis)}), "
                                          f"at most {inputs.max_stages}")
    c["strides"] = Choice([list(s) for s in topo.strides],
                          "per stage; an axis halves while its spacing is within 2× of the finest")
    c["kernel_sizes"] = Choice([list(k) for k in topo.kernel_sizes],
                               "\n".join(network.topology_reasons(topo, plan.choices["spacing"].value)))
    c["features"] = Choice(list(spec.features), f"{inputs.base}·2^stage capped at 320; base {inputs.width_reason}")
    if inputs.model == "resenc_unet":
        c["blocks_per_stage"] = Choice(list(inputs.blocks[: topo.num_stages]),
                                       "nnU-Net ResEnc presets: residual blocks per encoder stage, "
                                       "one conv block per decoder stage")


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
    # per precision (the patch and batch are fitted with float32's, the larger)
    plan.predicted["memory_bytes_by_precision"] = {
        p: network.estimate_training_memory(topo, spec, batch, precision=p) for p in ("float32", "mixed_bfloat16")}
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
        c["validation"] = Choice("whole",
                                 f"whole: a median case is {ratio:.1f} patches, cheap to predict whole each epoch")
    else:
        c["validation"] = Choice("patches",
                                 f"patches: a median case is {ratio:.0f} patches, too slow and large to predict "
                                            f"whole every epoch; whole volumes only in the final evaluation")
    c["loss"] = rules.plan_loss(inputs.classes)
    c["mirror_axes"] = rules.plan_mirror_axes(inputs.cases, {k: v.get("name", k) for k, v in inputs.classes.items()})


def _ensemble_seconds(folds: int) -> float:
    return ENSEMBLE_SECONDS + ENSEMBLE_SECONDS_PER_FOLD * folds


def _run_budget_minutes(budget_minutes: float, folds: int | None, spent_seconds: float) -> float:
    """The minutes one run is planned for: the whole budget, or a fold's share of what the timings
    (``spent_seconds``) and the ensemble leave."""
    if folds is None:
        return budget_minutes
    return (budget_minutes * 60 - spent_seconds - _ensemble_seconds(folds) - MARGIN_SECONDS) / folds / 60


def _plan_folds(plan: Plan, budget_minutes: float, folds: int, spent_seconds: float) -> float:
    """Step 5b, k-fold with a time budget: divide the command's budget; returns one fold's minutes."""
    share = _run_budget_minutes(budget_minutes, folds, spent_seconds)
    ensemble = _ensemble_seconds(folds)
    if share <= 0:
        raise ValueError(expected(f"more than {(spent_seconds + ensemble + MARGIN_SECONDS) / 60:.1f} minutes for "
                                  f"{folds} folds (the "
                                  f"timings and the ensemble come first)", key="train.time_budget_minutes",
                                  received=budget_minutes))
    plan.choices["budget_division"] = Choice(
        {"folds": folds, "fold_minutes": round(share, 2), "timings_minutes": round(spent_seconds / 60, 2),
         "ensemble_minutes": round(ensemble / 60, 2)},
        f"{budget_minutes:g} min for the whole command: {spent_seconds / 60:.1f} min of timings, "
        f"{MARGIN_SECONDS / 60:.1f} min for start-up, {folds} folds × {share:.1f} min (training, evaluation of the "
        f"fold's validation cases, its export), {ensemble / 60:.1f} min for the ensemble (out-of-fold "
        f"post-processing, one bundle)")
    plan.predicted["ensemble_seconds"] = ensemble
    return share


def _plan_time(plan: Plan, inputs: _Inputs, patch_plan: network.PatchPlan, median: Sequence[float],
               timed: dict[str, float], *, budget_minutes: float, batch: int, timer_batch: int,
               case: dict[str, Any] | None = None, spent_seconds: float = 0.0,
               margin_seconds: float = MARGIN_SECONDS) -> None:
    """Step 6, with a time budget: the schedule and the inference settings from the measured step (and,
    with ``case``, the final evaluation from a whole timed case: its windows' time and everything else)."""
    c = plan.choices
    # the timer ran timer_batch; the loop adds its own cost to every step
    bare_model = timed["step_seconds"] * batch / timer_batch * LOOP_STEP_FACTOR + LOOP_OVERHEAD_SECONDS
    step_seconds = bare_model
    if case is not None and case.get("loop_step_seconds") is not None:
        # measured as training runs it (loader, augmentation, the planned batch); × 1.1 as a margin for the
        # loop's per-step metrics and bookkeeping (not measured apart)
        step_seconds = case["loop_step_seconds"] * LOOP_STEP_FACTOR
        plan.predicted["loop_step_seconds_bare_model"] = bare_model
    window = timed["window_seconds"]
    if c["validation"].value == "whole":
        val_seconds = inputs.num_val * max(1.0, _patches_per_case(median, patch_plan)) * window
    else:
        val_seconds = inputs.num_val * 4 * window  # val_patches_per_case
    val_seconds += EPOCH_OVERHEAD_SECONDS
    final_window, overhead = window, 0.0
    if case is not None and case.get("windows"):
        final_window = case["network_seconds"] / case["windows"]
        overhead = max(0.0, case["predict_seconds"] + case["write_seconds"] - case["network_seconds"])
        plan.measured["final_evaluation_case"] = dict(case)
    overlap, mirror, final_seconds = rules.plan_inference(
        median_shape=median, patch=patch_plan.topology.patch_size, num_cases=inputs.num_val,
        window_seconds=final_window, budget_seconds=budget_minutes * 60 * FINAL_EVAL_SHARE,
        mirror_axes=c["mirror_axes"].value, case_overhead_seconds=overhead)
    c["inference_overlap"], c["inference_mirror_axes"] = overlap, mirror
    c["schedule"] = rules.plan_schedule(budget_minutes=budget_minutes, step_seconds=step_seconds,
                                        validation_seconds=val_seconds, final_seconds=final_seconds,
                                        overhead_seconds=margin_seconds + spent_seconds)
    limit = max(budget_minutes - (final_seconds + margin_seconds + spent_seconds) / 60, 0.1 * budget_minutes)
    c["time_limit"] = Choice(round(limit, 2), f"{limit:.1f} min: the budget minus the final evaluation, the margin and "
                                              f"the {spent_seconds / 60:.1f} min of timings; training stops before an "
                                              f"epoch that would end later")
    plan.predicted.update(validation_seconds=val_seconds, final_evaluation_seconds=final_seconds,
                          loop_step_seconds=step_seconds)
    windows = rules.sliding_windows(median, patch_plan.topology.patch_size, overlap.value) * 2 ** len(mirror.value)
    plan.predicted["final_evaluation"] = {
        "cases": inputs.num_val, "windows_per_case": windows, "window_seconds": final_window,
        "network_seconds_per_case": windows * final_window, "other_seconds_per_case": overhead,
        "timed_case": case is not None}
    plan.measured.update({k: timed[k] for k in ("step_seconds", "window_seconds", "peak_bytes", "baseline_bytes")
                          if k in timed})
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
        config["train.precision"] = c["precision"].value
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
