"""Time all metrics of all classes on a 256^3 case, against a single np.bincount as the floor.

Usage: ``python benchmarks/bench_metrics.py [--size 256] [--repeats 5]``

The synthetic reference has three foreground structures of realistic size at 0.8 x 0.8 x 1.5 mm:
an organ (ellipsoid, 1.4 M voxels = 1.35 l, liver-sized), a lesion inside it (sphere, r = 12
voxels, 7 ml) and a second organ (ellipsoid, 55 k voxels = 53 ml, kidney-sized). The prediction is the
reference shifted by two voxels plus one false-positive blob per class away from the structure,
so every class has non-trivial surfaces and a bounding box larger than the structure. A stress
case adds 300 scattered single-voxel false positives, which stretch every box to the whole image.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import numpy as np

from segpipe.metrics import case_metrics
from segpipe.metrics.overlap import confusion_counts
from segpipe.metrics.surface import surface_distances

SPACING_MM = (0.8, 0.8, 1.5)


def make_case(size: int = 256, *, scattered: int = 0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A reference with 3 structures and a plausible imperfect prediction (uint8 label maps)."""
    s = size / 256  # keep proportions for other sizes
    z, y, x = np.ogrid[:size, :size, :size]

    def ellipsoid(center, radii):
        return sum(((a - c * s) / (r * s)) ** 2 for a, c, r in zip((z, y, x), center, radii)) <= 1

    ref = np.zeros((size,) * 3, np.uint8)
    ref[ellipsoid((128, 120, 110), (80, 70, 60))] = 1  # organ
    ref[ellipsoid((140, 110, 100), (12, 12, 12))] = 2  # lesion inside the organ
    ref[ellipsoid((128, 130, 215), (30, 20, 22))] = 3  # second organ
    pred = np.roll(ref, 2, axis=0)
    pred[ellipsoid((40, 200, 200), (5, 5, 5))] = 1  # false-positive blobs
    pred[ellipsoid((150, 150, 60), (3, 3, 3))] = 2
    pred[ellipsoid((200, 60, 215), (6, 6, 6))] = 3
    if scattered:
        rng = np.random.default_rng(seed)
        points = rng.integers(0, size, size=(scattered, 3))
        pred[tuple(points.T)] = rng.integers(1, 4, size=scattered)
    return pred, ref


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up (page faults, lazy imports)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    labels = [1, 2, 3]
    pred, ref = make_case(args.size)
    stress_pred, _ = make_case(args.size, scattered=300)
    joint = ref.astype(np.uint16) * 4 + pred

    def time_it(fn: Callable[[], object]) -> float:
        return median_seconds(fn, args.repeats)

    rows = [
        ("np.bincount(ref * C + pred), index precomputed (floor)",
         time_it(lambda: np.bincount(joint.ravel(), minlength=16))),
        ("confusion_counts, all classes (cast + index + bincount)",
         time_it(lambda: confusion_counts(pred, ref, labels=labels))),
    ]
    for c in labels:
        n_ref, n_pred = int((ref == c).sum()), int((pred == c).sum())
        masks = (pred == c, ref == c)
        for method in ("edt", "kdtree"):
            rows.append((
                f"surface_distances, class {c} (n_ref={n_ref}, n_pred={n_pred}), method={method}",
                time_it(lambda m=masks, method=method: surface_distances(
                    *m, spacing_mm=SPACING_MM, method=method)),
            ))
    rows.append(("**case_metrics, all metrics, 3 classes** (per case)",
                 time_it(lambda: case_metrics(pred, ref, labels=labels, spacing_mm=SPACING_MM))))
    rows.append(("case_metrics, stress case (+300 scattered false-positive voxels)",
                 time_it(lambda: case_metrics(stress_pred, ref, labels=labels, spacing_mm=SPACING_MM))))

    print(f"{args.size}^3 volume ({ref.size / 1e6:.1f} M voxels, uint8), spacing {SPACING_MM} mm, "
          f"median of {args.repeats} runs after one warm-up\n")
    print("| step | median time (s) |")
    print("|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.3f} |")
    metrics = case_metrics(pred, ref, labels=labels, spacing_mm=SPACING_MM)
    print("\n| class | dice | hd (mm) | hd95 (mm) | assd (mm) | nsd@1mm |")
    print("|---|---|---|---|---|---|")
    for c, m in metrics.items():
        print(f"| {c} | {m['dice']:.4f} | {m['hd']:.2f} | {m['hd95']:.2f} | {m['assd']:.3f} "
              f"| {m['nsd']:.4f} |")


if __name__ == "__main__":
    main()
