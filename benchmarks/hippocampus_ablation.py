"""Ablation of the hippocampus recipe: train short variants of it in turn and tabulate Dice and time.

    python benchmarks/hippocampus_ablation.py                       # every variant, 800 steps each
    python benchmarks/hippocampus_ablation.py --only base depth3    # some of them
    python benchmarks/hippocampus_ablation.py --table               # print the table of finished variants

Each variant is ``configs/hippocampus_recipe.yaml`` turned back into the starting point (``base``)
plus a few ``--set`` overrides of its own, with a shorter schedule (``--steps`` training steps at
batch 2; variants with a costlier step get fewer steps so that each trains for about the same wall
time). A variant trains into ``runs/hippocampus_ablation/<name>``
and is then evaluated like the recipe (sliding window, mirroring) on the same 40 validation cases.
Wall times (training incl. per-epoch validation, and evaluation) are written next to the run in
``ablation_time.json``; the table (docs/hippocampus.md) is printed at the end.

The starting point and the variants (each: what changes, its overrides, its step cost) are data,
``configs/hippocampus_ablation.json``, read by :func:`load_ablation`; ``tests/test_recipe.py`` reads
the same file to check that every variant is a valid config and the combined one is the recipe.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from segpipe.errors import expected  # noqa: E402  (no TensorFlow: the runs are subprocesses)
from segpipe.io import read_json, write_json  # noqa: E402
from segpipe.settings import is_number  # noqa: E402

CONFIG = ROOT / "configs" / "hippocampus_recipe.yaml"
ABLATION = ROOT / "configs" / "hippocampus_ablation.json"  # the starting point and the variants
EXPERIMENT = "hippocampus_ablation"


def load_ablation(path: Path = ABLATION) -> tuple[list[str], dict[str, tuple[str, list[str], float]]]:
    """The starting point and the variants of the ablation, from its JSON file.

    Parameters
    ----------
    path : Path
        The file: ``{"base": [override, ...], "variants": {name: {"what": str, "overrides": [override, ...],
        "cost": number > 0, "note": str (optional)}}}`` (an ``"about"`` key is free text).

    Returns
    -------
    tuple
        ``(base, variants)``: the ``--set`` overrides that turn the recipe into the starting point, and
        ``name -> (what changes, overrides after base, step-cost factor relative to the base step)``.

    Raises
    ------
    ValueError
        When the file is not valid JSON or a key is missing or of the wrong type (the message names the
        file and the key).
    """
    data = read_json(path)

    def overrides(value: object, key: str) -> list[str]:
        if not (isinstance(value, list) and all(isinstance(o, str) for o in value)):
            raise ValueError(expected("a list of --set overrides (strings)", key=key, received=value, where=str(path)))
        return value

    if not (isinstance(data, dict) and isinstance(data.get("variants"), dict) and data["variants"]):
        raise ValueError(expected('an object with "base" and a non-empty "variants" object', key="variants",
                                  received=data.get("variants") if isinstance(data, dict) else data, where=str(path)))
    base = overrides(data.get("base"), "base")
    variants = {}
    for name, variant in data["variants"].items():
        if not (isinstance(variant, dict) and set(variant) <= {"what", "overrides", "cost", "note"}
                and isinstance(variant.get("what"), str) and is_number(variant.get("cost"), finite=True)
                and variant["cost"] > 0):
            shape = '{"what": text, "overrides": [...], "cost": number > 0} (and optionally "note": text)'
            raise ValueError(expected(shape, key=f"variants.{name}", received=variant, where=str(path)))
        variants[name] = (variant["what"], overrides(variant.get("overrides"), f"variants.{name}.overrides"),
                          float(variant["cost"]))
    return base, variants


BASE, VARIANTS = load_ablation()


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
