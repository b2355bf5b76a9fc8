"""What a run needs to be reproduced: ``run_info.json``, seeding and TensorFlow op determinism.

``run_info.json`` records the seed, the resolved config, the split, how the run was distributed,
and the environment: Python, platform, package versions and the project's git commit (with a
``dirty`` flag for uncommitted changes) when the project is a git checkout. A resumed run appends
the environment it continued in to ``resumes``, so a change of versions between sessions shows.

With ``train.deterministic: true`` TensorFlow's op determinism is switched on: two runs with the
same config and seed on the same machine give the same history (it can slow GPU training, and some
GPU ops without a deterministic kernel then raise an error).
"""
from __future__ import annotations

import datetime
import importlib
import importlib.metadata
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from segpipe.config import Config
from segpipe.io import read_json, write_json

# distribution name -> module whose __version__ is reported (the TensorFlow wheel has several names:
# tensorflow, tensorflow-cpu, tensorflow[and-cuda], so the module is asked, not the metadata)
PACKAGES = {"segpipe": "segpipe", "tensorflow": "tensorflow", "keras": "keras", "numpy": "numpy", "scipy": "scipy",
            "nibabel": "nibabel", "pyyaml": "yaml", "tensorboard": "tensorboard"}
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def enable_determinism(deterministic: bool) -> None:
    """With ``train.deterministic``, switch on TensorFlow's op determinism (seeding is done by
    ``keras.utils.set_random_seed`` right before the model is built). It cannot be switched off
    again in the same process.
    """
    if deterministic:
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()


def package_versions(packages: dict[str, str] = PACKAGES) -> dict[str, str | None]:
    """Version of each package (None when it is not installed)."""
    versions: dict[str, str | None] = {}
    for name, module in packages.items():
        try:
            versions[name] = str(importlib.import_module(module).__version__)
        except (ImportError, AttributeError):
            try:
                versions[name] = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                versions[name] = None
    return versions


def git_state(root: Path = PROJECT_ROOT) -> dict[str, Any] | None:
    """``{"commit": sha, "dirty": bool}`` of the project checkout, or None when it is not one (or git is missing)."""
    if not (root / ".git").exists():
        return None
    try:
        commit = _git(root, "rev-parse", "HEAD")
        dirty = bool(_git(root, "status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty}


def _git(root: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10, check=True)
    return done.stdout.strip()


def environment() -> dict[str, Any]:
    """Where and with what this process runs."""
    import tensorflow as tf

    return {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "argv": sys.argv,
        "packages": package_versions(),
        "git": git_state(),
        "devices": [d.name for d in tf.config.list_logical_devices()],
    }


def run_info(config: Config, split: dict[str, Any], distribution: dict[str, Any]) -> dict[str, Any]:
    """The content of a new run's ``run_info.json``."""
    return {
        "seed": config.seed,
        "deterministic": config.train.deterministic,
        "config": config.to_dict(),
        "split": {"train": list(split["train"]), "val": list(split["val"])},
        "distribution": distribution,
        "environment": environment(),
        "resumes": [],
    }


def record_resume(info: dict[str, Any], epoch: int, step: int, distribution: dict[str, Any]) -> dict[str, Any]:
    """``info`` with the environment of a resumed session appended to ``resumes``."""
    entry = {"epoch": epoch, "step": step, "distribution": distribution, "environment": environment()}
    return {**info, "resumes": [*info.get("resumes", []), entry]}


def write_run_info(path: Path, config: Config, split: dict[str, Any], distribution: dict[str, Any],
                   resumed_from: tuple[int, int] | None = None, init_from: dict[str, Any] | None = None) -> None:
    """Write ``run_info.json`` for a new run, or append this session to it when resuming at (epoch, step).

    ``init_from``: the record of the weights a new run started from (``train.init_from``: the source and
    the variables loaded, adapted and new); a resumed run keeps the record of its start."""
    path = Path(path)
    if resumed_from is not None and path.is_file():
        info = record_resume(read_json(path), *resumed_from, distribution)
    else:
        info = run_info(config, split, distribution)
        if init_from is not None:
            info["init_from"] = init_from
    write_json(path, info)
