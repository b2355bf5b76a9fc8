"""Command-line entry points, one module per command: :mod:`.train`, :mod:`.evaluate`, :mod:`.predict`
(with ``predict.py export``). Each has ``main(argv) -> exit code`` and ``console()`` for its
``pyproject.toml`` console script (``segpipe-train``, ``segpipe-evaluate``, ``segpipe-predict``).

Everything lives in the package, so the console scripts work from an installed wheel; ``train.py``,
``evaluate.py`` and ``predict.py`` in the repository are thin wrappers around these ``main``
functions. Heavy imports (TensorFlow) happen inside the functions that need them.
"""
from __future__ import annotations

import sys
from pathlib import Path


def prog_name(tool: str) -> str:
    """``segpipe-<tool>`` when run as that console script, else ``<tool>.py``."""
    return f"segpipe-{tool}" if Path(sys.argv[0]).name == f"segpipe-{tool}" else f"{tool}.py"
