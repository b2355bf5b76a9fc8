"""The typed configuration tree: one dataclass per section, with ranges in field metadata.

Each key is documented where it is declared. Reading YAML, overrides and validation are in
:mod:`segpipe.config.loading`; ``inference`` is :class:`segpipe.inference.settings.InferenceSettings`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal


from segpipe.inference.settings import InferenceSettings

class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key."""


def _range(minimum: float | None = None, maximum: float | None = None, *, exclusive_min: bool = False) -> dict:
    return {"min": minimum, "max": maximum, "exclusive_min": exclusive_min}


@dataclass
class PhantomConfig:
    """Settings of the generated phantom dataset (see ``segpipe.data.phantoms``)."""

    num_cases: int = field(default=24, metadata=_range(2))
    shape: list[int] = field(default_factory=lambda: [48, 48, 48], metadata=_range(8))
    spacing_mm: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0], metadata=_range(0, exclusive_min=True))
    seed: int = 0
    noise_std: float = field(default=0.25, metadata=_range(0))


@dataclass
class DataConfig:
    """The dataset, its preprocessing and cache, the split, and the patch loader (docs/data.md)."""

    # dataset folder, relative to the working dir; null in a config file means "give it on the command line"
    root: str | None = "data/phantoms"
    phantoms: PhantomConfig | None = None  # if set and ``root`` does not exist, generate phantoms there
    layout: Literal["auto", "msd", "nnunet", "folders"] = "auto"
    check: Literal["full", "headers", "off"] = "headers"  # integrity check before training
    # Dataset cache folder (fingerprint, splits, preprocessed-<settings hash>/); None: under output_dir.
    cache_dir: str | None = None
    preprocess_workers: int = field(default=2, metadata=_range(1))  # processes for check/fingerprint/cache
    # Preprocessing (segpipe.data.preprocess.PreprocessSettings); None spacing: the fingerprint's.
    target_spacing_mm: list[float] | None = field(default=None, metadata=_range(0, exclusive_min=True))
    normalization: str | list[str] = "zscore"  # one scheme, or one per channel
    crop_to_nonzero: bool = True
    image_order: int = field(default=3, metadata=_range(0, 5))
    label_interpolation: Literal["onehot_linear", "nearest"] = "onehot_linear"
    # Label conventions (docs/data.md, "Regions and ignored voxels"); dataset.json may declare them too.
    # The value of unannotated voxels (not a class: no loss, no metric, no patch centred on it), above
    # every class value, as nnU-Net's "ignore" label.
    ignore_label: int | None = field(default=None, metadata=_range(1, 255))
    # Region-based training: region name -> list of label values (in output order), one sigmoid per
    # region; regions_class_order: the label value each region writes when predicted (later ones win).
    regions: dict[str, Any] | None = None
    regions_class_order: list[int] | None = field(default=None, metadata=_range(1, 255))
    augment: dict[str, Any] = field(default_factory=dict)  # segpipe.data.augment.AugmentSettings; {} = defaults
    # Split: a seeded fraction, or k-fold (fold ``fold`` of ``folds``); saved once per dataset.
    val_fraction: float = field(default=0.2, metadata=_range(0, 1, exclusive_min=True))
    folds: int | None = field(default=None, metadata=_range(2))
    fold: int = field(default=0, metadata=_range(0))
    # A fixed split instead: a JSON file {"train": [case ids], "val": [case ids]} (a run's splits.json
    # works), relative to the working dir; val_fraction and folds are then unused.
    split_file: str | None = None
    validation: Literal["whole", "patches"] = "whole"  # whole preprocessed cases, or fixed patches
    val_patches_per_case: int = field(default=4, metadata=_range(1))  # validation: patches only
    patch_size: list[int] = field(default_factory=lambda: [32, 32, 32], metadata=_range(4))
    batch_size: int = field(default=2, metadata=_range(1))
    foreground_fraction: float = field(default=0.33, metadata=_range(0, 1))
    num_workers: int = field(default=2, metadata=_range(1))  # parallel patch extraction in tf.data


