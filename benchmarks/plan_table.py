#!/usr/bin/env python
"""The plans of docs/planning.md: hippocampus (real fingerprint), a CT-like and a 2-channel MR dataset
(synthetic fingerprints), each with predicted and measured step time and peak memory on this machine.

    python benchmarks/plan_table.py [--hippocampus ../shared/data/hippocampus] [--budget-minutes 60]
                                    [--memory-gib 8] [--out runs/plan_table.json]

The CT-like and MR fingerprints are built here, not read from images (the planner only needs the
per-case spacings, cropped shapes, channel names and class fractions): 40 CT cases of about
512×512×200 voxels at 0.8×0.8×2.5 mm (liver-and-tumour-like, 3 classes), and 30 two-channel MR
cases (T1, FLAIR) of about 240×240×155 at 1 mm (brain-tumour-like, 4 classes). Every timing runs in
its own subprocess (segpipe.planning.timing); medians of 3 steps after 2 warm-up steps.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from segpipe.io import write_json  # noqa: E402
from segpipe.planning.hardware import detect_hardware  # noqa: E402
from segpipe.planning.planner import make_plan  # noqa: E402
from segpipe.planning.timing import time_steps  # noqa: E402


def synthetic_fingerprint(name, n, shape, spacing, channels, fractions, seed=0, jitter=0.1):
    rng = np.random.default_rng(seed)
    cases = {}
    for i in range(n):
        sh = [int(round(s * rng.uniform(1 - jitter, 1 + jitter))) for s in shape]
        sp = [float(s * rng.uniform(1 - jitter / 2, 1 + jitter / 2)) for s in spacing]
        cases[f"{name}_{i:03d}"] = {"spacing_mm": sp, "shape": sh, "cropped_shape": sh}
    return {"dataset": f"synthetic:{name}", "key": name, "cases": cases, "channel_names": list(channels),
            "intensity": [{} for _ in channels],
            "classes": {str(v): {"voxel_fraction": f, "cases_present": n} for v, f in enumerate(fractions)}}


def hippocampus_fingerprint(root: Path, cache: Path):
    from segpipe.data.fingerprint import load_or_compute_fingerprint
    from segpipe.data.layouts import load_dataset

    return load_or_compute_fingerprint(load_dataset(root), cache / "hippocampus_fingerprint.json", workers=2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hippocampus", type=Path, default=ROOT.parent / "shared" / "data" / "hippocampus")
    parser.add_argument("--budget-minutes", type=float, default=60)
    parser.add_argument("--memory-gib", type=float, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "plan_table.json")
    parser.add_argument("--only", nargs="+", default=None, help="hippocampus ct mr")
    args = parser.parse_args()
    datasets = {
        "hippocampus": lambda: hippocampus_fingerprint(args.hippocampus, args.out.parent),
        "ct": lambda: synthetic_fingerprint("ct", 40, [512, 512, 200], [0.8, 0.8, 2.5], ["CT"], [0.9, 0.09, 0.01]),
        "mr": lambda: synthetic_fingerprint("mr", 30, [240, 240, 155], [1.0, 1.0, 1.0], ["T1", "FLAIR"],
                                            [0.97, 0.015, 0.01, 0.005]),
    }
    hardware = detect_hardware(memory_gib=args.memory_gib, device="cpu")
    print(hardware.description)
    results = {}
    for name, make in datasets.items():
        if args.only and name not in args.only:
            continue
        fingerprint = make()
        n_val = 40 if name == "hippocampus" else None
        plan = make_plan(fingerprint, hardware=hardware, time_budget_minutes=args.budget_minutes,
                         step_timer=time_steps, num_val_cases=n_val)
        print(f"\n== {name}\n{plan.table()}")
        p, m = plan.predicted, plan.measured
        row = {"patch": plan.config["data.patch_size"], "spacing": plan.config["data.target_spacing_mm"],
               "strides": plan.config["model.strides"], "kernels": plan.config["model.kernel_sizes"],
               "batch": plan.config["data.batch_size"], "schedule": plan.choices["schedule"].value,
               "overlap": plan.config["inference.overlap"], "mirror": plan.config["inference.mirror_axes"],
               "predicted_step_s": p["step_seconds"], "measured_step_s": m["step_seconds"],
               "predicted_memory_bytes_batch2": p["memory_bytes_batch2"], "measured_peak_bytes": m["peak_bytes"],
               "reference_step_s": m["reference"]["step_seconds"], "plan": plan.to_dict()}
        print(f"step predicted {row['predicted_step_s']:.2f} s, measured {row['measured_step_s']:.2f} s; memory "
              f"predicted {row['predicted_memory_bytes_batch2'] / 2**30:.2f} GiB, measured peak "
              f"{row['measured_peak_bytes'] / 2**30:.2f} GiB")
        results[name] = row
    write_json(args.out, results)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
