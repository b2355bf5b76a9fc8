"""Ablation of the hippocampus recipe: train short variants of it in turn and tabulate Dice and time.

    python benchmarks/hippocampus_ablation.py                       # every variant, 800 steps each
    python benchmarks/hippocampus_ablation.py --only base depth3    # some of them
    python benchmarks/hippocampus_ablation.py --table               # print the table of finished variants

Each variant is ``configs/hippocampus_recipe.yaml`` turned back into the starting point (``BASE``)
plus a few ``--set`` overrides of its own, with a shorter schedule (``--steps`` training steps at
batch 2; variants with a costlier step get fewer steps so that each trains for about the same wall
time). A variant trains into ``runs/hippocampus_ablation/<name>``
and is then evaluated like the recipe (sliding window, mirroring) on the same 40 validation cases.
Wall times (training incl. per-epoch validation, and evaluation) are written next to the run in
``ablation_time.json``; the table (docs/hippocampus.md) is printed at the end.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from segpipe.io import read_json, write_json  # noqa: E402  (no TensorFlow: the runs are subprocesses)

CONFIG = ROOT / "configs" / "hippocampus_recipe.yaml"
EXPERIMENT = "hippocampus_ablation"

# The starting point, written out against the recipe (which holds the winning settings): nnU-Net's
# choices for this dataset where they apply, and segpipe's default (nnU-Net-style) augmentation.
NNUNET_STYLE_AUGMENT = {"rotation": 0.2, "scaling": 0.2, "gamma": 0.3, "brightness": 0.15, "contrast": 0.15,
                        "noise": 0.1, "blur": 0.2}
BASE = ["data.patch_size=[40, 56, 40]", "data.augment.mirror.axes=[0, 1, 2]", "inference.mirror_axes=[0, 1, 2]",
        *(f"data.augment.{t}.p={p}" for t, p in NNUNET_STYLE_AUGMENT.items())]
MIRROR_ONLY = [f"data.augment.{t}.p=0.0" for t in NNUNET_STYLE_AUGMENT]
MIRROR_X = ["data.augment.mirror.axes=[0]", "inference.mirror_axes=[0]"]

# name -> (what changes, overrides after BASE, step-cost factor relative to the base step; measured with
# bench_train_step.py: batch 4 0.95 s, 32 filters 1.67 s against 0.50 s; 32×48×32 patches 0.66×)
VARIANTS: dict[str, tuple[str, list[str], float]] = {
    "base": ("starting point: 40×56×40 patches, Dice + CE, batch norm, 4 levels, 16 filters, batch 2, "
             "nnU-Net-style augmentation", [], 1.0),
    "norm_instance": ("instance norm instead of batch norm", ["model.norm=instance"], 1.0),
    "depth3": ("3 levels instead of 4", ["model.depth=3"], 1.0),
    "lr_3e-3": ("learning rate 3e-3 instead of 1e-3", ["train.learning_rate=0.003"], 1.0),
    "loss_dice": ("loss: Dice only", ["loss={name: dice, include_background: false}"], 1.0),
    "patch_32x48x32": ("patch 32×48×32, random crops of the volume (same wall time: more steps)",
                       ["data.patch_size=[32, 48, 32]"], 0.55),  # measured afterwards: 0.66
    "aug_mirror_only": ("augmentation: mirroring only", MIRROR_ONLY, 1.0),
    "mirror_x_only": ("augmentation: mirroring along x (left-right) only, at training and test time",
                      MIRROR_ONLY + MIRROR_X, 1.0),
    "batch4": ("batch 4 (same wall time: half the steps)", ["data.batch_size=4"], 2.0),
    "filters32": ("32 base filters (same wall time: 0.3× the steps)", ["model.base_filters=32"], 3.3),
    "mirror_x_patch": ("mirror_x_only and patch_32x48x32 together (the recipe's settings)",
                       MIRROR_ONLY + MIRROR_X + ["data.patch_size=[32, 48, 32]"], 0.66),
}


def run_variant(name: str, steps: int, epochs: int, output_dir: str) -> None:
    what, overrides, cost = VARIANTS[name]
    run_dir = Path(output_dir) / EXPERIMENT / name
    per_epoch = max(1, round(steps / cost / epochs))
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(CONFIG), "--experiment", EXPERIMENT,
           "--set", f"name={name}", f"output_dir={output_dir}", f"train.epochs={epochs}",
           f"train.steps_per_epoch={per_epoch}", *BASE, *overrides]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    t1 = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "evaluate.py"), str(run_dir)], check=True)
    t2 = time.perf_counter()
    timing = {"train_s": t1 - t0, "evaluate_s": t2 - t1, "steps": per_epoch * epochs, "overrides": overrides}
    write_json(run_dir / "ablation_time.json", timing)


def table(output_dir: str) -> str:
    lines = ["| variant | change from base | steps | train min | Dice anterior | Dice posterior | Dice fg mean "
             "| HD95 mm (ant / post) |", "|---|---|---|---|---|---|---|---|"]
    for name, (what, _, _) in VARIANTS.items():
        run_dir = Path(output_dir) / EXPERIMENT / name
        timing_file, summary_file = run_dir / "ablation_time.json", run_dir / "evaluation" / "summary.json"
        if not (timing_file.exists() and summary_file.exists()):
            continue
        timing, summary = read_json(timing_file), read_json(summary_file)
        per_class = summary["per_class"].values()
        dice = [c["metrics"]["dice"]["mean"] for c in per_class]
        hd95 = " / ".join(f"{c['metrics']['hd95']['mean']:.2f}" for c in per_class)
        cells = " | ".join(f"{d:.3f}" for d in dice)
        lines.append(f"| {name} | {what} | {timing['steps']} | {timing['train_s'] / 60:.1f} | {cells} | "
                     f"{sum(dice) / len(dice):.3f} | {hd95} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=list(VARIANTS), help="variants to run (default: all)")
    parser.add_argument("--steps", type=int, default=800, help="training steps of a cost-1 variant")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--output-dir", default="runs")
    parser.add_argument("--table", action="store_true", help="only print the table of finished variants")
    args = parser.parse_args()
    if not args.table:
        for name in args.only or list(VARIANTS):
            run_variant(name, args.steps, args.epochs, args.output_dir)
    print(table(args.output_dir))


if __name__ == "__main__":
    main()
