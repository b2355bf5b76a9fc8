"""The planner's whole-case timing: one case predicted the way the final evaluation predicts it, and the
training loop's step on that case, timed in a subprocess (the planner's ``case_timer``, docs/planning.md).

It lives here, not in ``planning``, because it runs the stages above planning (the dataset, the cache,
the tf.data loader, sliding-window inference); the network is built and compiled as
:mod:`segpipe.planning.timing` builds it for its step timings.

    python -m segpipe.training.case_timing < job.json      # the worker; prints one JSON line
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from typing import Any

from segpipe.planning.timing import STEPS, WARMUP, build_from_keys, compile_from_keys, time_steps


def case_worker(job: dict[str, Any]) -> dict[str, Any]:
    """Predict one case the way the final evaluation does, timing each part (in the timing subprocess).

    ``job``: ``keys`` (the network, as :func:`segpipe.planning.timing.worker`), ``root`` and ``layout`` of the
    dataset, ``case_id``, ``preprocessing`` (:meth:`PreprocessSettings.to_dict`) and ``inference``
    (settings mapping). The network is built untrained (its weights do not change the time), warmed up on one
    window, then: preprocessing of the raw case, sliding-window prediction with blending and the mapping back onto
    the original grid (:func:`segpipe.inference.segment.segment_preprocessed`, as ``evaluate.py``),
    and writing the label map. The network's own share is the time inside its predict calls.
    """
    import tempfile
    from pathlib import Path

    import keras
    import numpy as np

    import segpipe  # noqa: F401  (oneDNN on before TensorFlow loads)

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
    inference = InferenceSettings.from_dict(job["inference"])
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

    from segpipe.data.augment import Augmenter, AugmentSettings  # only in the timing worker
    from segpipe.data.cache import build_cache  # only in the timing worker
    from segpipe.data.layouts import load_dataset  # only in the timing worker
    from segpipe.data.loader import train_dataset  # TensorFlow: only in the timing worker
    from segpipe.data.sampling import PatchSampler  # only in the timing worker

    loop = job["loop"]
    num_classes = int(keys["_num_classes"])
    model = compile_from_keys(keys)
    dataset = load_dataset(job["root"], job.get("layout"))
    with tempfile.TemporaryDirectory() as folder:
        cached = build_cache(dataclasses.replace(dataset, cases=[case]), folder, settings, progress=False)
        sampler = PatchSampler(cached, [int(p) for p in keys["data.patch_size"]],
                               foreground_fraction=float(loop["foreground_fraction"]),
                               batch_size=int(loop["batch_size"]),
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


def time_case(job: dict[str, Any], *, timeout: float = 900) -> dict[str, Any]:
    """Run :func:`case_worker` in a subprocess (the planner's ``case_timer``)."""
    return time_steps(job, timeout=timeout, module="segpipe.training.case_timing")




if __name__ == "__main__":
    print(json.dumps(case_worker(json.loads(sys.stdin.read()))))
