"""Plan a dataset end to end: open it, fingerprint it (cached), plan, merge into the config, write the files.

Used by ``segpipe-plan DATASET``, ``python train.py --plan-only`` and by training when it plans
(``python train.py --set data.root=DIR``). Keys the user set explicitly (``--set`` and their own
config files) always win over the plan; the choices that depend on them follow them (a given patch
gets a topology that divides it, a given spacing is planned at).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from segpipe.config import Config, from_dict
from segpipe.data.layouts import Dataset
from segpipe.data.pipeline import (dataset_cache_dir, open_dataset, read_split_file, resolve_settings, run_integrity_check,
                                   run_label_check)
from segpipe.planning.fingerprint import load_or_compute_fingerprint
from segpipe.planning.hardware import detect_hardware
from segpipe.planning.output import apply_plan, write_plan
from segpipe.planning.planner import Plan, make_plan
from segpipe.planning.timing import time_case, time_steps


@dataclass
class PlanResult:
    plan: Plan
    config: dict[str, Any]  # the full config dict with the plan applied
    json_path: Path
    yaml_path: Path


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (``loss`` stays one value: it is replaced whole)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value and dotted != "loss":
            out.update(flatten(value, f"{dotted}."))
        else:
            out[dotted] = value
    return out


def _get(data: dict[str, Any], dotted: str, default: Any = None) -> Any:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def plan_config(
    config: dict[str, Any],
    *,
    explicit: Iterable[str] = (),
    out_dir: str | Path | None = None,
    memory_gib: float | None = None,
    device: str | None = None,
    progress: bool = True,
    step_timer: Any = None,
    case_timer: Any = None,
) -> PlanResult:
    """Plan the dataset of ``config`` (a merged config dict) and return the config with the plan applied.

    ``explicit``: dotted keys the user set; they keep their values and fix the plan's inputs.
    The fingerprint is the dataset cache's ``fingerprint.json`` (computed once). ``plan.json`` and
    ``plan.yaml`` go to ``out_dir`` (default: the dataset's cache folder). With
    ``train.time_budget_minutes`` set, real training steps are timed (``step_timer`` or
    :func:`segpipe.planning.timing.time_steps`), and, with the real step timer (or ``case_timer``), one
    median case is predicted as the final evaluation will predict it (:func:`segpipe.planning.timing.time_case`).
    """
    explicit = set(explicit)
    light = {k: config[k] for k in ("data", "output_dir", "seed") if k in config}
    base = from_dict(Config, light)  # only the sections opening the dataset needs
    dataset = open_dataset(base.data)
    # the checks training would run, before anything is read into the cache
    run_integrity_check(dataset, base.data.check, workers=base.data.preprocess_workers, progress=progress)
    cache = dataset_cache_dir(base, dataset)
    fingerprint = load_or_compute_fingerprint(dataset, cache / "fingerprint.json",
                                              workers=base.data.preprocess_workers, progress=progress)
    run_label_check(dataset, fingerprint, base.data.check)
    n_val = None
    if base.data.split_file is not None:
        n_val = len(read_split_file(base.data.split_file)["val"])

    def given(key: str) -> Any:
        return _get(config, key) if key in explicit else None

    budget = _get(config, "train.time_budget_minutes")
    timer = step_timer
    if budget is not None and timer is None:
        timer = time_steps
        if case_timer is None:
            case_timer = median_case_timer(base, dataset, fingerprint, normalization=given("data.normalization"))
    hardware = detect_hardware(memory_gib=memory_gib, device=device)
    plan = make_plan(
        fingerprint, hardware=hardware, model=_get(config, "model.name", "unet3d"),
        time_budget_minutes=budget, step_timer=timer, num_val_cases=n_val,
        val_fraction=base.data.val_fraction,
        max_stages=given("model.depth") or 6, base_features=given("model.base_filters"),
        spacing_mm=given("data.target_spacing_mm"), patch_size=given("data.patch_size"),
        batch_size=given("data.batch_size"), precision=_get(config, "train.precision", "auto"),
        case_timer=case_timer if budget is not None else None,
    )
    depth = given("model.depth")
    if depth is not None and depth != plan.config["model.depth"]:
        # the planned per-stage lists would not match the given depth: keep the isotropic defaults
        for key in ("model.strides", "model.kernel_sizes", "model.blocks_per_stage"):
            plan.config.pop(key, None)
    # an explicit train.precision=auto asks the plan to decide: the plan's timed choice replaces it
    keep = explicit - {"train.precision"} if _get(config, "train.precision") == "auto" else explicit
    merged = apply_plan(config, plan, keep=keep)
    json_path, yaml_path = write_plan(out_dir if out_dir is not None else cache, plan, merged)
    return PlanResult(plan, merged, json_path, yaml_path)


def median_case(fingerprint: dict[str, Any]) -> str:
    """The case id of the median original size (voxels) in the fingerprint (the lower median)."""
    cases = fingerprint["cases"]
    ordered = sorted(cases, key=lambda c: (int(np.prod(cases[c]["shape"])), c))
    return ordered[(len(ordered) - 1) // 2]


def median_case_timer(base: Config, dataset: Dataset, fingerprint: dict[str, Any], *, normalization: Any = None):
    """The planner's ``case_timer``: predict :func:`median_case` with the planned network and preprocessing
    (``normalization``: the user's, else the plan's) at overlap 0.5 without mirroring, then time training
    loop steps on that case (the planned batch, sampling and augmentation through the tf.data loader), in
    a subprocess."""

    def timer(keys: dict[str, Any]) -> dict[str, Any]:
        data = dataclasses.replace(base.data, target_spacing_mm=list(keys["data.target_spacing_mm"]),
                                   normalization=normalization if normalization is not None else keys["data.normalization"])
        settings = resolve_settings(data, fingerprint)
        augment = dict(base.data.augment)
        augment["mirror"] = {**dict(augment.get("mirror") or {}), "axes": list(keys["data.augment.mirror.axes"])}
        loop = {"batch_size": keys["data.batch_size"], "foreground_fraction": keys["data.foreground_fraction"],
                "augment": augment, "num_workers": base.data.num_workers}
        return time_case({"keys": keys, "root": str(Path(dataset.root).resolve()), "layout": dataset.layout,
                          "case_id": median_case(fingerprint), "preprocessing": settings.to_dict(),
                          "inference": {"overlap": 0.5, "mirror_axes": []}, "loop": loop})

    return timer
