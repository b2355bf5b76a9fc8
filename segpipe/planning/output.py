"""Write a plan: ``plan.json`` (choices, reasons, predictions, measurements) and a complete YAML config.

The YAML is the full resolved config with the plan's keys applied, each planned key followed by a
comment with its reason, and a header table of every choice, so a user can read it, edit it and
train with ``python train.py --config plan.yaml``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from segpipe.io import write_json, write_text
from segpipe.planning.planner import Plan

# which choice explains which config key
KEY_REASONS = {
    "data.target_spacing_mm": "spacing", "data.patch_size": "patch_size", "data.batch_size": "batch_size",
    "data.normalization": "normalization", "data.foreground_fraction": "foreground_fraction",
    "data.validation": "validation", "model.depth": "stages", "model.base_filters": "features",
    "model.strides": "strides", "model.kernel_sizes": "kernel_sizes", "model.blocks_per_stage": "blocks_per_stage",
    "train.epochs": "schedule", "train.steps_per_epoch": "schedule", "inference.overlap": "inference_overlap",
    "inference.mirror_axes": "inference_mirror_axes", "loss": "loss", "data.augment.mirror.axes": "mirror_axes",
    "train.max_train_minutes": "time_limit", "train.precision": "precision",
}


def apply_plan(config: dict[str, Any], plan: Plan, *, keep: set[str] = frozenset()) -> dict[str, Any]:
    """``config`` (a nested dict) with the plan's keys set, except the dotted keys in ``keep`` (explicit settings win)."""
    out = _copy(config)
    for key, value in plan.config.items():
        # an explicit key wins over a planned key it lies in or under (loss.name=... keeps the user's loss)
        if key in keep or any(key.startswith(k + ".") or k.startswith(key + ".") for k in keep):
            continue
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def render_yaml(config: dict[str, Any], plan: Plan) -> str:
    """The config as YAML, a header with the plan's table, and the reason beside every planned key."""
    header = ["# segpipe plan: every choice and its reason (segpipe/planning, docs/planning.md).",
              f"# dataset: {plan.dataset}", f"# hardware: {plan.hardware.get('description', '')}", "#"]
    header += [f"#   {line}" for line in plan.table().splitlines()]
    header += ["#", "# Edit any key and train with: python train.py --config THIS_FILE", ""]
    body = yaml.safe_dump(config, sort_keys=False, default_flow_style=None, width=120).splitlines()
    out, path = [], []
    for line in body:
        stripped = line.lstrip(" ")
        indent = (len(line) - len(stripped)) // 2
        if ":" in stripped and not stripped.startswith("- "):
            key = stripped.split(":", 1)[0]
            path = path[:indent] + [key]
            dotted = ".".join(path)
            choice = KEY_REASONS.get(dotted)
            if dotted in plan.config and choice in plan.choices and _value_of(config, dotted) == plan.config[dotted]:
                line = f"{line}  # planned: {plan.choices[choice].reason.splitlines()[0]}"
        out.append(line)
    return "\n".join(header + out) + "\n"


def _value_of(config: dict[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def write_plan(folder: str | Path, plan: Plan, config: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``plan.json`` and ``plan.yaml`` into ``folder`` (atomically); returns both paths."""
    folder = Path(folder)
    json_path, yaml_path = folder / "plan.json", folder / "plan.yaml"
    write_json(json_path, plan.to_dict())
    write_text(yaml_path, render_yaml(config, plan))
    return json_path, yaml_path
