"""Checking a freshly written bundle against the Keras network it came from.

Every written format is loaded back (the writer trusts its own files) and compared on a random
patch: max abs probability difference ≤ :data:`VERIFY_TOLERANCE`; ``openvino`` also in bfloat16
where the CPU computes in it, held to :data:`segpipe.inference.runtimes.BF16_TOLERANCE`. The
``segment`` signature is compared with :func:`segpipe.inference.segment.segment_volume` on a random
scan: at least :data:`SEGMENT_AGREEMENT` of the labels equal.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from segpipe.data.preprocess import ORIENTATION, PreprocessSettings
from segpipe.errors import Received, expected
from segpipe.inference.bundle import SEGMENT_SIGNATURE, Bundle, BundleError
from segpipe.inference.runtimes import BF16_TOLERANCE, load_predictor
from segpipe.inference.segment import segment_volume
from segpipe.inference.settings import InferenceSettings
from segpipe.inference.sliding_window import keras_predict_fn

VERIFY_TOLERANCE = 1e-4
SEGMENT_AGREEMENT = 0.999  # least share of equal labels between the segment signature and predict.py


def verify_formats(net, folder: Path, files: Mapping[str, str], patch_size: tuple[int, ...],
                   architecture: Mapping[str, Any] | None) -> dict[str, Any]:
    """Max abs probability difference of each written format against ``net`` on a random patch.

    Raises :class:`BundleError` for a format out of tolerance; an out-of-tolerance bfloat16 is
    recorded (``openvino-bf16_within_tolerance``) and refused only when asked for by name.
    """
    in_channels = int(net.inputs[0].shape[-1])
    x = np.random.default_rng(0).normal(size=(1, *patch_size, in_channels)).astype(np.float32)
    reference = np.asarray(net.predict_on_batch(x))
    written = Bundle(folder, ("",) * reference.shape[-1], in_channels, (), PreprocessSettings(), ORIENTATION,
                     tuple(patch_size), InferenceSettings(), dict(files), {}, dict(architecture or {}) or None)
    checks = [(fmt, VERIFY_TOLERANCE) for fmt in files]
    if "openvino" in files:
        checks.append(("openvino-bf16", BF16_TOLERANCE))
    report: dict[str, Any] = {"run": True, "tolerance": VERIFY_TOLERANCE}
    for fmt, tolerance in checks:
        diff = float(np.abs(load_predictor(written, fmt, trust_bundle=True)(x) - reference).max())
        report[f"{fmt}_max_abs_diff"] = diff
        if fmt == "openvino-bf16":
            # a precision mode of the openvino file, not a file: out of tolerance it is refused when
            # asked for (load_predictor), the float32 formats stay usable
            report["openvino-bf16_within_tolerance"] = diff <= tolerance
        elif not diff <= tolerance:
            raise BundleError(expected(f"the exported {fmt} model within {tolerance} of Keras (max abs probability "
                                       "difference on a random patch)", key=f"{fmt}_max_abs_diff", received=diff))
    return report


def verify_segment(net, savedmodel: Path, preprocessing: PreprocessSettings, patch_size: tuple[int, ...],
                   inference: InferenceSettings, regions_class_order: Sequence[int] | None = None) -> dict[str, float]:
    """Labels of the ``segment`` signature against :func:`segment_volume` with Keras, the bundle's
    post-processing in both; a region network's labels by ``regions_class_order`` in both.

    The scan is random (2 windows per axis at the training spacing, with a zero margin to crop);
    with a target spacing it comes 20 % finer along one axis, so resampling there and back runs.
    """
    import tensorflow as tf

    rng = np.random.default_rng(0)
    target = np.asarray(preprocessing.target_spacing_mm or (1.0, 1.0, 1.0))
    spacing = target * np.array([0.8, 1.0, 1.0]) if preprocessing.target_spacing_mm else target
    shape = tuple(int(round(p * 1.25 * t / s)) + 2 for p, t, s in zip(patch_size, target, spacing))
    image = rng.normal(0.0, 1.0, size=(*shape, int(net.inputs[0].shape[-1]))).astype(np.float32)
    image[:2] = 0
    reference = segment_volume(keras_predict_fn(net), image, np.diag([*spacing, 1.0]), preprocessing=preprocessing,
                               patch_size=patch_size, settings=inference, return_probabilities=True,
                               regions_class_order=regions_class_order).labels
    signature = tf.saved_model.load(str(savedmodel)).signatures[SEGMENT_SIGNATURE]
    labels = signature(image=tf.constant(image), spacing_mm=tf.constant(spacing, tf.float64))["labels"].numpy()
    agreement = float((labels == reference).mean()) if labels.shape == reference.shape else 0.0
    if agreement < SEGMENT_AGREEMENT:
        raise BundleError(expected(
            f"at least {SEGMENT_AGREEMENT:.1%} equal labels between the exported {SEGMENT_SIGNATURE!r} signature and "
            "segment_volume", key="segment_label_agreement",
            received=Received(f"{agreement:.4%} (shape {labels.shape} vs {reference.shape})")))
    return {"segment_label_agreement": agreement}
