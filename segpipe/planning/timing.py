"""Time real training steps of a planned network on this machine (the planner's step timer).

Each measurement runs in a fresh subprocess, so its peak resident memory (``ru_maxrss``) belongs
to that network alone and the planning process never loads TensorFlow. The worker builds the
network from the plan's config keys (in ``train.precision``, float32 if absent), compiles it with
Adam and Dice + CE (loss scaling for mixed_float16), and reports the median
seconds of a training step (after warm-up steps that include tracing), of a forward pass of one
window (batch 1, what sliding-window inference runs), the resident memory before the first step
and the peak after the steps.

A second worker (:func:`case_worker`, :func:`time_case`) predicts one whole case of the dataset the
way the final evaluation will (preprocessing, windows, blending, mapping back, writing) and times
each part.

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
    from segpipe.models.resenc_unet import build_resenc_unet  # TensorFlow: only in the timing worker
    from segpipe.models.unet3d import build_unet3d  # TensorFlow: only in the timing worker
    from segpipe.training.precision import model_dtype  # Keras: only in the timing worker

    kwargs = dict(depth=keys["model.depth"], base_filters=keys["model.base_filters"],
                  max_filters=keys.get("model.max_filters", 320), norm=keys.get("model.norm", "batch"),
                  strides=keys.get("model.strides"), kernel_sizes=keys.get("model.kernel_sizes"),
                  init=keys.get("model.init", "glorot_uniform"), dtype=model_dtype(keys.get("train.precision", "float32")))
    if keys.get("model.name", "unet3d") == "resenc_unet":
        return build_resenc_unet(in_channels, num_classes, blocks_per_stage=keys.get("model.blocks_per_stage"), **kwargs)
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
    import numpy as np

    import segpipe  # noqa: F401  (oneDNN on before TensorFlow loads)
    import keras

    from segpipe.losses import get_loss  # TensorFlow: only in the timing worker
    from segpipe.training.precision import wrap_optimizer  # Keras: only in the timing worker

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


def case_worker(job: dict[str, Any]) -> dict[str, Any]:
    """Predict one case the way the final evaluation does, timing each part (in the timing subprocess).

    ``job``: ``keys`` (the network, as :func:`worker`), ``root`` and ``layout`` of the dataset, ``case_id``,
    ``preprocessing`` (:meth:`PreprocessSettings.to_dict`) and ``inference`` (settings mapping). The
    network is built untrained (its weights do not change the time), warmed up on one window, then:
    preprocessing of the raw case, sliding-window prediction with blending and the mapping back onto
    the original grid (:func:`segpipe.inference.segment.segment_preprocessed`, as ``evaluate.py``),
    and writing the label map. The network's own share is the time inside its predict calls.
    """
    import tempfile
    from pathlib import Path

    import numpy as np

    import segpipe  # noqa: F401  (oneDNN on before TensorFlow loads)
    import keras

    # the case worker's whole inference path: only in the timing subprocess, never in the planner's process
    from segpipe.data.layouts import load_dataset  # only in the timing worker
    from segpipe.data.preprocess import PreprocessSettings, preprocess_case  # only in the timing worker
    from segpipe.inference.segment import segment_preprocessed  # only in the timing worker
    from segpipe.inference.settings import InferenceSettings  # only in the timing worker
    from segpipe.inference.sliding_window import keras_predict_fn  # only in the timing worker
    from segpipe.io import write_nifti  # only in the timing worker
    from segpipe.models.unet3d import probability_model  # TensorFlow: only in the timing worker

    keys = job["keys"]
    in_channels, num_classes = int(keys["_in_channels"]), int(keys["_num_classes"])
    patch = [int(p) for p in keys["data.patch_size"]]
    keras.utils.set_random_seed(0)
    predict = keras_predict_fn(probability_model(build_from_keys(keys, in_channels, num_classes)))
    inference = InferenceSettings.from_mapping(job["inference"])
    predict(np.zeros((inference.batch_size, *patch, in_channels), np.float32))  # tracing: not part of a case
    network = {"seconds": 0.0, "windows": 0}

    def timed_predict(x: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        out = predict(x)
        network["seconds"] += time.perf_counter() - start
        network["windows"] += int(x.shape[0])
        return out

    case = load_dataset(job["root"], job.get("layout")).case(job["case_id"])
    settings = PreprocessSettings.from_dict(job["preprocessing"], where="the case timing job")
    start = time.perf_counter()
    pre = preprocess_case(case, settings)
    preprocessed = time.perf_counter()
    result = segment_preprocessed(timed_predict, pre.image, pre.meta, patch_size=patch, settings=inference)
    predicted = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        write_nifti(Path(folder) / "case.nii.gz", result.labels, result.affine)
    written = time.perf_counter()
    timings = {"case_id": job["case_id"], "preprocess_seconds": preprocessed - start,
               "predict_seconds": predicted - preprocessed, "write_seconds": written - predicted,
               "network_seconds": network["seconds"], "windows": network["windows"],
               "preprocessed_shape": list(pre.image.shape[:3]), "original_shape": list(result.labels.shape),
               "overlap": inference.overlap, "mirror_axes": list(inference.mirror_axes)}
    if job.get("loop"):
        timings.update(_loop_steps(job, keys, case, settings))
    return timings


def _loop_steps(job: dict[str, Any], keys: dict[str, Any], case: Any, settings: Any) -> dict[str, Any]:
    """The training loop's step as training runs it: patches of the cached case sampled and augmented by the
    run's tf.data loader (on the same cores) feeding a compiled step of the planned network."""
    import dataclasses
    import tempfile

    import keras

    from segpipe.data.augment import AugmentSettings, Augmenter  # only in the timing worker
    from segpipe.data.cache import build_cache  # only in the timing worker
    from segpipe.data.layouts import load_dataset  # only in the timing worker
    from segpipe.data.loader import train_dataset  # TensorFlow: only in the timing worker
    from segpipe.data.sampling import PatchSampler  # only in the timing worker

    loop = job["loop"]
    num_classes = int(keys["_num_classes"])
    model = _compiled(keys)
    dataset = load_dataset(job["root"], job.get("layout"))
    with tempfile.TemporaryDirectory() as folder:
        cached = build_cache(dataclasses.replace(dataset, cases=[case]), folder, settings, progress=False)
        sampler = PatchSampler(cached, [int(p) for p in keys["data.patch_size"]],
                               foreground_fraction=float(loop["foreground_fraction"]), batch_size=int(loop["batch_size"]),
                               augmenter=Augmenter(AugmentSettings.from_dict(loop.get("augment"))), seed=0)
        batches = iter(train_dataset(sampler, num_classes, num_workers=int(loop.get("num_workers", 2))))
        times = []
        for i in range(WARMUP + STEPS):
            start = time.perf_counter()
            x, y = next(batches)
            model.train_on_batch(x, y)
            if i >= WARMUP:
                times.append(time.perf_counter() - start)
        del batches
    keras.backend.clear_session()
    return {"loop_step_seconds": statistics.median(times), "loop_steps_timed": STEPS,
            "loop_batch_size": int(loop["batch_size"])}


