#!/usr/bin/env python
"""Check a dataset folder for integrity problems; one line per problem.

Runs the checks training runs before it reads anything into the cache (``data.check: full``) and
the label checks planning runs on the fingerprint (a value in only a few cases, gaps, absent classes:
:func:`segpipe.data.checks.check_labels`); ``--headers-only`` reads no voxel, so it skips the value
checks.

Usage:
    python data_prep/check_dataset.py DATASET_DIR [--layout auto|msd|nnunet|folders] [--workers N] [--headers-only]

Exit code: 0 when no errors were found, 1 when there are errors, 2 when the folder cannot be read
as a dataset at all.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from segpipe.data.checks import check_dataset, errors
from segpipe.data.layouts import LAYOUTS, load_dataset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset_dir", type=Path, help="dataset folder (MSD, nnU-Net v2 raw, or images/ + labels/)")
    parser.add_argument("--layout", default="auto", choices=("auto", *LAYOUTS), help="dataset layout (default: detect)")
    parser.add_argument("--workers", type=int, default=1, help="processes reading cases (default: 1)")
    parser.add_argument("--headers-only", action="store_true",
                        help="check files, shapes and geometry from the headers only (fast; no voxel values)")
    parser.add_argument("--affine-tolerance-mm", type=float, default=1e-3,
                        help="largest image/label affine difference accepted (default: 1e-3)")
    parser.add_argument("--progress", action="store_true", help="show a progress bar")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    try:
        dataset = load_dataset(args.dataset_dir, args.layout)
    except (OSError, ValueError) as exc:
        print(f"ERROR [layout] {args.dataset_dir}: {exc}")
        return 2
    problems = check_dataset(dataset, read_data=not args.headers_only, affine_tolerance_mm=args.affine_tolerance_mm,
                             workers=args.workers, progress=args.progress, label_checks=True)
    for problem in problems:
        print(problem.format(dataset.root))
    n_errors = len(errors(problems))
    elapsed = time.perf_counter() - start
    print(f"{dataset.root}: {dataset.layout} layout, {len(dataset.cases)} cases, {dataset.num_classes} classes; "
          f"{n_errors} error(s), {len(problems) - n_errors} warning(s) in {elapsed:.1f} s", file=sys.stderr)
    return 1 if n_errors else 0


if __name__ == "__main__":
    sys.exit(main())
