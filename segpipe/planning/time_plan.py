"""The planning steps of a time budget: the timed network, its precision, the division of a k-fold
command's budget, and the schedule and inference settings fitted to measured steps.

:func:`segpipe.planning.planner.make_plan` calls them in order when it is given a budget and a step timer.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Sequence

from segpipe.errors import Received, expected
from segpipe.planning import network, rules
from segpipe.planning.plan import CaseTimer, Plan, PlanInputs, StepTimer, config_keys, patches_per_case
from segpipe.planning.rules import Choice

MAX_TIMINGS = 3  # timings of the planned network: a step much slower than predicted re-plans once or twice
MIN_TOTAL_STEPS = 1000  # a time budget shrinks the patch until at least this many training steps fit
FINAL_EVAL_SHARE = 0.15  # of the budget for the final sliding-window evaluation of the validation cases
# start-up, preprocessing of a cached dataset, export: kept free when the patch is fitted to the budget and,
# once per command, when a k-fold budget is divided (a single run's schedule keeps RUN_MARGIN_SECONDS)
MARGIN_SECONDS = 120.0
# k-fold with a time budget (the whole command): the ensemble at the end (copying the out-of-fold
# predictions, choosing post-processing on them, one bundle of every fold) is kept free too
ENSEMBLE_SECONDS = 60.0
ENSEMBLE_SECONDS_PER_FOLD = 20.0
EXPORT_SECONDS = 30.0  # a run's bundle export, kept free after its training
# each fold after the first trains in the same process (no new start-up, the cache is built): only its
# bundle export is kept free per fold; the command's start-up margin is kept once
FOLD_MARGIN_SECONDS = EXPORT_SECONDS
# A single run's schedule keeps free its start-up besides the timings (imports, the dataset's fingerprint, a
# cached dataset's check, the model's build) and its export: 30 s each. The whole MARGIN_SECONDS left a
# 10-minute hippocampus run at 75 % of its budget (start-up, caching and export took 23 s of the 120 kept).
# Training's allowance is measured again when the run starts (segpipe.cli.train), so a start-up slower
# than this (a large dataset's fingerprint) shortens training instead of overrunning the budget.
START_UP_SECONDS = 30.0
RUN_MARGIN_SECONDS = START_UP_SECONDS + EXPORT_SECONDS
# k-fold under a small budget trains K short networks: measured on the hippocampus (docs/planning.md, "Folds
# or one network"), 5 folds of ~1,700 steps each in 60 min (CPU) predicted the held-out cases worse than one
# network trained for the whole 60 min (~8,600 steps). Below this many planned steps per fold the plan advises
# one network; where the crossover lies is not measured (2.8x the measured fold's steps).
FOLD_STEPS_ADVISED = 5000
# The training loop's step is slower than an isolated train_on_batch (the tf.data loader sampling and
# augmenting on the same cores, metrics, per-step bookkeeping): measured here 0.27 s per loop step
# (median of epochs 2-8) against 0.13 s timed in isolation for a 40×40×10 patch; 0.40 against
# 0.36 s for the hippocampus recipe (docs/planning.md, "The time budget").
LOOP_OVERHEAD_SECONDS = 0.15
LOOP_STEP_FACTOR = 1.1
EPOCH_OVERHEAD_SECONDS = 2.0  # per epoch: checkpoint, history row, loader restart


def fit_time_budget(plan: Plan, inputs: PlanInputs, spacing: Sequence[float], median: Sequence[float],
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
    ref = step_timer({**config_keys(network.PatchPlan(ref_topo, ref_spec, 0), [1.0, 1.0, 1.0], "unet3d", None,
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
        timed = step_timer({**config_keys(patch_plan, spacing, inputs.model, inputs.blocks, batch=timer_batch),
                            **shape_keys})
        attempts.append({"patch_size": list(patch_plan.topology.patch_size), "predicted_step_seconds": predicted_step,
                         "step_seconds": timed["step_seconds"]})
        if patch_size is not None or timed["step_seconds"] <= 1.1 * max_step:
            break
        # slower than predicted (a less efficient network, or a busy machine): calibrate on this one
        seconds_per_flop = timed["step_seconds"] / flops
    plan.predicted["step_seconds"] = predicted_step
    return patch_plan, timed


def time_precisions(plan: Plan, inputs: PlanInputs, spacing: Sequence[float], patch_plan: network.PatchPlan,
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
    keys = {**config_keys(patch_plan, spacing, inputs.model, inputs.blocks, batch=timer_batch),
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


def clocked(timer: Callable[[dict[str, Any]], dict[str, Any]], total: list[float]):
    """``timer`` adding its calls' wall time to ``total[0]``."""
    def clocked(keys: dict[str, Any]) -> dict[str, Any]:
        start = time.monotonic()
        try:
            return timer(keys)
        finally:
            total[0] += time.monotonic() - start

    return clocked


def ensemble_seconds(folds: int) -> float:
    return ENSEMBLE_SECONDS + ENSEMBLE_SECONDS_PER_FOLD * folds


