#!/usr/bin/env python
"""Training-step speed of segpipe's 3D U-Net, against the same network in PyTorch.

    python benchmarks/bench_train_step.py                 # default settings, TF and (if installed) PyTorch
    python benchmarks/bench_train_step.py --frameworks tf --repeats 10
    python benchmarks/bench_train_step.py --frameworks tf --precisions float32 mixed_bfloat16 --settings 1
    pip install torch==2.13.0                             # optional, only for the comparison

Every setting runs in its own subprocess, so the peak resident memory (ru_maxrss) belongs to that
setting alone. Per setting it reports the median seconds of a training step and of a forward
(inference) pass after warm-up, the achieved GFLOP/s of the step (a step is counted as 3× the
forward FLOPs: forward, gradient w.r.t. activations and w.r.t. weights), and that as a share of the
forward pass's GFLOP/s, the practical peak of this machine for these convolutions.

TensorFlow runs in each ``--precisions`` (``train.precision``: float32 and Keras's mixed policies, built
as training builds them: ``segpipe.models.precision``); the default is float32 and every mixed
precision this machine supports (``segpipe.planning.hardware.supported_precisions``). PyTorch runs
in float32.

The PyTorch twin (``benchmarks/torch_unet.py``, shared with ``bench_inference.py``) mirrors
``segpipe.models.unet3d.build_unet3d`` layer for layer: two 3×3×3 convolutions + batch norm +
LeakyReLU per level, stride-2 convolution down, transposed convolution up, concatenated skips,
1×1×1 head (parameter counts are printed to show they agree).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (name, patch, batch, base filters, depth)
SETTINGS = [
    ("64³ × 2, 16 filters, 4 levels", (64, 64, 64), 2, 16, 4),
    ("32³ × 2, 16 filters, 4 levels (default config)", (32, 32, 32), 2, 16, 4),
    ("32×48×32 × 2, 16 filters, 4 levels (hippocampus recipe)", (32, 48, 32), 2, 16, 4),
    ("40×56×40 × 4, 32 filters, 4 levels (nnU-Net-sized hippocampus)", (40, 56, 40), 4, 32, 4),
]


def forward_flops(patch, in_channels: int, num_classes: int, base: int, depth: int, max_filters: int = 320) -> float:
    """Multiply-adds × 2 of one forward pass of the U-Net for one sample."""
    filters = [min(base * 2**i, max_filters) for i in range(depth)]
    voxels = [int(patch[0] * patch[1] * patch[2] / 8**i) for i in range(depth)]
    flops, c_in = 0.0, in_channels
    for level, f in enumerate(filters):  # encoder: the first conv of a level runs at that level's size
        flops += 2 * 27 * c_in * f * voxels[level] + 2 * 27 * f * f * voxels[level]
        c_in = f
    for level in reversed(range(depth - 1)):
        f = filters[level]
        flops += 2 * 8 * filters[level + 1] * f * voxels[level + 1]  # transposed conv k2 s2
        flops += 2 * 27 * 2 * f * f * voxels[level] + 2 * 27 * f * f * voxels[level]
    flops += 2 * filters[0] * num_classes * voxels[0]
    return flops


def time_calls(fn, warmup: int, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def compiled_unet_and_batch(patch, batch: int, base: int, depth: int, norm: str = "batch", precision: str = "float32"):
    """segpipe's U-Net (1 channel in, 3 classes) in ``precision`` compiled with Adam + cross-entropy, and a
    random batch (x, one-hot y) for it. Imports TensorFlow: call it in a worker process."""
    sys.path.insert(0, str(ROOT))
    import keras
    import numpy as np

    import segpipe  # noqa: F401  (oneDNN on before TensorFlow loads)
    from segpipe.models import unet3d
    from segpipe.models.precision import model_dtype, wrap_optimizer

    model = unet3d.build_unet3d(1, 3, depth=depth, base_filters=base, norm=norm, dtype=model_dtype(precision))
    model.compile(optimizer=wrap_optimizer(keras.optimizers.Adam(1e-3), precision), loss="categorical_crossentropy")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, *patch, 1)).astype("float32")
    y = np.eye(3, dtype="float32")[rng.integers(0, 3, (batch, *patch))]
    return model, x, y


def worker_tf(patch, batch, base, depth, warmup, repeats, precision="float32") -> dict:
    model, x, y = compiled_unet_and_batch(patch, batch, base, depth, precision=precision)
    step = time_calls(lambda: model.train_on_batch(x, y), warmup, repeats)
    fwd = time_calls(lambda: model.predict_on_batch(x), warmup, repeats)
    return {"step": step, "forward": fwd, "params": model.count_params()}


def worker_torch(patch, batch, base, depth, warmup, repeats, precision="float32") -> dict:
    import torch
    from torch import nn
    from torch_unet import build_torch_unet  # benchmarks/, beside this script

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = build_torch_unet(1, 3, base=base, depth=depth)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    x = torch.randn(batch, 1, *patch)
    y = torch.randint(0, 3, (batch, *patch))

    def step():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()

    def forward():
        with torch.no_grad():
            torch.softmax(model(x), 1)

    model.train()
    step_times = time_calls(step, warmup, repeats)
    model.eval()
    fwd_times = time_calls(forward, warmup, repeats)
    return {"step": step_times, "forward": fwd_times, "params": sum(p.numel() for p in model.parameters())}


def run_worker(framework, patch, batch, base, depth, warmup, repeats, precision="float32") -> dict | None:
    cmd = [sys.executable, __file__, "--worker", framework, "--patch", *map(str, patch), "--batch", str(batch),
           "--filters", str(base), "--depth", str(depth), "--warmup", str(warmup), "--repeats", str(repeats),
           "--precision", precision]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"[{framework}] failed: "
              f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frameworks", nargs="+", default=["tf", "torch"], choices=["tf", "torch"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--precisions", nargs="+", choices=["float32", "mixed_bfloat16", "mixed_float16"],
                        help="TensorFlow's precisions (default: float32 and those this machine supports)")
    parser.add_argument("--settings", type=int, nargs="+",
                        help=f"indices of the settings (0-{len(SETTINGS) - 1}; default: all)")
    parser.add_argument("--worker", choices=["tf", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--patch", type=int, nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--filters", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--depth", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        import resource

        fn = worker_tf if args.worker == "tf" else worker_torch
        result = fn(tuple(args.patch), args.batch, args.filters, args.depth, args.warmup, args.repeats, args.precision)
        result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(json.dumps(result))
        return

    frameworks = list(args.frameworks)
    if "torch" in frameworks:
        try:
            import torch  # noqa: F401
        except ImportError:
            print("PyTorch not installed (pip install torch==2.13.0); comparing TensorFlow only.", file=sys.stderr)
            frameworks.remove("torch")

    precisions = args.precisions
    if precisions is None:
        sys.path.insert(0, str(ROOT))
        from segpipe.planning.hardware import nvidia_gpus, supported_precisions

        precisions, why = supported_precisions("gpu" if nvidia_gpus() else "cpu")
        print(f"precisions: {', '.join(precisions)} ({why})")
    settings = SETTINGS if args.settings is None else [SETTINGS[i] for i in args.settings]
    print(f"medians of {args.repeats} runs after {args.warmup} warm-up runs; "
          "step GFLOP/s = 3 × forward FLOPs / step time\n")
    print("| setting | framework | precision | params | s/step | s/forward | step GFLOP/s | forward GFLOP/s | "
          "step / forward rate | peak RSS (GiB) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, patch, batch, base, depth in settings:
        flops = forward_flops(patch, 1, 3, base, depth) * batch
        steps = {}
        runs = [(fw, p) for fw in frameworks for p in (precisions if fw == "tf" else ["float32"])]
        for fw, precision in runs:
            r = run_worker(fw, patch, batch, base, depth, args.warmup, args.repeats, precision)
            if r is None:
                continue
            step, fwd = statistics.median(r["step"]), statistics.median(r["forward"])
            steps[(fw, precision)] = step
            step_rate, fwd_rate = 3 * flops / step / 1e9, flops / fwd / 1e9
            print(f"| {name} | {fw} | {precision} | {r['params']:,} | {step:.3f} | {fwd:.3f} | {step_rate:.1f} | "
                  f"{fwd_rate:.1f} | {step_rate / fwd_rate:.0%} | {r['peak_rss_gib']:.2f} |", flush=True)
        if ("tf", "float32") in steps and ("torch", "float32") in steps:
            ratio = steps[("tf", "float32")] / steps[("torch", "float32")]
            print(f"| {name} | **TF / PyTorch step time** | float32 | | **{ratio:.2f}×** | | | | | |", flush=True)
        for (fw, precision), step in steps.items():
            if fw == "tf" and precision != "float32" and ("tf", "float32") in steps:
                print(f"| {name} | **TF {precision} / float32 step time** | | | "
                      f"**{step / steps[('tf', 'float32')]:.2f}×** | | | | | |", flush=True)


if __name__ == "__main__":
    main()
