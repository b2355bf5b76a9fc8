#!/usr/bin/env python
"""Train the planned network a few hundred steps in each precision, export, predict: one table.

    python benchmarks/bench_precision.py --set data.root=/data/Task04_Hippocampus      # the planned network
    python benchmarks/bench_precision.py --steps 300 --precisions float32 mixed_float16 mixed_bfloat16
    python benchmarks/bench_precision.py --steps 4 --set data.root=DIR                  # a smoke run

The dataset (``data.root``; default: ``configs/base.yaml``'s) is planned once for this machine
(no time budget: ``segpipe.cli.plan.planned_config``), then for every precision one subprocess runs
``train.py`` on the plan with ``train.precision`` set: 2 epochs of ``--steps / 2`` steps, patch
validation, the bundle exported at the end (from a float32 copy of a mixed-precision network). The
table gives per precision: seconds per training step (the second epoch, the validation of one patch
per validation case included), the peak memory of the training process (GPU: TensorFlow's
``peak`` of GPU:0; CPU: ``ru_maxrss``), the validation foreground Dice after the steps, and the
seconds of a forward pass of one window through the exported bundle (``load_predictor(bundle,
"keras")``, median of 5 after 2 warm-up calls; the bundle is float32 whatever the training precision).
Under 10 minutes on one GPU at the default 300 steps.
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")

# One training run, in its own process so that its peak memory is its own.
DRIVER = """
import json, resource, sys
sys.path.insert(0, sys.argv[1])
import tensorflow as tf
import train
code = train.main(sys.argv[3:])
gpus = tf.config.list_physical_devices("GPU")
peak = tf.config.experimental.get_memory_info("GPU:0")["peak"] if gpus else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
open(sys.argv[2], "w").write(json.dumps({"code": code, "peak_bytes": peak, "device": "GPU" if gpus else "CPU"}))
"""  # noqa: E501 (a script run as is; its peak-memory line is long)

# The exported bundle's forward pass of one window.
PREDICT = """
import json, statistics, sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np
from segpipe.inference.bundle import read_bundle
from segpipe.inference.runtimes import load_predictor
bundle = read_bundle(sys.argv[2])
predict = load_predictor(bundle, "keras")
x = np.random.default_rng(0).normal(size=(1, *bundle.patch_size, bundle.input_channels)).astype(np.float32)
times = []
for i in range(7):
    start = time.perf_counter()
    out = np.asarray(predict(x))
    if i >= 2:
        times.append(time.perf_counter() - start)
print(json.dumps({"seconds": statistics.median(times), "dtype": str(out.dtype)}))
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="training steps per precision (2 epochs)")
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    parser.add_argument("--out", type=Path, default=None, help="folder of the runs (default: a temporary one)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides (data.root=...)")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2 (two epochs)")

    from segpipe.cli.plan import planned_config

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        result = planned_config(None, [*args.set, f"output_dir={out}"], out_dir=out / "plan", progress=False)
        steps = args.steps // 2
        rows = []
        for precision in args.precisions:
            rows.append(_one(precision, result.yaml_path, out, steps))
        print(f"\n{result.plan.hardware.get('description', '')}; planned patch "
              f"{result.plan.config['data.patch_size']}, batch {result.plan.config['data.batch_size']}; "
              f"2 epochs × {steps} steps per precision\n")
        print("| precision | s/step (epoch 2) | peak memory (GiB) | val Dice fg after the steps | bundle s/window | "
              "bundle output |")
        print("|---|---|---|---|---|---|")
        for row in rows:
            print("| " + " | ".join(str(row[k]) for k in ("precision", "step", "peak", "dice", "window", "dtype"))
                  + " |")
    return 0 if all(row["code"] == 0 for row in rows) else 1


def _one(precision: str, plan_yaml: Path, out: Path, steps: int) -> dict:
    """Train, export and predict in ``precision``; the table row."""
    run_dir = out / "runs" / precision
    overrides = [f"train.precision={precision}", "train.epochs=2", f"train.steps_per_epoch={steps}",
                 "train.max_train_minutes=null", "train.time_budget_minutes=null", "data.validation=patches",
                 "data.val_patches_per_case=1", "train.export_bundle=true", f"output_dir={out / 'runs'}",
                 f"name={precision}"]
    report = out / f"{precision}.json"
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(ROOT), str(report), "--config", str(plan_yaml),
                           "--no-plan", "--overwrite", "--set", *overrides], capture_output=True, text=True)
    row = {"precision": precision, "code": proc.returncode, "step": "failed", "peak": "", "dice": "", "window": "",
           "dtype": ""}
    if proc.returncode != 0 or not report.is_file():
        print(f"[{precision}] failed after {time.monotonic() - start:.0f} s:\n{proc.stderr[-2000:]}", file=sys.stderr)
        return row
    trained = json.loads(report.read_text())
    with open(run_dir / "epoch_times.csv", newline="") as f:
        epoch_seconds = [float(r["seconds"]) for r in csv.DictReader(f)]
    with open(run_dir / "history.csv", newline="") as f:
        history = list(csv.DictReader(f))
    predicted = subprocess.run([sys.executable, "-c", PREDICT, str(ROOT), str(run_dir / "bundle")],
                               capture_output=True, text=True)
    window = json.loads(predicted.stdout.strip().splitlines()[-1]) if predicted.returncode == 0 else None
    if window is None:
        print(f"[{precision}] the bundle's prediction failed:\n{predicted.stderr[-2000:]}", file=sys.stderr)
    row.update(step=f"{epoch_seconds[-1] / steps:.3f}",
               peak=f"{trained['peak_bytes'] / 2**30:.2f} ({trained['device']})",
               dice=f"{float(history[-1]['val_dice_fg_mean']):.3f}",
               window=f"{window['seconds']:.4f}" if window else "failed", dtype=window["dtype"] if window else "")
    print(f"[{precision}] done in {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)
    return row


if __name__ == "__main__":
    sys.exit(main())
