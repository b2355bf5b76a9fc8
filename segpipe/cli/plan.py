"""``segpipe-plan DATASET`` (and ``train.py --plan-only``): plan a run for a dataset on this machine.

    segpipe-plan PATH/TO/DATASET [--set KEY=VALUE ...] [--config FILE] [--out DIR]
                 [--memory-gib X] [--device cpu|gpu] [--time-budget-minutes T] [--model unet3d|resenc_unet]

Fingerprints the dataset (cached), plans spacing, patch, network, batch, normalisation, sampling
and loss (docs/planning.md), prints every choice with its reason and writes ``plan.json`` and a
complete, editable ``plan.yaml`` (train with ``python train.py --config plan.yaml``). Keys given
with ``--set`` (or set in ``--config FILE`` beyond configs/base.yaml) win over the plan.

:func:`plan_config` plans a merged config dict end to end (open the dataset, fingerprint it, plan,
merge into the config, write the files); it lives here, above ``config`` and ``data``, because the
``planning`` package holds only the pure rules that ``data`` uses too (docs/architecture.md).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from segpipe.cli import prog_name
from segpipe.config import Config, ConfigError, apply_overrides, model_divisor, read_yaml_with_extends
from segpipe.data.fingerprint import load_or_compute_fingerprint
from segpipe.data.layouts import Dataset
from segpipe.data.pipeline import (
    DataError,
    dataset_cache_dir,
    open_dataset,
    read_split_file,
    resolve_settings,
    run_integrity_check,
    run_label_check,
)
from segpipe.errors import expected
from segpipe.planning.hardware import detect_hardware
from segpipe.planning.output import apply_keys, apply_plan, write_plan
from segpipe.planning.plan import Plan
from segpipe.planning.planner import make_plan
from segpipe.planning.rules import Choice
from segpipe.planning.timing import time_steps
from segpipe.training.case_timing import time_case


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
    median case is predicted as the final evaluation will predict it (:func:`segpipe.training.case_timing.time_case`).
    """
    explicit = set(explicit)
    light = {k: config[k] for k in ("data", "output_dir", "seed") if k in config}
    base = Config.from_dict(light)  # only the sections opening the dataset needs
    dataset = open_dataset(base.data)
    # the checks training would run, before anything is read into the cache
    run_integrity_check(dataset, base.data.check, workers=base.data.preprocess_workers, progress=progress)
    cache = dataset_cache_dir(base, dataset)
    fingerprint = load_or_compute_fingerprint(dataset, cache / "fingerprint.json",
                                              workers=base.data.preprocess_workers, progress=progress)
    run_label_check(dataset, fingerprint, base.data.check)
    n_val, folds = None, base.data.folds
    if base.data.split_file is not None:
        fixed = read_split_file(base.data.split_file)
        # with folds, a fold validates on its share of the file's train cases (the file's val cases are held out)
        n_val = max(1, round(len(fixed["train"]) / folds)) if folds else len(fixed["val"])

    def given(key: str) -> Any:
        return _get(config, key) if key in explicit else None

    source = source_plan_keys(_get(config, "train.init_from"), explicit)
    explicit |= set(source)  # the source's network and normalisation are fixed inputs of this plan
    config = apply_keys(config, source)

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
        case_timer=case_timer if budget is not None else None, folds=folds,
    )
    if source:
        _plan_like_source(plan, source, _get(config, "train.init_from"))
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


# the keys "plan like the source" takes from a bundle's network description (builder argument -> config key)
SOURCE_MODEL_KEYS = {"depth": "model.depth", "base_filters": "model.base_filters", "max_filters": "model.max_filters",
                     "norm": "model.norm", "strides": "model.strides", "kernel_sizes": "model.kernel_sizes",
                     "convs_per_stage": "model.convs_per_stage", "blocks_per_stage": "model.blocks_per_stage",
                     "deep_supervision": "model.deep_supervision"}


