"""Build everything a run needs from its config and train it with ``model.fit``.

A run directory (``<output_dir>/<name>/``) describes itself:

    config.yaml        the fully resolved config
    splits.json        the train/validation case ids
    status.json        "running" or "finished"
    history.csv        one row per finished epoch (loss, val_loss, per-class Dice, ...)
    tensorboard/       TensorBoard logs
    checkpoints/last/  model.keras + state.json of the last finished epoch (crash-safe, see checkpoints.py)
    checkpoints/best.keras   the epoch with the best ``train.monitor`` value
    model.keras        the final model
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

from segpipe.config import Config, ConfigError, check_patch_size, load_config, to_yaml
from segpipe.data.layouts import Dataset, load_dataset
from segpipe.data.phantoms import PhantomSettings, write_phantom_dataset
from segpipe.io import read_json, write_json, write_text


def prepare_dataset(config: Config) -> Dataset:
    """Open ``data.root``; generate phantoms there first if ``data.phantoms`` is set and it is missing."""
    root = Path(config.data.root)
    phantoms = config.data.phantoms
    if phantoms is not None:
        settings = PhantomSettings(
            num_cases=phantoms.num_cases,
            shape=tuple(phantoms.shape),
            spacing_mm=tuple(phantoms.spacing_mm),
            seed=phantoms.seed,
            noise_std=phantoms.noise_std,
        )
        if not root.exists():
            print(f"Generating {settings.num_cases} phantom cases into {root}")
            write_phantom_dataset(root, settings)
        else:
            found = read_json(root / "dataset.json").get("segpipe_phantom_settings")
            wanted = {k: list(v) if isinstance(v, tuple) else v for k, v in vars(settings).items()}
            if found != wanted:
                raise ConfigError(
                    f"data.root: {root} holds a dataset made with other phantom settings. "
                    f"Expected: {wanted}. Received: {found}. Delete the folder or choose another data.root."
                )
    return load_dataset(root)


def make_split(case_ids: list[str], val_fraction: float, seed: int) -> dict[str, list[str]]:
    """A seeded random split; at least one case on each side."""
    if len(case_ids) < 2:
        raise ValueError(f"Expected at least 2 cases to split into training and validation. Received: {len(case_ids)}")
    order = np.random.default_rng(seed).permutation(sorted(case_ids))
    n_val = min(max(1, round(len(case_ids) * val_fraction)), len(case_ids) - 1)
    return {"train": sorted(order[n_val:].tolist()), "val": sorted(order[:n_val].tolist())}


def build_model(config: Config, in_channels: int, num_classes: int):
    from segpipe.models.unet3d import build_unet3d

    m = config.model
    return build_unet3d(
        in_channels,
        num_classes,
        depth=m.depth,
        base_filters=m.base_filters,
        max_filters=m.max_filters,
        norm=m.norm,
        deep_supervision=m.deep_supervision,
    )


def build_optimizer(config: Config):
    import keras

    t = config.train
    total_steps = t.epochs * t.steps_per_epoch
    if t.lr_schedule == "poly":
        lr = keras.optimizers.schedules.PolynomialDecay(t.learning_rate, total_steps, 0.0, power=0.9)
    elif t.lr_schedule == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(t.learning_rate, total_steps)
    else:
        lr = t.learning_rate
    if t.optimizer == "sgd":
        return keras.optimizers.SGD(lr, momentum=t.momentum, nesterov=True, weight_decay=t.weight_decay or None)
    if t.optimizer == "adamw":
        return keras.optimizers.AdamW(lr, weight_decay=t.weight_decay)
    return keras.optimizers.Adam(lr, weight_decay=t.weight_decay or None)


def build_loss(config: Config, num_classes: int):
    """The configured loss, checked against the dataset's classes (before any data is loaded)."""
    from segpipe.losses import DeepSupervisionLoss, get_loss

    try:
        loss = get_loss(config.loss, num_classes=num_classes)
    except ValueError as exc:
        raise ConfigError(f"loss: {exc}") from exc
    if config.model.deep_supervision:
        # one output per decoder level except the lowest, full resolution first
        return DeepSupervisionLoss(loss, num_outputs=max(1, config.model.depth - 1))
    return loss


