"""Seconds per volume of sliding-window inference (``segment_volume``), with and without mirroring.

Usage: ``python benchmarks/bench_inference.py [--sizes 128 256] [--patches 32 64 96] [--repeats 3]
[--batch-size 2] [--overlap 0.5] [--format keras] [--budget-s 180]``

The network is the default U-Net of ``configs/base.yaml`` (depth 4, 16 base filters, 3 classes,
batch norm; untrained, which costs the same) run through a bundle, as ``predict.py`` runs it. The
scan is a random 1-channel volume at the target spacing (z-score normalisation, no resampling), so the
time is the whole per-scan path: preprocessing, every window (× 8 with mirroring over all axes),
Gaussian blending, mapping back, argmax.

A cell is measured (median of up to ``--repeats`` runs) when its estimate fits ``--budget-s``;
otherwise it is estimated as ``overhead + network calls × seconds per call``, with the overhead
(everything but the network) measured on the real volume with a network that costs nothing, and the
seconds per call the median of several calls on one batch. Estimated cells are marked ``~``;
measured cells also print the estimate, so its accuracy is visible.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

import segpipe  # noqa: F401  (TensorFlow environment)
from segpipe.data.preprocess import PreprocessSettings
from segpipe.inference.settings import InferenceSettings
from segpipe.inference.segment import segment_volume
from segpipe.inference.sliding_window import mirror_combinations, pad_to_window, window_slices

NUM_CLASSES = 3
SETTINGS = PreprocessSettings(target_spacing_mm=(1.0, 1.0, 1.0), normalization="zscore")


def make_predictor(patch: int, fmt: str, folder: Path):
    """Default-config U-Net written to a bundle and loaded back as ``predict.py`` does."""
    import keras

    from segpipe.export.bundle import load_predictor, write_bundle
    from segpipe.models.unet3d import build_unet3d

    keras.utils.set_random_seed(0)
    model = build_unet3d(1, NUM_CLASSES, depth=4, base_filters=16, max_filters=320, norm="batch")
    bundle = write_bundle(model, folder / f"bundle{patch}", class_names=["background", "a", "b"],
                          preprocessing=SETTINGS, patch_size=[patch] * 3, onnx=fmt == "onnx", verify=False)
    return load_predictor(bundle, fmt)


def seconds_per_call(predict_fn, patch: int, batch_size: int, calls: int = 5) -> float:
    x = np.random.default_rng(0).normal(size=(batch_size, patch, patch, patch, 1)).astype(np.float32)
    predict_fn(x)  # trace / warm up
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        predict_fn(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(predict_fn, image: np.ndarray, patch: int, mirror: tuple[int, ...], args) -> float:
    start = time.perf_counter()
    segment_volume(predict_fn, image, np.eye(4), preprocessing=SETTINGS, patch_size=(patch,) * 3,
                   settings=InferenceSettings(overlap=args.overlap, mirror_axes=mirror, batch_size=args.batch_size))
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--patches", type=int, nargs="+", default=[32, 64, 96])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--format", choices=("keras", "savedmodel", "onnx"), default="keras")
    parser.add_argument("--budget-s", type=float, default=180.0, help="measure a cell only if its runs fit this budget")
    args = parser.parse_args(argv)

    free = lambda x: np.full((*x.shape[:4], NUM_CLASSES), 1.0 / NUM_CLASSES, np.float32)  # noqa: E731
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for patch in args.patches:
            predict_fn = make_predictor(patch, args.format, Path(tmp))
            per_call = seconds_per_call(predict_fn, patch, args.batch_size)
            print(f"patch {patch}^3: {per_call:.3f} s per call of {args.batch_size} window(s)", flush=True)
            for size in args.sizes:
                image = np.random.default_rng(size).normal(100, 20, size=(size,) * 3).astype(np.float32)
                padded, _ = pad_to_window(image[..., None], (patch,) * 3)
                windows = len(window_slices(padded.shape[:3], (patch,) * 3, args.overlap))
                for mirror in ((), (0, 1, 2)):
                    flips = len(mirror_combinations(mirror))
                    calls = -(-windows // args.batch_size) * flips
                    overhead = statistics.median(run(free, image, patch, mirror, args) for _ in range(2))
                    estimate = overhead + calls * per_call
                    repeats = min(args.repeats, int(args.budget_s // estimate))
                    measured = statistics.median(run(predict_fn, image, patch, mirror, args) for _ in range(repeats)) if repeats else None
                    rows.append((size, patch, windows, flips, overhead, estimate, measured, repeats))
                    shown = f"{measured:.1f} s ({repeats} runs)" if measured is not None else f"~{estimate:.0f} s (estimated)"
                    print(f"  {size}^3 mirror={flips}: {windows} windows, {calls} calls -> {shown}", flush=True)

    print(f"\nformat={args.format}, batch_size={args.batch_size}, overlap={args.overlap}, U-Net depth 4 / 16 filters, "
          f"{NUM_CLASSES} classes\n")
    print("| volume | patch | windows | mirroring | seconds per volume | estimate | of which not network |")
    print("|---|---|---|---|---|---|---|")
    for size, patch, windows, flips, overhead, estimate, measured, repeats in rows:
        value = f"{measured:.1f} (median of {repeats})" if measured is not None else f"~{estimate:.0f} (estimated)"
        mirror = "8 flips" if flips > 1 else "off"
        print(f"| {size}³ | {patch}³ | {windows} | {mirror} | {value} | {estimate:.1f} | {overhead:.1f} |")


if __name__ == "__main__":
    main()