def source_plan_keys(init_from: str | None, explicit: Iterable[str] = ()) -> dict[str, Any]:
    """"Plan like the source": the config keys of ``train.init_from``'s network (builder, topology, width,
    normalisation layers) and intensity normalisation, when it is a segpipe bundle (or a run with one),
    less the ``explicit`` keys. ``{}`` for no source, another kind of source or an ensemble.

    Raises
    ------
    ValueError
        The bundle does not read (:func:`segpipe.inference.bundle.read_bundle`'s checks), naming the key.
    """
    from segpipe.inference.bundle import read_bundle  # the bundle is read as predict.py reads it: no code runs

    if init_from is None:
        return {}
    folder = Path(init_from)
    if not (folder / "bundle.json").is_file() and (folder / "bundle" / "bundle.json").is_file():
        folder = folder / "bundle"  # a run directory: its bundle
    if not (folder / "bundle.json").is_file():
        return {}
    bundle = read_bundle(folder)
    architecture = bundle.architecture
    if architecture is None or architecture["builder"] not in ("unet3d", "resenc_unet"):
        return {}
    normalization = bundle.preprocessing.normalization  # one scheme, or a tuple of one per channel
    keys = {"model.name": architecture["builder"],
            "data.normalization": list(normalization) if isinstance(normalization, tuple) else normalization}
    for arg, key in SOURCE_MODEL_KEYS.items():
        if arg in architecture["args"]:
            keys[key] = architecture["args"][arg]  # check_architecture made them plain ints and lists
        elif arg in ("strides", "kernel_sizes"):
            keys[key] = None  # the builder's default (stride 2, kernel 3 at every stage), not this plan's
    explicit = set(explicit)
    return {k: v for k, v in keys.items() if k not in explicit and not any(k.startswith(e + ".") for e in explicit)}


