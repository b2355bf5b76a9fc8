#!/usr/bin/env python
"""Segment NIfTI scans with an exported bundle, or export a bundle from a trained run.

    python predict.py --model runs/default/bundle --input scans/ --output predictions/
    python predict.py --model BUNDLE --input scan.nii.gz --output out/ --format savedmodel --no-mirror
    python predict.py export runs/default [--checkpoint best|last|final] [--out DIR] [--onnx]

See README.md, "Inference and export".
"""
from __future__ import annotations

import sys

import segpipe  # noqa: F401  (sets TensorFlow's environment before it is imported)
from segpipe.cli.predict import main

if __name__ == "__main__":
    sys.exit(main())
