"""Time real training steps of a planned network on this machine (the planner's step timer).

Each measurement runs in a fresh subprocess, so its peak resident memory (``ru_maxrss``) belongs
to that network alone and the planning process never loads TensorFlow. The worker builds the
network from the plan's config keys (in ``train.precision``, float32 if absent), compiles it with
Adam and Dice + CE (loss scaling for mixed_float16), and reports the median
seconds of a training step (after warm-up steps that include tracing), of a forward pass of one
window (batch 1, what sliding-window inference runs), the resident memory before the first step
and the peak after the steps.

The whole-case timing (one median case predicted as the final evaluation will, and the training loop's
step on it) needs ``data`` and ``inference``, packages above ``planning``: it is
:mod:`segpipe.training.case_timing`, run through :func:`time_steps` with its own module.

    python -m segpipe.planning.timing < keys.json      # the worker; prints one JSON line
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from typing import Any

from segpipe.errors import expected

STEPS = 3  # timed steps (medians); kept short because the machine may be shared
WARMUP = 2


def build_from_keys(keys: dict[str, Any], in_channels: int, num_classes: int):
    """The network the plan's ``model.*`` keys describe (imports Keras)."""
    from segpipe.models.precision import model_dtype  # Keras: only in the timing worker
    from segpipe.models.resenc_unet import build_resenc_unet  # TensorFlow: only in the timing worker
    from segpipe.models.unet3d import build_unet3d  # TensorFlow: only in the timing worker

    kwargs = dict(depth=keys["model.depth"], base_filters=keys["model.base_filters"],
                  max_filters=keys.get("model.max_filters", 320), norm=keys.get("model.norm", "batch"),
                  strides=keys.get("model.strides"), kernel_sizes=keys.get("model.kernel_sizes"),
                  init=keys.get("model.init", "glorot_uniform"), 
                  dtype=model_dtype(keys.get("train.precision", "float32")))
    if keys.get("model.name", "unet3d") == "resenc_unet":
        return build_resenc_unet(in_channels, num_classes, blocks_per_stage=keys.get("model.blocks_per_stage"),
                                 **kwargs)
    return build_unet3d(in_channels, num_classes, **kwargs)


def _rss_bytes() -> tuple[int, int]:
    """(current, peak) resident set size of this process."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    current = peak
    try:
        with open("/proc/self/statm") as f:
            import os

            current = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        pass
    return current, peak


def worker(keys: dict[str, Any]) -> dict[str, Any]:
    import keras
    import numpy as np

    import segpipe  # noqa: F401  (oneDNN on before TensorFlow loads)
    from segpipe.losses import get_loss  # TensorFlow: only in the timing worker
    from segpipe.models.precision import wrap_optimizer  # Keras: only in the timing worker

    in_channels, num_classes = int(keys["_in_channels"]), int(keys["_num_classes"])
    patch, batch = [int(p) for p in keys["data.patch_size"]], int(keys["data.batch_size"])
    keras.utils.set_random_seed(0)
    model = build_from_keys(keys, in_channels, num_classes)
    loss = get_loss(keys.get("loss") or {"terms": [{"name": "dice", "weight": 1.0, "include_background": False},
                                                   {"name": "ce", "weight": 1.0}]}, num_classes=num_classes)
    precision = keys.get("train.precision", "float32")
    model.compile(optimizer=wrap_optimizer(keras.optimizers.Adam(1e-3), precision), loss=loss)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, *patch, in_channels)).astype("float32")
    y = np.eye(num_classes, dtype="float32")[rng.integers(0, num_classes, (batch, *patch))]
    baseline, _ = _rss_bytes()
    times = []
    for i in range(WARMUP + STEPS):
        start = time.perf_counter()
        model.train_on_batch(x, y)
        if i >= WARMUP:
            times.append(time.perf_counter() - start)
    window = x[:1]
    forward = []
    for i in range(WARMUP + STEPS):
        start = time.perf_counter()
        model.predict_on_batch(window)
        if i >= WARMUP:
            forward.append(time.perf_counter() - start)
    _, peak = _rss_bytes()
    return {"step_seconds": statistics.median(times), "window_seconds": statistics.median(forward),
            "baseline_bytes": baseline, "peak_bytes": peak, "parameters": int(model.count_params()),
            "steps_timed": STEPS, "precision": precision}


def compile_from_keys(keys: dict[str, Any]):
    """The planned network compiled as :func:`worker` compiles it (Adam, Dice + CE, loss scaling for fp16)."""
    import keras

    from segpipe.losses import get_loss  # TensorFlow: only in the timing worker
    from segpipe.models.precision import wrap_optimizer  # Keras: only in the timing worker

    num_classes = int(keys["_num_classes"])
    keras.utils.set_random_seed(0)
    model = build_from_keys(keys, int(keys["_in_channels"]), num_classes)
    loss = get_loss(keys.get("loss") or {"terms": [{"name": "dice", "weight": 1.0, "include_background": False},
                                                   {"name": "ce", "weight": 1.0}]}, num_classes=num_classes)
    model.compile(optimizer=wrap_optimizer(keras.optimizers.Adam(1e-3), keys.get("train.precision", "float32")),
                  loss=loss)
    return model


def time_steps(keys: dict[str, Any], *, timeout: float = 900,
               module: str = "segpipe.planning.timing") -> dict[str, Any]:
    """Run :func:`worker` in a subprocess (the planner's ``step_timer``); ``module``: another worker module
    that reads one JSON job on stdin and prints one JSON line (:mod:`segpipe.training.case_timing`)."""
    proc = subprocess.run([sys.executable, "-m", module], input=json.dumps(keys),
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(expected("a timing subprocess that exits 0", key="data.patch_size",
                                    received=keys.get("data.patch_size",
                                                      (keys.get("keys") or {}).get("data.patch_size")),
                                    hint="It failed:") + f"\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(worker(json.loads(sys.stdin.read()))))
