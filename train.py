#!/usr/bin/env python
"""Train a 3D segmentation model from a config file.

    python train.py                                  # configs/default.yaml (generated phantoms)
    python train.py --config configs/x.yaml --set train.epochs=3 loss.name=tversky
    python train.py --resume runs/default            # continue an interrupted run

Ctrl-C (or SIGTERM) stops after the current step and saves a checkpoint (exit code 130 / 143);
press it twice to abort at once. Several GPUs or machines: train.distribute (docs/distributed.md).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import segpipe  # noqa: F401  (sets TensorFlow's environment before it is imported)
from segpipe.config import ConfigError, load_config

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "default.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", nargs="+", default=None, help="YAML config file(s); default: configs/default.yaml")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="dotted overrides, e.g. train.epochs=3")
    parser.add_argument("--resume", nargs="?", const=True, default=False, metavar="RUN_DIR",
                        help="continue an interrupted run (its own config) from its last checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="delete an existing run of the same name first")
    args = parser.parse_args(argv)

    from segpipe.checkpoints import StorageError
    from segpipe.interrupts import TrainingInterrupted
    from segpipe.training import load_run_config, train

    try:
        if isinstance(args.resume, str):
            if args.config or args.set:
                parser.error("--resume RUN_DIR continues a run with its saved config; do not pass --config/--set")
            configs = [load_run_config(args.resume)]
        else:
            paths = args.config or [str(DEFAULT_CONFIG)]
            configs = [load_config(p, args.set) for p in paths]
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    failed = []
    for config in configs:
        try:
            run_dir = train(config, resume=bool(args.resume), overwrite=args.overwrite)
            print(f"Run directory: {run_dir}")
        except TrainingInterrupted as exc:  # Ctrl-C / SIGTERM: a checkpoint was saved; skip the other configs
            print(f"{config.name}: {exc}", file=sys.stderr)
            return exc.exit_code
        except (ConfigError, StorageError, FileExistsError, FileNotFoundError, ValueError) as exc:
            print(f"error: {config.name}: {exc}", file=sys.stderr)
            failed.append(config.name)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
