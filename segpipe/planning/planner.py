"""Assemble a plan from a dataset fingerprint, the hardware and an optional time budget.

:func:`make_plan` applies the rules of :mod:`segpipe.planning.rules` in order (spacing, patch and
topology under the memory budget, batch, normalisation, sampling, loss) and, given a time budget
and a step timer, times real training steps of the planned network and fits the schedule and the
inference settings into the budget. The result is a :class:`Plan`: every choice with its reason
and the config keys it sets. Nothing here imports TensorFlow; the timer is passed in
(:mod:`segpipe.planning.timing` provides the real one).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from segpipe.errors import expected
from segpipe.planning import network, rules, time_plan
from segpipe.planning.plan import (
    CaseTimer,
    Hardware,
    Plan,
    PlanInputs,
    StepTimer,
    config_keys,
    patches_per_case,
    shape_text,
)
from segpipe.planning.rules import Choice

MODELS = ("unet3d", "resenc_unet")
# nnU-Net's residual-encoder presets: residual blocks per encoder stage
RESENC_BLOCKS = (1, 3, 4, 6, 6, 6, 6)
WHOLE_VALIDATION_MAX_RATIO = 8.0  # whole-volume validation while a median case is at most 8 patches


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
    step_timer = time_plan.clocked(step_timer, timers_seconds) if step_timer is not None else None
    case_timer = time_plan.clocked(case_timer, timers_seconds) if case_timer is not None else None
    if time_budget_minutes is not None and step_timer is not None:
        fitting = "float32" if precision == "auto" else precision
        patch_plan, timed = time_plan.fit_time_budget(
            plan, inputs, spacing, median, patch_plan,
            budget_minutes=time_plan.run_budget_minutes(time_budget_minutes, folds, 0.0), step_timer=step_timer,
            patch_size=patch_size, timer_batch=batch_size or 2, precision=fitting)
        timed = time_plan.time_precisions(plan, inputs, spacing, patch_plan, timed, step_timer=step_timer,
                                          setting=precision, timer_batch=batch_size or 2)
    else:
        plan.choices["precision"] = (
            Choice(precision, f"{precision}: given (train.precision)") if precision != "auto" else
            Choice("float32", "float32: auto is decided by timed steps, and there is no time budget to time them"))
    _record_network(plan, inputs, patch_plan)
    batch = _plan_batch(plan, inputs, patch_plan, median, batch_size)
    _plan_data(plan, inputs, patch_plan, median)
    if timed is not None:
        time_plan.plan_budget(plan, inputs, patch_plan, spacing, median, timed, budget_minutes=time_budget_minutes,
                              folds=folds, batch=batch, timer_batch=batch_size or 2, case_timer=case_timer,
                              timers_seconds=timers_seconds)
    elif time_budget_minutes is not None:
        raise ValueError(expected("a step timer with a time budget (the schedule is fitted to measured steps)",
                                  key="step_timer", received=None))
    plan.config = _plan_config(plan, patch_plan, spacing, inputs, batch)
    return plan


def _read_inputs(fingerprint: dict[str, Any], *, hardware: Hardware, model: str, num_val_cases: int | None,
                 val_fraction: float, max_stages: int, base_features: int | None) -> PlanInputs:
    cases = fingerprint.get("cases") or {}
    if not cases:
        raise ValueError(expected("a fingerprint with per-case entries", key="cases", received=None,
                                  where=f"the fingerprint of {fingerprint.get('dataset')}"))
    channel_names = list(fingerprint.get("channel_names") or [])
    classes = fingerprint.get("classes") or {}
    num_cases = len(cases)
    cpu = hardware.device == "cpu"
    return PlanInputs(
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


def _plan_spacing(plan: Plan, inputs: PlanInputs, spacing_mm: Sequence[float] | None) -> tuple[list[float], Any]:
    """Step 1: the target spacing and the median shape at that spacing."""
    c = plan.choices
    c["spacing"] = rules.plan_target_spacing(inputs.spacings, inputs.shapes)
    if spacing_mm is not None:
        c["spacing"] = Choice([float(v) for v in spacing_mm],
                              f"{shape_text(spacing_mm)} mm: given (data.target_spacing_mm)")
    spacing = c["spacing"].value
    return spacing, rules.shape_at_spacing(inputs.shapes, inputs.spacings, spacing)


def _plan_patch(inputs: PlanInputs, spacing: Sequence[float], median: Sequence[float],
                patch_size: Sequence[int] | None) -> network.PatchPlan:
    """Step 2: patch and topology under the memory budget, or the deepest topology of a given patch."""
    # also fails a budget too small for any patch
    patch_plan = inputs.fit_patch(spacing, median, budget_text=inputs.budget_text)
    if patch_size is not None:
        patch_plan = _fixed_patch(patch_size, spacing, inputs.in_channels, inputs.num_classes, inputs.base,
                                  inputs.max_stages, inputs.blocks)
    return patch_plan


def _record_network(plan: Plan, inputs: PlanInputs, patch_plan: network.PatchPlan) -> None:
    """The network's choices: patch, stages, strides, kernels, features (and residual blocks)."""
    topo, spec, c = patch_plan.topology, patch_plan.spec, plan.choices
    c["patch_size"] = Choice(list(topo.patch_size), patch_plan.reason)
    c["stages"] = Choice(topo.num_stages, f"{topo.num_stages}: the axes pool while they have >= {2 * network.MIN_EDGE} "
                                          f"voxels (pools per axis {shape_text(topo.pools_per_axis)}), "
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


def _plan_batch(plan: Plan, inputs: PlanInputs, patch_plan: network.PatchPlan, median: Sequence[float],
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


def _plan_data(plan: Plan, inputs: PlanInputs, patch_plan: network.PatchPlan, median: Sequence[float]) -> None:
    """Step 5: normalisation, sampling, validation, loss."""
    c = plan.choices
    c["normalization"] = rules.plan_normalization(inputs.channel_names or ["image"] * inputs.in_channels)
    c["foreground_fraction"] = rules.plan_foreground_fraction(inputs.classes)
    ratio = patches_per_case(median, patch_plan)
    if ratio <= WHOLE_VALIDATION_MAX_RATIO:
        c["validation"] = Choice("whole",
                                 f"whole: a median case is {ratio:.1f} patches, cheap to predict whole each epoch")
    else:
        c["validation"] = Choice("patches",
                                 f"patches: a median case is {ratio:.0f} patches, too slow and large to predict "
                                            f"whole every epoch; whole volumes only in the final evaluation")
    c["loss"] = rules.plan_loss(inputs.classes)
    c["mirror_axes"] = rules.plan_mirror_axes(inputs.cases, {k: v.get("name", k) for k, v in inputs.classes.items()})


def _plan_config(plan: Plan, patch_plan: network.PatchPlan, spacing: Sequence[float], inputs: PlanInputs,
                 batch: int) -> dict[str, Any]:
    """The config keys the plan sets (dotted key -> value)."""
    c = plan.choices
    config = config_keys(patch_plan, spacing, inputs.model, inputs.blocks, batch=batch)
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
                                   f"{shape_text(patch_size)}: given (data.patch_size); {stages} stages divide it")
    raise AssertionError(expected("a stage count that divides the patch (1 stage always does)", key="data.patch_size",
                                  received=list(patch_size)))  # unreachable