def run_budget_minutes(budget_minutes: float, folds: int | None, spent_seconds: float) -> float:
    """The minutes one run is planned for: the whole budget, or a fold's share of what the timings
    (``spent_seconds``) and the ensemble leave."""
    if folds is None:
        return budget_minutes
    return (budget_minutes * 60 - spent_seconds - ensemble_seconds(folds) - MARGIN_SECONDS) / folds / 60


def plan_folds(plan: Plan, budget_minutes: float, folds: int, spent_seconds: float) -> float:
    """Step 5b, k-fold with a time budget: divide the command's budget; returns one fold's minutes."""
    share = run_budget_minutes(budget_minutes, folds, spent_seconds)
    ensemble = ensemble_seconds(folds)
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


def plan_time(plan: Plan, inputs: PlanInputs, patch_plan: network.PatchPlan, median: Sequence[float],
               timed: dict[str, float], *, budget_minutes: float, batch: int, timer_batch: int,
               case: dict[str, Any] | None = None, spent_seconds: float = 0.0,
               margin_seconds: float = RUN_MARGIN_SECONDS) -> None:
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
        val_seconds = inputs.num_val * max(1.0, patches_per_case(median, patch_plan)) * window
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


def plan_budget(plan: Plan, inputs: PlanInputs, patch_plan: network.PatchPlan, spacing: Sequence[float],
                median: Sequence[float], timed: dict[str, float], *, budget_minutes: float, folds: int | None,
                batch: int, timer_batch: int, case_timer: CaseTimer | None, timers_seconds: list[float]) -> None:
    """Steps 5b and 6, with a time budget: time a whole median case (``case_timer``), divide a k-fold command's
    budget, then fit the schedule and the inference settings (:func:`plan_time`).

    ``timed`` is the planned network's step timing in the chosen precision; ``timers_seconds[0]`` the running
    wall time of the timings (spent from the budget; ``case_timer`` adds its own, see :func:`clocked`).
    """
    case = None
    if case_timer is not None:
        keys = {**config_keys(patch_plan, spacing, inputs.model, inputs.blocks, batch=batch),
                "train.precision": plan.choices["precision"].value,
                "data.normalization": plan.choices["normalization"].value,
                "data.foreground_fraction": plan.choices["foreground_fraction"].value,
                "data.augment.mirror.axes": list(plan.choices["mirror_axes"].value),
                "loss": plan.choices["loss"].value,
                "_in_channels": inputs.in_channels, "_num_classes": inputs.num_classes}
        case = case_timer(keys)
    plan.measured["timing_seconds"] = timers_seconds[0]
    run_budget, spent = budget_minutes, timers_seconds[0]
    if folds is not None:
        run_budget, spent = plan_folds(plan, budget_minutes, folds, spent), 0.0
    try:
        plan_time(plan, inputs, patch_plan, median, timed, budget_minutes=run_budget, batch=batch,
                  timer_batch=timer_batch, case=case, spent_seconds=spent,
                  margin_seconds=RUN_MARGIN_SECONDS if folds is None else FOLD_MARGIN_SECONDS)
    except rules.BudgetTooSmall as exc:
        if folds is None:
            raise
        # the schedule's message names a fold's share as if it were the budget: name the budget
        raise ValueError(expected(
            f"at least {exc.need_minutes:.1f} minutes per fold for one step, one validation and the fold's "
            "evaluation",
            key="train.time_budget_minutes",
            received=Received(f"{budget_minutes:g} ({run_budget:.1f} min per fold of {folds}, after the "
                              f"timings and the ensemble)"),
            hint=f"Give a larger budget, or fewer folds than {folds}.")) from exc
    if folds is not None:
        plan_folds_advice(plan, folds, budget_minutes)


def plan_folds_advice(plan: Plan, folds: int, budget_minutes: float) -> None:
    """k-fold with a time budget: advise one network instead when a fold's planned steps are few
    (:data:`FOLD_STEPS_ADVISED`); the folds still run (advice, not a refusal)."""
    schedule = plan.choices["schedule"].value
    steps = int(schedule["epochs"]) * int(schedule["steps_per_epoch"])
    if steps >= FOLD_STEPS_ADVISED:
        plan.choices["folds_advice"] = Choice("folds", f"folds: {steps} planned steps per fold (at least "
                                                       f"{FOLD_STEPS_ADVISED}); the ensemble of {folds} is worth it")
        return
    plan.choices["folds_advice"] = Choice(
        "one network",
        f"one network: {folds} folds of {steps} planned steps each in {budget_minutes:g} min. Under a budget this "
        f"small one network trained for all of it is likely better: on the hippocampus (CPU, 60 min) 5 folds of "
        f"~1,700 steps scored a mean Dice of 0.877 on 40 held-out cases against 0.884 for one network "
        f"(Wilcoxon p = 0.002, docs/planning.md). Drop --folds, or give at least {FOLD_STEPS_ADVISED} steps per fold")

