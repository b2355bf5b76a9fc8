#!/usr/bin/env python
"""Score segmentations: per-class overlap and surface metrics, per case and summarised.

    python evaluate.py --pred DIR --ref DIR [--labels 1 2 ...]     # folders of label maps
    python evaluate.py RUN_DIR                                      # a trained run's validation cases
    python evaluate.py --compare EXPERIMENT_DIR | RUN_DIR ...       # several runs, paired statistics

A thin wrapper: the command is :func:`segpipe.cli.evaluate.main` (console script ``segpipe-evaluate``);
``python evaluate.py --help`` lists every option. Folder mode does not import TensorFlow.
"""
from __future__ import annotations

import sys

from segpipe.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
