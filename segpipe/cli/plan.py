"""``segpipe-plan DATASET`` (and ``train.py --plan-only``): plan a run for a dataset on this machine.

    segpipe-plan PATH/TO/DATASET [--set KEY=VALUE ...] [--config FILE] [--out DIR]
                 [--memory-gib X] [--device cpu|gpu] [--time-budget-minutes T] [--model unet3d|resenc_unet]

Fingerprints the dataset (cached), plans spacing, patch, network, batch, normalisation, sampling
and loss (docs/planning.md), prints every choice with its reason and writes ``plan.json`` and a
complete, editable ``plan.yaml`` (train with ``python train.py --config plan.yaml``). Keys given
with ``--set`` (or set in ``--config FILE`` beyond configs/base.yaml) win over the plan.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from segpipe.errors import expected
from segpipe.cli import prog_name
from segpipe.config import ConfigError, apply_overrides, read_yaml_with_extends
from segpipe.data.pipeline import DataError
from segpipe.planning.run import PlanResult, flatten, plan_config


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