def _plan_like_source(plan: Plan, source: dict[str, Any], init_from: str) -> None:
    """The plan keeps the source's network (``source``: config keys) and rounds the patch to what it divides."""
    for key, value in source.items():
        plan.config[key] = value
    divisor = model_divisor(int(source.get("model.depth", plan.config["model.depth"])), source.get("model.strides"))
    patch = [int(p) for p in plan.config["data.patch_size"]]
    rounded = [max(d, -(-p // d) * d) for p, d in zip(patch, divisor)]
    plan.config["data.patch_size"] = rounded
    kept = ", ".join(f"{k}={v}" for k, v in source.items())
    plan.choices["plan_like_source"] = Choice(
        sorted(source), f"train.init_from={init_from} is a segpipe bundle: its network and normalisation are kept "
                        f"({kept}); the rest is planned for this dataset"
                        + (f"; the patch {patch} is rounded up to {rounded} (divisible by the source's "
                           f"down-sampling {list(divisor)})" if rounded != patch else ""))


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
                                   normalization=(normalization if normalization is not None
                                                  else keys["data.normalization"]))
        settings = resolve_settings(data, fingerprint)
        augment = dict(base.data.augment)
        augment["mirror"] = {**dict(augment.get("mirror") or {}), "axes": list(keys["data.augment.mirror.axes"])}
        loop = {"batch_size": keys["data.batch_size"], "foreground_fraction": keys["data.foreground_fraction"],
                "augment": augment, "num_workers": base.data.num_workers}
        return time_case({"keys": keys, "root": str(Path(dataset.root).resolve()), "layout": dataset.layout,
                          "case_id": median_case(fingerprint), "preprocessing": settings.to_dict(),
                          "inference": {"overlap": 0.5, "mirror_axes": []}, "loop": loop})

    return timer


def base_config_path() -> Path:
    """``configs/base.yaml`` of the source checkout, else of the working directory."""
    candidates = [Path(__file__).resolve().parents[2] / "configs" / "base.yaml", Path("configs") / "base.yaml"]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(expected(f"configs/base.yaml at {' or '.join(str(p) for p in candidates)}", key="--config",
                                     received=None, hint="Neither exists: pass --config FILE."))


def planned_config(config_path: str | None, overrides: list[str], *, out_dir: str | Path | None = None,
                   memory_gib: float | None = None, device: str | None = None, progress: bool = True) -> PlanResult:
    """Plan the dataset of ``config_path`` (default: configs/base.yaml) with ``overrides``; returns a PlanResult.

    Explicit keys: every ``--set`` key, and every key of the config file whose value differs from
    configs/base.yaml. Without an explicit ``name`` the run is named after the dataset folder.
    """
    data, explicit = _plan_input(config_path, overrides)
    return plan_config(data, explicit=explicit, out_dir=out_dir, memory_gib=memory_gib, device=device,
                       progress=progress)


def planned_run_name(config_path: str | None, overrides: list[str]) -> str:
    """The run name :func:`planned_config` gives the plan (reads the config files only; plans nothing)."""
    return str(_plan_input(config_path, overrides)[0]["name"])


def _plan_input(config_path: str | None, overrides: list[str]) -> tuple[dict[str, Any], set[str]]:
    """The config mapping to plan and its explicit keys (see :func:`planned_config`)."""
    base = read_yaml_with_extends(base_config_path())
    explicit = {item.partition("=")[0] for item in overrides}
    data: dict[str, Any] = base
    if config_path is not None:
        data = read_yaml_with_extends(config_path)
        flat_base = flatten(base)
        explicit |= {k for k, v in flatten(data).items() if k not in flat_base or flat_base[k] != v}
    data = apply_overrides(data, overrides)
    if "name" not in explicit:
        root = (data.get("data") or {}).get("root")
        data["name"] = Path(config_path).stem if config_path is not None else Path(str(root)).name or "plan"
    return data, explicit


def report(result: PlanResult) -> str:
    """The printed summary: the table of choices and where the files are."""
    lines = [f"Plan for {result.plan.dataset} ({result.plan.hardware.get('description', '')}):", "",
             result.plan.table(), ""]
    if result.plan.measured:
        m, p = result.plan.measured, result.plan.predicted
        lines.append(f"measured on this machine: {m['step_seconds']:.2f} s per training step (predicted "
                     f"{p['step_seconds']:.2f} s), peak {m['peak_bytes'] / 2**30:.2f} GiB (estimated "
                     f"{p['memory_bytes_batch2'] / 2**30:.2f} GiB at batch 2)")
    lines += [f"wrote {result.json_path}", f"wrote {result.yaml_path}",
              f"train with: python train.py --config {result.yaml_path}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``segpipe-plan``: 0 when the plan was written, 2 for a bad config or dataset."""
    parser = argparse.ArgumentParser(prog=prog_name("plan"), description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", type=Path, help="dataset folder (MSD, nnU-Net v2 raw, or images/ + labels/)")
    parser.add_argument("--config", help="start from this config instead of configs/base.yaml")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="keys that win over the plan")
    parser.add_argument("--out", type=Path, help="folder for plan.json and plan.yaml (default: the dataset cache)")
    parser.add_argument("--memory-gib", type=float, help="memory budget of a training step (default: detected)")
    parser.add_argument("--device", choices=("cpu", "gpu"), help="plan for this device (default: detected)")
    parser.add_argument("--time-budget-minutes", type=float, help="fit training and evaluation into this time "
                        "(times real steps on this machine; same as --set train.time_budget_minutes=T)")
    parser.add_argument("--model", choices=("unet3d", "resenc_unet"), help="network (same as --set model.name=...)")
    args = parser.parse_args(argv)
    overrides = [f"data.root={json.dumps(str(args.dataset))}", *args.set]
    if args.time_budget_minutes is not None:
        overrides.append(f"train.time_budget_minutes={args.time_budget_minutes}")
    if args.model is not None:
        overrides.append(f"model.name={args.model}")
    return run(args.config, overrides, out_dir=args.out, memory_gib=args.memory_gib, device=args.device)


def run(config_path: str | None, overrides: list[str], **kwargs: Any) -> int:
    """Plan and print; the exit code (0 written, 2 a config, dataset or budget error)."""
    try:
        result = planned_config(config_path, overrides, **kwargs)
    except (ConfigError, DataError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report(result))
    return 0


def console() -> None:
    """Console script ``segpipe-plan``."""
    sys.exit(main())


if __name__ == "__main__":
    console()