def compile_model(model, config: Config, class_names: list[str]) -> None:
    from segpipe.metrics.streaming import PerClassDice

    dice = PerClassDice(class_names, name="dice")
    # with deep supervision, the Dice metric watches the full-resolution output only
    metrics = [[dice]] + [[] for _ in model.outputs[1:]] if len(model.outputs) > 1 else [dice]
    model.compile(optimizer=build_optimizer(config), loss=build_loss(config, len(class_names)), metrics=metrics)


def run_dir_of(config: Config) -> Path:
    return Path(config.output_dir) / str(config.name)


def run_status(run_dir: Path) -> str | None:
    path = Path(run_dir) / "status.json"
    return read_json(path)["status"] if path.is_file() else None


def train(config: Config, *, resume: bool = False, overwrite: bool = False, verbose: int | None = None) -> Path:
    """Train the run described by ``config``; returns its run directory.

    A finished run is left alone (unless ``overwrite``); an unfinished one needs ``resume`` (continue
    from its last checkpoint) or ``overwrite`` (start again).
    """
    import keras

    from segpipe.checkpoints import RunCheckpoint, find_last_checkpoint, read_state, save_model_atomic
    from segpipe.data.loader import PatchSampler, load_cases, train_dataset, validation_dataset

    run_dir = run_dir_of(config)
    status = run_status(run_dir)
    if run_dir.exists() and overwrite:
        shutil.rmtree(run_dir)
        status = None
    elif status == "finished":
        print(f"Run {run_dir} has already finished; nothing to do (use --overwrite to train it again).")
        return run_dir
    elif run_dir.exists() and any(run_dir.iterdir()) and not resume:
        raise FileExistsError(
            f"Run directory {run_dir} holds an unfinished run. Use --resume to continue it, "
            f"--overwrite to start again, or --set name=... for a new run."
        )
    checkpoint = find_last_checkpoint(run_dir / "checkpoints" / "last") if resume else None
    state: dict[str, Any] = read_state(checkpoint) if checkpoint else {}

    dataset = prepare_dataset(config)
    check_patch_size(config.data.patch_size, config.model.depth)
    build_loss(config, dataset.num_classes)  # a bad loss option fails here, not mid-training
    splits_path = run_dir / "splits.json"
    split = read_json(splits_path) if splits_path.is_file() else make_split(
        [c.case_id for c in dataset.cases], config.data.val_fraction, config.seed
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(run_dir / "config.yaml", to_yaml(config))
    write_json(splits_path, split)
    write_json(run_dir / "status.json", {"status": "running"})

    keras.utils.set_random_seed(config.seed)
    model = build_model(config, len(dataset.channel_names), dataset.num_classes)
    compile_model(model, config, dataset.class_names)
    initial_epoch = int(state.get("epoch", 0))
    if checkpoint is not None:
        model.optimizer.build(model.trainable_variables)
        model.load_weights(checkpoint / "model.keras")  # weights and optimizer state
        print(f"Resuming {run_dir} after epoch {initial_epoch}")

    train_cases = load_cases(dataset, split["train"])
    val_cases = load_cases(dataset, split["val"])
    d = config.data
    sampler = PatchSampler(train_cases, d.patch_size, d.batch_size, d.foreground_fraction, config.seed)
    start = initial_epoch * config.train.steps_per_epoch * d.batch_size
    train_ds = train_dataset(sampler, dataset.num_classes, start_index=start, num_workers=d.num_workers)
    val_ds = validation_dataset(val_cases, dataset.num_classes, divisor=2 ** (config.model.depth - 1))

    callbacks = [
        RunCheckpoint(run_dir, config.train.monitor, state),
        keras.callbacks.TensorBoard(log_dir=str(run_dir / "tensorboard"), write_graph=False),
    ]
    if initial_epoch < config.train.epochs:
        model.fit(
            train_ds,
            epochs=config.train.epochs,
            steps_per_epoch=config.train.steps_per_epoch,
            initial_epoch=initial_epoch,
            validation_data=val_ds,
            callbacks=callbacks,
            shuffle=False,  # the sampler draws random patches itself
            verbose=(1 if sys.stdout.isatty() else 2) if verbose is None else verbose,
        )
    save_model_atomic(model, run_dir / "model.keras")
    write_json(run_dir / "status.json", {"status": "finished"})
    return run_dir


def load_run_config(run_dir: str | Path) -> Config:
    """The resolved config a run was trained with."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"Expected a run directory with config.yaml. Received: {run_dir}")
    return load_config(path)
