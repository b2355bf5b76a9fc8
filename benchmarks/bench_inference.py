#!/usr/bin/env python
"""Seconds per volume and peak RSS of whole-scan inference: segpipe with each runtime, and MONAI.

    python benchmarks/bench_inference.py                      # 128³ and 256³, mirroring off and on
    python benchmarks/bench_inference.py --sizes 128 --runtimes keras openvino-bf16 monai --budget-s 60
    pip install -e ".[bench,onnx,openvino]"                  # torch + MONAI for the comparison

segpipe: the default U-Net of ``configs/base.yaml`` (depth 4, 16 base filters, batch norm, 3
classes, 32³ window; untrained, which costs the same) written to a bundle and loaded with each
runtime as ``predict.py`` loads it; :func:`segpipe.inference.segment.segment_volume` on a random 1-channel
volume at the target spacing (z-score, no resampling): preprocessing, every window (× 8 with
mirroring over all axes), Gaussian blending, argmax, back to the scan's grid, labels only.
``keras`` with 2 windows per call is today's default path, the reference of the ratios.

MONAI: ``monai.inferers.sliding_window_inference`` with the PyTorch twin of the same network
(``benchmarks/torch_unet.py``, the one ``bench_train_step.py`` uses), same window, overlap,
windows per call, Gaussian weighting (σ = 0.125 of the window) and mirroring (every window batch
predicted under the 8 flips, flipped back and averaged inside the predictor), z-scored input,
argmax of the stitched probabilities.

Every runtime runs in its own subprocess, its cells from the smallest volume up, so the peak RSS
read after a cell (``VmHWM``: runtime, model and volume so far) is that cell's. A cell is measured
(median of up to ``--repeats`` runs) when its runs fit ``--budget-s``, else estimated as
(non-network time) + network calls × seconds per call, both measured in that subprocess; estimated
cells are marked ``~``. ``--memory-shape`` adds the peak RSS of a labels-only 512×512×300 volume with
the runtime loaded and called once, the windows then predicted by a network that costs nothing (the
blending and preprocessing memory is what grows with the volume; the network's working memory is
that of one batch).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

NUM_CLASSES = 3
SEGPIPE_RUNTIMES = ("keras", "savedmodel", "onnx", "openvino", "openvino-bf16")


# ---------------------------------------------------------------------------------------------- workers


def peak_rss_gib() -> float:
    """This process's peak resident memory (VmHWM; ``ru_maxrss`` would include the forking parent's)."""
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith("VmHWM")).split()[1]) / 2**20


def _windows(size: int, patch: int, overlap: float) -> int:
    from segpipe.inference.sliding_window import window_slices

    return len(window_slices((size,) * 3, (patch,) * 3, overlap))


def _free_network(x):
    import numpy as np

    return np.full((*x.shape[:4], NUM_CLASSES), 1.0 / NUM_CLASSES, np.float32)


def worker_export(folder: str, patch: int) -> dict:
    import keras

    import segpipe  # noqa: F401  (TensorFlow environment)
    from segpipe.data.preprocess import PreprocessSettings
    from segpipe.export.bundle import write_bundle
    from segpipe.models.unet3d import build_unet3d

    keras.utils.set_random_seed(0)
    model = build_unet3d(1, NUM_CLASSES, depth=4, base_filters=16, max_filters=320, norm="batch")
    onnx = all(__import__("importlib").util.find_spec(m) for m in ("tf2onnx", "onnxruntime"))
    bundle = write_bundle(model, Path(folder) / "bundle", class_names=["background", "a", "b"],
                          preprocessing=PreprocessSettings(target_spacing_mm=(1.0, 1.0, 1.0), normalization="zscore"),
                          patch_size=[patch] * 3, onnx=onnx, segment=False, overwrite=True)
    meta = json.loads((bundle / "bundle.json").read_text())
    return {"files": sorted(meta["files"]), "verification": meta["verification"], "params": model.count_params()}


def worker_segpipe(bundle: str, runtime: str, cells: list[tuple[int, bool]], patch: int, args) -> list[dict]:
    import numpy as np

    import segpipe  # noqa: F401  (TensorFlow environment)
    from segpipe.inference.runtimes import load_predictor, read_bundle
    from segpipe.inference.segment import segment_volume
    from segpipe.inference.settings import InferenceSettings

    b = read_bundle(bundle)
    predict_fn = load_predictor(b, runtime, threads=args.threads)

    def run(fn, image, mirror):
        settings = InferenceSettings(overlap=args.overlap, mirror_axes=(0, 1, 2) if mirror else (),
                                     batch_size=args.batch_size)
        start = time.perf_counter()
        segment_volume(fn, image, np.eye(4), preprocessing=b.preprocessing, patch_size=b.patch_size, settings=settings)
        return time.perf_counter() - start

    return _measure_cells(run, predict_fn, _free_network, cells, patch, args)


def worker_monai(cells: list[tuple[int, bool]], patch: int, args) -> list[dict]:
    import torch
    from monai.inferers import sliding_window_inference
    from torch_unet import build_torch_unet

    torch.set_num_threads(args.torch_threads)
    torch.manual_seed(0)
    model = build_torch_unet(1, NUM_CLASSES, base=16, depth=4).eval()
    every_flip = [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]

    def mirrored(net, flips):
        def predictor(x):
            total = None
            for axes in flips:
                p = net(torch.flip(x, axes) if axes else x)
                p = torch.flip(p, axes) if axes else p
                total = p if total is None else total + p
            return total / len(flips)
        return predictor

    network = lambda x: torch.softmax(model(x), 1)  # noqa: E731

    def run(net, image, mirror):
        start = time.perf_counter()
        with torch.inference_mode():
            x = torch.from_numpy((image - image.mean()) / image.std())[None, None]
            probabilities = sliding_window_inference(x, (patch,) * 3, args.batch_size,
                                                     mirrored(net, every_flip if mirror else [()]),
                                                     overlap=args.overlap, mode="gaussian", sigma_scale=0.125,
                                                     padding_mode="constant")
            labels = torch.argmax(probabilities[0], 0).to(torch.uint8).numpy()
        assert labels.shape == image.shape
        return time.perf_counter() - start

    def call(x):  # channels-last NumPy batch, as segpipe's runtimes take it
        with torch.inference_mode():
            return network(torch.from_numpy(x).permute(0, 4, 1, 2, 3)).numpy()

    free = lambda x: torch.full((x.shape[0], NUM_CLASSES, *x.shape[2:]), 1.0 / NUM_CLASSES)  # noqa: E731
    results = _measure_cells(lambda net, image, mirror: run(network if net is call else free, image, mirror),
                             call, free, cells, patch, args)
    for r in results:
        r["params"] = sum(p.numel() for p in model.parameters())
    return results


def _measure_cells(run, predict_fn, free_fn, cells, patch, args) -> list[dict]:
    """Per cell: an estimate from one batch's call time and the non-network time, then measured runs
    if they fit the budget. Cells go from small to large volumes, so the peak RSS read after each
    (the process's peak so far) is that cell's."""
    import numpy as np

    x = np.random.default_rng(0).normal(size=(args.batch_size, patch, patch, patch, 1)).astype(np.float32)
    predict_fn(x)  # trace / compile / warm up
    calls = []
    for _ in range(5):
        start = time.perf_counter()
        predict_fn(x)
        calls.append(time.perf_counter() - start)
    per_call = statistics.median(calls)
    results = []
    for size, mirror in sorted(cells):
        image = np.random.default_rng(size).normal(100, 20, size=(size,) * 3).astype(np.float32)
        windows = _windows(size, patch, args.overlap)
        overhead = run(free_fn, image, mirror)
        estimate = overhead + -(-windows // args.batch_size) * (8 if mirror else 1) * per_call
        repeats = min(args.repeats, int(args.budget_s // estimate))
        times = [run(predict_fn, image, mirror) for _ in range(repeats)]
        results.append({"size": size, "mirror": mirror, "per_call": per_call, "overhead": overhead,
                        "estimate": estimate, "times": times, "windows": windows, "peak_rss_gib": peak_rss_gib(),
                        "load": os.getloadavg()[0]})
    return results


def worker_memory(bundle: str, runtime: str, shape: tuple[int, ...], args) -> dict:
    import numpy as np

    import segpipe  # noqa: F401  (TensorFlow environment)
    from segpipe.inference.runtimes import load_predictor, read_bundle
    from segpipe.inference.segment import segment_volume
    from segpipe.inference.settings import InferenceSettings

    b = read_bundle(bundle)
    predict_fn = load_predictor(b, runtime, threads=args.threads)
    predict_fn(np.zeros((args.batch_size, *b.patch_size, 1), np.float32))  # the runtime's own memory, once
    image = np.random.default_rng(0).normal(100, 20, size=shape).astype(np.float32)
    start = time.perf_counter()
    result = segment_volume(_free_network, image, np.eye(4), preprocessing=b.preprocessing, patch_size=b.patch_size,
                            settings=InferenceSettings(overlap=args.overlap, mirror_axes=(),
                                                       batch_size=args.batch_size))
    assert result.labels.shape == shape and result.probabilities is None
    return {"seconds_without_network": time.perf_counter() - start, "voxels": int(np.prod(shape)),
            "peak_rss_gib": peak_rss_gib()}


# ---------------------------------------------------------------------------------------------- driver


def _cells(spec: str) -> list[tuple[int, bool]]:
    return [(int(size), mirror == "1") for size, mirror in (cell.split(":") for cell in spec.split(","))]


def _spawn(args, *worker_args) -> dict | None:
    cmd = [sys.executable, __file__, "--worker", *map(str, worker_args), "--overlap", str(args.overlap),
           "--batch-size", str(args.batch_size), "--repeats", str(args.repeats), "--budget-s", str(args.budget_s),
           "--torch-threads", str(args.torch_threads)] + (["--threads", str(args.threads)] if args.threads else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"[{' '.join(map(str, worker_args))}] failed: {proc.stderr.strip().splitlines()[-1:] or proc.returncode}",
              file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _cell(result: dict) -> str:
    if result["times"]:
        return f"{statistics.median(result['times']):.1f} (median of {len(result['times'])})"
    return f"~{result['estimate']:.0f} (estimated)"


def _seconds(result: dict) -> float:
    return statistics.median(result["times"]) if result["times"] else result["estimate"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--patch", type=int, default=32)
    parser.add_argument("--mirror", nargs="+", choices=("off", "on"), default=["off", "on"])
    parser.add_argument("--runtimes", nargs="+", default=[*SEGPIPE_RUNTIMES, "monai"],
                        choices=[*SEGPIPE_RUNTIMES, "monai"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=2, help="windows per network call, every runtime")
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime / OpenVINO threads (default: theirs)")
    parser.add_argument("--torch-threads", type=int, default=2)
    parser.add_argument("--budget-s", type=float, default=200.0, help="measure a cell only if its runs fit this budget")
    parser.add_argument("--memory-shape", type=int, nargs=3, default=[512, 512, 300])
    parser.add_argument("--memory-runtimes", nargs="+", default=["fastest", "keras"],
                        help="runtimes for the memory cell ('fastest': the fastest segpipe runtime of the table)")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        kind, *rest = args.worker
        if kind == "export":
            result = worker_export(rest[0], int(rest[1]))
        elif kind == "segpipe":
            result = worker_segpipe(rest[0], rest[1], _cells(rest[2]), int(rest[3]), args)
        elif kind == "monai":
            result = worker_monai(_cells(rest[0]), int(rest[1]), args)
        else:
            result = worker_memory(rest[0], rest[1], tuple(int(s) for s in rest[2:5]), args)
        print(json.dumps(result))
        return

    started = time.time()
    print(f"load average before: {os.getloadavg()[0]:.1f}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        exported = _spawn(args, "export", tmp, args.patch)
        if exported is None:
            sys.exit("export failed")
        bundle = str(Path(tmp) / "bundle")
        print(f"bundle files {exported['files']}, verification {exported['verification']}", flush=True)
        rows = []
        cells = [(size, mirror == "on") for size in args.sizes for mirror in args.mirror]
        spec = ",".join(f"{size}:{int(mirror)}" for size, mirror in cells)
        for runtime in args.runtimes:
            if runtime != "monai" and runtime.split("-")[0] not in exported["files"]:
                print(f"  {runtime}: not in the bundle (runtime not installed)", flush=True)
                continue
            results = (_spawn(args, "monai", spec, args.patch) if runtime == "monai"
                       else _spawn(args, "segpipe", bundle, runtime, spec, args.patch))
            for result in results or []:
                rows.append((result["size"], "on" if result["mirror"] else "off", runtime, result))
                print(f"  {result['size']}³ mirror {rows[-1][1]} {runtime}: {_cell(result)} s, estimate "
                      f"{result['estimate']:.1f} s, per call {result['per_call']:.3f} s, "
                      f"peak {result['peak_rss_gib']:.2f} GiB  "
                      f"[{time.time() - started:.0f} s, load {result['load']:.1f}]", flush=True)
        rows.sort(key=lambda r: (r[0], r[1], [*SEGPIPE_RUNTIMES, "monai"].index(r[2])))
        memory = []
        if args.memory_shape:
            measured = [r for r in rows if r[2] != "monai"]
            fastest = min(measured, key=lambda r: _seconds(r[3]))[2] if measured else "keras"
            for runtime in dict.fromkeys(fastest if r == "fastest" else r for r in args.memory_runtimes):
                memory.append((runtime, _spawn(args, "memory", bundle, runtime, *args.memory_shape)))

    print(f"\nbatch {args.batch_size} windows per call, overlap {args.overlap}, window {args.patch}³, default U-Net "
          f"(depth 4, 16 filters, {NUM_CLASSES} classes, {exported['params']:,} parameters), labels only; "
          f"threads: runtimes' default, torch {args.torch_threads}; {time.time() - started:.0f} s in all; "
          f"load average after: {os.getloadavg()[0]:.1f}\n")
    print("| volume | mirroring | runtime | seconds per volume | vs keras | peak RSS (GiB) | estimate (s) | s per call "
          "| not network (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for size, mirror, runtime, result in rows:
        reference = next((r for s, m, rt, r in rows if s == size and m == mirror and rt == "keras"), None)
        ratio = f"{_seconds(result) / _seconds(reference):.2f}×" if reference else ""
        print(f"| {size}³ | {mirror} | {runtime} | {_cell(result)} | {ratio} | {result['peak_rss_gib']:.2f} | "
              f"{result['estimate']:.1f} | {result['per_call']:.3f} | {result['overhead']:.1f} |")
    for runtime, m in memory:
        if m:
            print(f"\npeak RSS, {'×'.join(map(str, args.memory_shape))} labels only, {runtime} loaded: "
                  f"{m['peak_rss_gib']:.2f} GiB ({m['peak_rss_gib'] * 2**30 / m['voxels']:.1f} bytes per voxel in all; "
                  f"{m['seconds_without_network']:.0f} s without the network)")

if __name__ == "__main__":
    main()