@dataclass
class ModelConfig:
    """The network (segpipe.models); the planner (docs/planning.md) fills strides, kernels and init."""

    name: Literal["unet3d", "resenc_unet"] = "unet3d"  # plain U-Net, or nnU-Net's residual-encoder U-Net
    depth: int = field(default=4, metadata=_range(1, 7))  # resolution levels; the patch halves depth-1 times
    base_filters: int = field(default=16, metadata=_range(1))
    max_filters: int = field(default=320, metadata=_range(1))
    norm: Literal["batch", "instance", "none"] = "batch"
    deep_supervision: bool = False  # one output per decoder level, nnU-Net's loss weights (docs/losses-in-keras.md)
    # the network's last activation: softmax (probabilities) or logits (the losses then get from_logits: true and
    # use a log-softmax); inference, evaluation and every export format give probabilities either way
    # (a region dataset, data.regions or dataset.json, always gets one sigmoid per region instead of the softmax)
    output: Literal["softmax", "logits"] = "softmax"
    # Per stage and axis (anisotropic data): stride 1 or 2 of the stage's first convolution (stage 0:
    # [1, 1, 1]) and kernel size 1, 3 or 5; null: stride 2 along every axis from stage 1 on, 3×3×3.
    strides: list[list[int]] | None = None
    kernel_sizes: list[list[int]] | None = None
    convs_per_stage: int = field(default=2, metadata=_range(1))  # unet3d: convolutions per encoder/decoder stage
    blocks_per_stage: list[int] | None = field(default=None, metadata=_range(1))  # resenc_unet; null: 1, 3, 4, 6, 6, 6, 6
    init: Literal["glorot_uniform", "he_normal"] | None = None  # null: glorot_uniform (unet3d), he_normal (resenc_unet)


@dataclass
class TrainConfig:
    epochs: int = field(default=40, metadata=_range(1))
    steps_per_epoch: int = field(default=50, metadata=_range(1))
    # Plan the run to finish (training, validation, final evaluation) in this many minutes: times real
    # steps of the planned network on this machine and sets epochs, steps and inference (docs/planning.md).
    time_budget_minutes: float | None = field(default=None, metadata=_range(0, exclusive_min=True))
    # Stop training (validation included) before the epoch that would end past this many minutes, at the
    # pace of the recent epochs; the best and last checkpoints stay complete. A time-budget plan sets it
    # to its training share, so a machine that slows down mid-run still keeps the budget.
    max_train_minutes: float | None = field(default=None, metadata=_range(0, exclusive_min=True))
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    learning_rate: float = field(default=1e-3, metadata=_range(0, exclusive_min=True))
    lr_schedule: Literal["constant", "poly", "cosine"] = "poly"
    weight_decay: float = field(default=0.0, metadata=_range(0))
    momentum: float = field(default=0.99, metadata=_range(0, 1))  # sgd only
    monitor: str = "val_dice_fg_mean"  # what "best checkpoint" maximises (or minimises, for a loss)
    # tf.distribute (README.md, "Several GPUs"): none | mirrored (the GPUs of one machine) | multi_worker
    # (several machines, cluster from TF_CONFIG). data.batch_size is the global batch, split over replicas.
    distribute: Literal["none", "mirrored", "multi_worker"] = "none"
    sync_batch_norm: bool = False  # batch-norm statistics over the global batch (model.norm: batch only)
    # multi_worker: how long a worker waits for the others, when joining the cluster and in every collective
    # operation of training, before it stops with an error naming the worker that did not answer
    # (docs/training.md#when-a-worker-fails). A dead worker is also noticed by TensorFlow's heartbeats (~30 s).
    collective_timeout_seconds: float = field(default=300.0, metadata=_range(0, exclusive_min=True))
    deterministic: bool = False  # TensorFlow op determinism: same config + seed -> same history (slower on GPU)
    # Mid-epoch checkpoints (besides every epoch end): after every N-th step of the run and/or when this
    # many minutes passed since the last checkpoint; a SIGKILL then loses at most that much (docs/training.md).
    checkpoint_every_steps: int | None = field(default=None, metadata=_range(1))
    checkpoint_every_minutes: float | None = field(default=None, metadata=_range(0, exclusive_min=True))
    # At the end of training the chief writes the deployable bundle (segpipe.export.bundle) into RUN_DIR/bundle,
    # from the best checkpoint (else model.keras); export_onnx adds model.onnx (needs the onnx extra).
    export_bundle: bool = True
    export_onnx: bool = False


@dataclass
class Config:
    name: str | None = None  # run name; defaults to the config file's stem
    seed: int = 0
    output_dir: str = "runs"
    experiment: str | None = None  # runs go to <output_dir>/<experiment>/<name> (a sweep's folder)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: dict[str, Any] = field(default_factory=lambda: {"name": "dice"})
    train: TrainConfig = field(default_factory=TrainConfig)
    inference: InferenceSettings = field(default_factory=InferenceSettings)  # segpipe.inference.settings

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


def _plain(value: Any) -> Any:
    """Tuples (of frozen settings) as lists, so the dict is plain YAML/JSON."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
