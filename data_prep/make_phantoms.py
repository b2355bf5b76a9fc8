#!/usr/bin/env python
"""Generate a synthetic phantom dataset in Medical Segmentation Decathlon layout.

    python data_prep/make_phantoms.py data/phantoms --num-cases 30 --shape 48 48 48 --spacing-mm 1 1 1 --seed 0

The same arguments always produce the same files (see segpipe/data/phantoms.py for what a case looks like).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from segpipe.data.phantoms import PhantomSettings, write_phantom_dataset  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    defaults = PhantomSettings()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="new dataset folder")
    parser.add_argument("--num-cases", type=int, default=defaults.num_cases)
    parser.add_argument("--shape", type=int, nargs=3, default=list(defaults.shape), metavar=("X", "Y", "Z"))
    parser.add_argument("--spacing-mm", type=float, nargs=3, default=list(defaults.spacing_mm), metavar=("X", "Y", "Z"))
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--noise-std", type=float, default=defaults.noise_std)
    args = parser.parse_args(argv)
    if args.num_cases < 1 or min(args.shape) < 8 or min(args.spacing_mm) <= 0:
        parser.error(f"expected --num-cases >= 1, --shape sides >= 8, --spacing-mm > 0. "
                     f"Received: {args.num_cases}, {args.shape}, {args.spacing_mm}")
    settings = PhantomSettings(args.num_cases, tuple(args.shape), tuple(args.spacing_mm), args.seed, args.noise_std)
    try:
        root = write_phantom_dataset(args.out, settings)
    except FileExistsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"Wrote {settings.num_cases} cases to {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
