"""Loader speed: patches per second with the default augmentations, and input wait in training.

Usage: ``python benchmarks/bench_loader.py [--datasets hippocampus large] [--work /tmp/segpipe_bench]``

Two datasets, each prepared through :func:`segpipe.data.pipeline.prepare_data` (default
preprocessing; caches, fingerprints and the generated data go under ``--work``, never into the repo):

* ``hippocampus``: ``../shared/data/hippocampus`` (200 small MRI cases, read-only), patch 40x56x40;
* ``large``: ten generated 256³ phantom volumes (1 mm), patch 128³ (phantoms drawn at 64³ and
  upsampled, with noise added at full resolution: seconds per case instead of minutes).

Patch sizes are the fingerprint's ``patch_size_hint`` (nnU-Net's choice: the median case, capped at
128). For each: patches/s of the sampler alone in one thread (default augmentations), of the
``tf.data`` loader (``num_workers`` parallel calls, batches of 2, one-hot), and, in a short training
run of the default U-Net (``train_on_batch`` on that loader), the share of step time spent waiting
for the next batch. Each figure is the median of ``--repeats`` runs.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
from pathlib import Path

import numpy as np

import segpipe  # noqa: F401  (TensorFlow environment)
from segpipe.config import Config, load_config
from segpipe.data.loader import train_dataset, train_sampler
from segpipe.data.phantoms import CLASS_NAMES, PhantomSettings, make_phantom_case
from segpipe.data.pipeline import PreparedData, prepare_data
from segpipe.data.preprocess import resample
from segpipe.data.sampling import PatchSampler
from segpipe.io import write_json, write_nifti

REPO = Path(__file__).resolve().parent.parent
HIPPOCAMPUS = (REPO.parent / "shared" / "data" / "hippocampus").resolve()
DATASETS = {
    "hippocampus": ["data.phantoms=null", f"data.root={HIPPOCAMPUS}"],
    "large": ["data.phantoms=null"],
}


def prepare(name: str, work: Path, workers: int) -> tuple[Config, PreparedData]:
    """The dataset's config (patch size from its fingerprint) and its prepared, cached cases."""
    overrides = [*DATASETS[name], f"output_dir={work}", f"data.preprocess_workers={workers}", "data.check=headers"]
    if name == "large":
        root = work / "large256"
        if not root.exists():
            write_large_dataset(root)
        overrides.append(f"data.root={root}")
    config = load_config(None, overrides)
    prepared = prepare_data(config, progress=True)
    hint = prepared.fingerprint["patch_size_hint"]
    config = load_config(None, [*overrides, f"data.patch_size={hint}", "model.depth=4"])
    return config, prepared


def write_large_dataset(root: Path, num_cases: int = 10, size: int = 256, coarse: int = 64) -> Path:
    """Phantoms of ``size``³ voxels at 1 mm in MSD layout: drawn at ``coarse``³, upsampled, noise added."""
    settings = PhantomSettings(num_cases=num_cases, shape=(coarse,) * 3, spacing_mm=(size / coarse,) * 3,
                               noise_std=0.0)
    tmp = root.with_name(f".{root.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    training = []
    for i in range(num_cases):
        print(f"Generating large case {i + 1}/{num_cases}", flush=True)
        image, label = make_phantom_case(i, settings)
        image = resample(image, (size,) * 3, order=1)
        image += np.random.default_rng(i).normal(0.0, 50.0, image.shape).astype(np.float32)
        label = resample(label, (size,) * 3, order=0)
        name = f"large_{i:03d}.nii.gz"
        write_nifti(tmp / "imagesTr" / name, image, np.eye(4))
        write_nifti(tmp / "labelsTr" / name, label, np.eye(4))
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    write_json(tmp / "dataset.json", {"name": "large phantoms", "modality": {"0": "MRI"},
                                      "labels": {str(k): v for k, v in CLASS_NAMES.items()}, "training": training})
    os.replace(tmp, root)
    return root


def sampler_rate(config: Config, prepared: PreparedData, count: int) -> float:
    """Patches/s of one thread drawing augmented patches."""
    sampler = make_sampler(config, prepared, seed=1)
    start = time.perf_counter()
    for index in range(count):
        sampler(index)
    return count / (time.perf_counter() - start)


def loader_rate(config: Config, prepared: PreparedData, batches: int) -> float:
    """Patches/s of the tf.data loader (after its first batch: pipeline start-up excluded)."""
    dataset = train_dataset(make_sampler(config, prepared, seed=2), prepared.dataset.num_classes,
                            num_workers=config.data.num_workers)
    iterator = iter(dataset)
    next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * config.data.batch_size / (time.perf_counter() - start)


def input_wait(config: Config, prepared: PreparedData, steps: int, warmup: int = 2) -> tuple[float, float]:
    """(share of step time waiting for input, seconds per step) in a short training run."""
    from segpipe.training.train import build_model, compile_model

    model = build_model(config, prepared.num_channels, prepared.dataset.num_classes)
    compile_model(model, config, prepared.dataset.class_names)
    dataset = train_dataset(make_sampler(config, prepared, seed=3), prepared.dataset.num_classes,
                            num_workers=config.data.num_workers)
    iterator = iter(dataset)
    waited = total = 0.0
    for step in range(warmup + steps):
        t0 = time.perf_counter()
        images, labels = next(iterator)
        t1 = time.perf_counter()
        model.train_on_batch(images, labels)
        t2 = time.perf_counter()
        if step >= warmup:  # the first steps compile the graph and fill the prefetch buffer
            waited, total = waited + (t1 - t0), total + (t2 - t0)
    return waited / total, total / steps


def make_sampler(config: Config, prepared: PreparedData, seed: int) -> PatchSampler:
    """The training sampler; base.yaml's ``data.augment`` is the default augmentation."""
    return train_sampler(prepared, config.data, seed=seed)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--work", type=Path, default=Path("/tmp/segpipe_bench"), help="caches and generated data")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="preprocessing processes")
    args = parser.parse_args(argv)

    rows = []
    for name in args.datasets:
        config, prepared = prepare(name, args.work, args.workers)
        big = max(config.data.patch_size) > 64
        samples, batches, steps = (20, 10, 3) if big else (200, 100, 20)
        one = [sampler_rate(config, prepared, samples) for _ in range(args.repeats)]
        loader = [loader_rate(config, prepared, batches) for _ in range(args.repeats)]
        waits = [input_wait(config, prepared, steps) for _ in range(args.repeats)]
        rows.append((name, len(prepared.cases),
                     "x".join(map(str, prepared.cases[next(iter(prepared.cases))].meta["shape"])),
                     "x".join(map(str, config.data.patch_size)), statistics.median(one), statistics.median(loader),
                     statistics.median(w for w, _ in waits), statistics.median(s for _, s in waits)))
        print(f"{name}: sampler {one}, loader {loader}, wait {waits}", flush=True)

    print(f"\nLoader with default augmentations, batch 2, {config.data.num_workers} tf.data workers "
          f"(median of {args.repeats}):\n")
    print("| dataset | cases | first case (preprocessed) | patch | patches/s, 1 thread | patches/s, tf.data | "
          "input wait / step time | s/step (U-Net depth 4, 16 filters) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, n, shape, patch, one, loader, wait, step in rows:
        print(f"| {name} | {n} | {shape} | {patch} | {one:.1f} | {loader:.1f} | {100 * wait:.1f}% | {step:.2f} |")


if __name__ == "__main__":
    main()