def _compiled(keys: dict[str, Any]):
    """The planned network compiled as :func:`worker` compiles it (Adam, Dice + CE, loss scaling for fp16)."""
    import keras

    from segpipe.losses import get_loss  # TensorFlow: only in the timing worker
    from segpipe.training.precision import wrap_optimizer  # Keras: only in the timing worker

    num_classes = int(keys["_num_classes"])
    keras.utils.set_random_seed(0)
    model = build_from_keys(keys, int(keys["_in_channels"]), num_classes)
    loss = get_loss(keys.get("loss") or {"terms": [{"name": "dice", "weight": 1.0, "include_background": False},
                                                   {"name": "ce", "weight": 1.0}]}, num_classes=num_classes)
    model.compile(optimizer=wrap_optimizer(keras.optimizers.Adam(1e-3), keys.get("train.precision", "float32")), loss=loss)
    return model


def time_case(job: dict[str, Any], *, timeout: float = 900) -> dict[str, Any]:
    """Run :func:`case_worker` in a subprocess (the planner's ``case_timer``)."""
    return time_steps({**job, "_mode": "case"}, timeout=timeout)


def time_steps(keys: dict[str, Any], *, timeout: float = 900) -> dict[str, Any]:
    """Run :func:`worker` in a subprocess (the planner's ``step_timer``)."""
    proc = subprocess.run([sys.executable, "-m", "segpipe.planning.timing"], input=json.dumps(keys),
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(expected("a timing subprocess that exits 0", key="data.patch_size",
                                    received=keys.get("data.patch_size", (keys.get("keys") or {}).get("data.patch_size")), hint="It failed:") + f"\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    job = json.loads(sys.stdin.read())
    print(json.dumps(case_worker(job) if job.pop("_mode", None) == "case" else worker(job)))
