"""Write a plan: ``plan.json`` (choices, reasons, predictions, measurements) and a complete YAML config.

The YAML is the full resolved config with the plan's keys applied, each planned key followed by a
comment with its reason, and a header table of every choice, so a user can read it, edit it and
train with ``python train.py --config plan.yaml``.
"""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Sequence

import yaml

from segpipe.io import write_json, write_text
from segpipe.planning.plan import Plan

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
    """``config`` (a nested dict) with the plan's keys set, except the dotted keys in ``keep`` (explicit settings
    win)."""
    return apply_keys(config, plan.config, keep=keep)


def apply_keys(config: dict[str, Any], keys: dict[str, Any], *, keep: set[str] = frozenset()) -> dict[str, Any]:
    """A copy of ``config`` (a nested dict) with the dotted ``keys`` set, except those in or under ``keep``."""
    out = _copy(config)
    for key, value in keys.items():
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


def budget_report(plan: dict[str, Any], *, epoch_seconds: Sequence[float], final_evaluation_seconds: float | None,
                  command_seconds: float, budget_minutes: float) -> dict[str, Any]:
    """Predicted against measured, per part of a time-budgeted command (``RUN_DIR/budget.json``).

    Parameters
    ----------
    plan : the ``plan.json`` the run was planned with (:meth:`Plan.to_dict`).
    epoch_seconds : the run's measured epochs (``epoch_times.csv``; validation included).
    final_evaluation_seconds : the measured final evaluation (None: not run).
    command_seconds : the whole command, planning included.
    budget_minutes : ``train.time_budget_minutes``.

    Returns
    -------
    dict
        ``parts``: ``{part: {"predicted", "measured"}}`` in seconds (epochs as counts), ``within_budget``,
        and the plan's ``precision``.
    """
    predicted, config = plan.get("predicted", {}), plan.get("config", {})
    epochs, steps = config.get("train.epochs"), config.get("train.steps_per_epoch")
    epoch = None
    if steps is not None and "loop_step_seconds" in predicted:
        epoch = steps * predicted["loop_step_seconds"] + predicted.get("validation_seconds", 0.0)
    measured_epoch = statistics.median(epoch_seconds) if epoch_seconds else None
    parts = {
        "epochs": {"predicted": epochs, "measured": len(epoch_seconds)},
        "epoch_seconds": {"predicted": epoch, "measured": measured_epoch},
        "training_seconds": {"predicted": epoch * epochs if epoch is not None and epochs else None,
                             "measured": float(sum(epoch_seconds))},
        "final_evaluation_seconds": {"predicted": predicted.get("final_evaluation_seconds"),
                                     "measured": final_evaluation_seconds},
        "command_seconds": {"predicted": budget_minutes * 60.0, "measured": command_seconds},
    }
    precision = (plan.get("choices", {}).get("precision") or {}).get("value")
    return {"budget_minutes": budget_minutes, "within_budget": command_seconds <= budget_minutes * 60.0,
            "precision": precision, "parts": parts}


def budget_line(report: dict[str, Any]) -> str:
    """One printed line of :func:`budget_report`: each part's measured against predicted minutes."""
    def minutes(part: str) -> str:
        values = report["parts"][part]
        fmt = [f"{v / 60:.1f}" if isinstance(v, (int, float)) else "?"
               for v in (values["measured"], values["predicted"])]
        return f"{fmt[0]} (planned {fmt[1]})"

    return (f"Time budget: {minutes('command_seconds')} min in all"
            f"{'' if report['within_budget'] else ' — OVER BUDGET'}; training {minutes('training_seconds')}, "
            f"final evaluation {minutes('final_evaluation_seconds')} min; precision {report['precision']}")
