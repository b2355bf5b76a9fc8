"""Where the time of a training step goes: the step time of the U-Net with one part changed at a time.

    python benchmarks/profile_train_step.py                      # 64³ × 2, 16 filters, 4 levels
    python benchmarks/profile_train_step.py --patch 40 56 40 --batch 2 --repeats 10

A variant's difference to the reference step is the cost of the part it removes or replaces:
normalisation (none, instance, TensorFlow's fused batch-norm kernel), the activation (ReLU for
LeakyReLU), the up-sampling (nearest-neighbour up-sampling + a 3×3×3 or 1×1×1 convolution instead
of a 2×2×2 transposed convolution), TensorFlow's thread pools, and the forward pass alone. Each
variant runs in its own process (thread settings must be made before TensorFlow starts), after
warm-up, and the table gives medians.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

VARIANTS = {
    "reference": "segpipe's U-Net: batch norm, LeakyReLU, transposed-conv up-sampling",
    "norm_none": "no normalisation",
    "norm_instance": "instance norm (GroupNormalization, one group per channel)",
    "norm_fused": "batch norm through TensorFlow's fused kernel (FusedBatchNormV3, NDHWC)",
    "relu": "ReLU instead of LeakyReLU",
    "upsample_conv3": "nearest up-sampling + 3×3×3 conv instead of transposed conv",
    "upsample_conv1": "nearest up-sampling + 1×1×1 conv instead of transposed conv",
    "threads_inter1": "inter-op threads 1 (intra-op left at the default)",
    "threads_intra1": "intra-op threads 1",
    "forward_only": "forward pass (inference mode), for scale",
}


def _patched_layers(variant: str):
    """The ``keras.layers`` namespace seen by segpipe.models.unet3d, with the variant's replacement."""
    import tensorflow as tf
    from keras import layers

    namespace = type("Layers", (), {k: getattr(layers, k) for k in dir(layers) if not k.startswith("_")})

    class FusedBatchNorm(layers.BatchNormalization):
        def call(self, inputs, training=None, mask=None):
            if not (training and self.trainable):
                return super().call(inputs, training=training, mask=mask)
            y, mean, var, *_ = tf.raw_ops.FusedBatchNormV3(
                x=inputs, scale=self.gamma, offset=self.beta, mean=tf.constant([], tf.float32),
                variance=tf.constant([], tf.float32), epsilon=self.epsilon, exponential_avg_factor=1.0,
                data_format="NDHWC", is_training=True)
            n = tf.cast(tf.reduce_prod(tf.shape(inputs)[:-1]), tf.float32)
            var = var * (n - 1.0) / n  # the kernel returns the unbiased variance; Keras keeps the biased one
            self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1 - self.momentum))
            self.moving_variance.assign(self.moving_variance * self.momentum + var * (1 - self.momentum))
            return y

    def upsample_then_conv(kernel: int):
        def make(filters, _kernel, strides, name):
            def apply(x):
                return layers.Conv3D(filters, kernel, padding="same", name=name)(layers.UpSampling3D(strides)(x))
            return apply
        return make

    if variant == "norm_fused":
        namespace.BatchNormalization = FusedBatchNorm
    elif variant == "relu":
        namespace.LeakyReLU = lambda negative_slope, name: layers.ReLU(name=name)
    elif variant == "upsample_conv3":
        namespace.Conv3DTranspose = upsample_then_conv(3)
    elif variant == "upsample_conv1":
        namespace.Conv3DTranspose = upsample_then_conv(1)
    return namespace


def worker(variant: str, patch, batch: int, base: int, depth: int, warmup: int, repeats: int) -> dict:
    sys.path.insert(0, str(ROOT))
    import tensorflow as tf

    import segpipe  # noqa: F401  (oneDNN on before TensorFlow loads)

    if variant == "threads_inter1":
        tf.config.threading.set_inter_op_parallelism_threads(1)
    elif variant == "threads_intra1":
        tf.config.threading.set_intra_op_parallelism_threads(1)
    from bench_train_step import compiled_unet_and_batch, time_calls

    import segpipe.models.unet3d as unet3d

    unet3d.layers = _patched_layers(variant)  # build_unet3d looks its layer classes up here
    norm = {"norm_none": "none", "norm_instance": "instance"}.get(variant, "batch")
    model, x, y = compiled_unet_and_batch(patch, batch, base, depth, norm=norm)
    fn = (lambda: model.predict_on_batch(x)) if variant == "forward_only" else (lambda: model.train_on_batch(x, y))
    return {"times": time_calls(fn, warmup, repeats), "params": model.count_params()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patch", type=int, nargs=3, default=[64, 64, 64])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--filters", type=int, default=16)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--only", nargs="+", choices=list(VARIANTS))
    parser.add_argument("--worker", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    setting = (tuple(args.patch), args.batch, args.filters, args.depth, args.warmup, args.repeats)
    if args.worker:
        print(json.dumps(worker(args.worker, *setting)))
        return

    print(f"patch {args.patch}, batch {args.batch}, {args.filters} filters, {args.depth} levels; "
          f"medians of {args.repeats} steps after {args.warmup} warm-up steps\n")
    print("| variant | change | params | s/step | vs reference |")
    print("|---|---|---|---|---|")
    reference = None
    for variant in args.only or list(VARIANTS):
        cmd = [sys.executable, __file__, "--worker", variant, "--patch", *map(str, args.patch),
               "--batch", str(args.batch), "--filters", str(args.filters), "--depth", str(args.depth),
               "--warmup", str(args.warmup), "--repeats", str(args.repeats)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"| {variant} | failed: {proc.stderr.strip().splitlines()[-1]} | | | |")
            continue
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        median = statistics.median(result["times"])
        reference = median if variant == "reference" else reference
        ratio = f"{median / reference:.2f}×" if reference else ""
        print(f"| {variant} | {VARIANTS[variant]} | {result['params']:,} | {median:.3f} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
