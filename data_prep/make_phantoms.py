#!/usr/bin/env python
"""Generate a synthetic phantom dataset in Medical Segmentation Decathlon layout.

    python data_prep/make_phantoms.py data/phantoms --num-cases 30 --shape 48 48 48 --spacing-mm 1 1 1 --seed 0
    python data_prep/make_phantoms.py data/lesions --kind lesion --annotate-every 2   # regions, sparse labels

The same arguments always produce the same files (see segpipe/data/phantoms.py for what a case looks like).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from segpipe.data.phantoms import PhantomSettings, write_lesion_phantom_dataset, write_phantom_dataset  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    defaults = PhantomSettings()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="new dataset folder")
    parser.add_argument("--num-cases", type=int, default=defaults.num_cases)
    parser.add_argument("--shape", type=int, nargs=3, default=list(defaults.shape), metavar=("X", "Y", "Z"))
    parser.add_argument("--spacing-mm", type=float, nargs=3, default=list(defaults.spacing_mm), metavar=("X", "Y", "Z"))
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--noise-std", type=float, default=defaults.noise_std)
    parser.add_argument("--kind", choices=["organ", "lesion"], default="organ",
                        help="organ: 1 channel, organ + lesion (MSD layout); lesion: 2 channels, nested regions "
                             "whole > core > enhancing (nnU-Net v2 layout)")
    parser.add_argument("--annotate-every", type=int, default=1,
                        help="lesion only: annotate every n-th axial slice, the others get the ignore label")
    args = parser.parse_args(argv)
    if args.num_cases < 1 or min(args.shape) < 8 or min(args.spacing_mm) <= 0 or args.annotate_every < 1:
        parser.error(f"expected --num-cases >= 1, --shape sides >= 8, --spacing-mm > 0, --annotate-every >= 1. "
                     f"Received: {args.num_cases}, {args.shape}, {args.spacing_mm}, {args.annotate_every}")
    settings = PhantomSettings(args.num_cases, tuple(args.shape), tuple(args.spacing_mm), args.seed, args.noise_std)
    try:
        if args.kind == "lesion":
            root = write_lesion_phantom_dataset(args.out, settings, annotate_every=args.annotate_every)
        else:
            root = write_phantom_dataset(args.out, settings)
    except FileExistsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"Wrote {settings.num_cases} cases to {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
