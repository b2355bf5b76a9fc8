#!/usr/bin/env python
"""Train a 3D segmentation model from a config file, or a sweep of configs (x folds).

    python train.py                                  # configs/default.yaml (generated phantoms)
    python train.py --config configs/x.yaml --set train.epochs=3 loss.name=tversky
    python train.py --resume runs/default            # continue an interrupted run
    python train.py --config configs/losses/*.yaml --experiment losses [--folds 5]

A thin wrapper: the command is :func:`segpipe.cli.train.main` (console script ``segpipe-train``);
``python train.py --help`` lists every option.
"""
from __future__ import annotations

import sys

import segpipe  # noqa: F401  (sets TensorFlow's environment before it is imported)
from segpipe.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
