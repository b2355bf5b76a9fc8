"""The typed configuration tree: one dataclass per section, with ranges in field metadata.

The config aggregates the stages' settings: ``data`` is :class:`segpipe.data.settings.DataConfig`,
``inference`` is :class:`segpipe.inference.settings.InferenceSettings`; ``model`` and ``train`` are
declared here. Every section checks itself when it is made (:mod:`segpipe.settings`), and
:class:`Config` checks what involves several sections, so a config built in Python is checked as one
read from YAML. Each key is documented where it is declared. Reading YAML and overrides are in
:mod:`segpipe.config.loading`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from segpipe.data.settings import DataConfig, PhantomConfig
from segpipe.errors import ConfigError, SettingError, expected
from segpipe.inference.settings import InferenceSettings
from segpipe.models.geometry import model_divisor
from segpipe.settings import Settings, check_fields
from segpipe.settings import number_range as _range

__all__ = ["Config", "ConfigError", "DataConfig", "ModelConfig", "PhantomConfig", "TrainConfig", "check_folder_name",
           "check_patch_size", "model_divisor"]


@dataclass
class ModelConfig(Settings):
    """The network (segpipe.models); the planner (docs/planning.md) fills strides, kernels and init.

    Raises
    ------
    SettingError
        A key of the wrong type or out of range, or per-stage lists that do not fit ``depth``.
    """

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
    # resenc_unet; null: 1, 3, 4, 6, 6, 6, 6
    blocks_per_stage: list[int] | None = field(default=None, metadata=_range(1))
    init: Literal["glorot_uniform", "he_normal"] | None = None  # null: glorot_uniform (unet3d), he_normal (resenc_unet)

    def __post_init__(self) -> None:
        """Per-stage lists (``strides``, ``kernel_sizes``, ``blocks_per_stage``) have one entry per stage."""
        check_fields(self)
        for key, allowed in (("strides", (1, 2)), ("kernel_sizes", (1, 3, 5))):
            value = getattr(self, key)
            if value is None:
                continue
            if len(value) != self.depth or any(len(t) != 3 or any(v not in allowed for v in t) for t in value):
                raise SettingError(key, f"{self.depth} triples (one per stage, model.depth) of values in "
                                   f"{list(allowed)}", value)
        if self.strides is not None and list(self.strides[0]) != [1, 1, 1]:
            raise SettingError("strides", "[1, 1, 1] for stage 0 (full resolution)", self.strides)
        if self.blocks_per_stage is not None and len(self.blocks_per_stage) != self.depth:
            raise SettingError("blocks_per_stage", f"{self.depth} block counts (one per stage)", self.blocks_per_stage)
        if self.blocks_per_stage is not None and self.name != "resenc_unet":
            raise SettingError("blocks_per_stage", "null unless model.name is resenc_unet", self.blocks_per_stage)
        if self.deep_supervision and self.strides is not None and any(len(set(t)) > 1 for t in self.strides):
            # the deep-supervision loss halves the target along every axis per level
            raise SettingError("deep_supervision", "false with anisotropic model.strides (the deep-supervision "
                               "targets are halved along every axis per level)", True)


@dataclass
class TrainConfig(Settings):
    """Optimisation, schedule, distribution, checkpoints and the export at the end (docs/training.md)."""

    epochs: int = field(default=40, metadata=_range(1))
    steps_per_epoch: int = field(default=50, metadata=_range(1))
    # Plan the run to finish (training, validation, final evaluation) in this many minutes: times real
    # steps of the planned network on this machine and sets epochs, steps and inference (docs/planning.md).
    time_budget_minutes: float | None = field(default=None, metadata=_range(0, exclusive_min=True))
    # Stop training (validation included) before the epoch that would end past this many minutes, at the
    # pace of the recent epochs; the best and last checkpoints stay complete. A time-budget plan sets it
    # to its training share, so a machine that slows down mid-run still keeps the budget.
    max_train_minutes: float | None = field(default=None, metadata=_range(0, exclusive_min=True))
    # Start from a trained network (docs/training.md, "Start from a trained model"): a segpipe bundle, a run
    # directory or a .keras file; every weight whose layer path and shape match is copied (new runs only).
    init_from: str | None = None
    # Fine-tuning (docs/training.md, "Start from a trained model"): the learning rate ramps up linearly over
    # the first warmup_epochs epochs; the encoder (layers enc<k>_…) does not train for the first
    # freeze_encoder_epochs epochs (needs init_from: a random encoder frozen learns nothing).
    warmup_epochs: int = field(default=0, metadata=_range(0))
    freeze_encoder_epochs: int = field(default=0, metadata=_range(0))
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    learning_rate: float = field(default=1e-3, metadata=_range(0, exclusive_min=True))
    lr_schedule: Literal["constant", "poly", "cosine"] = "poly"
    weight_decay: float = field(default=0.0, metadata=_range(0))
    momentum: float = field(default=0.99, metadata=_range(0, 1))  # sgd only
    # Numeric precision (docs/training.md#precision): float32, or a Keras mixed policy (bfloat16/float16
    # compute; variables, normalisation statistics, losses, metrics and the softmax stay float32;
    # mixed_float16 adds loss scaling). auto: a time-budget plan times a step in each precision this
    # machine supports and picks the fastest; float32 when the run is not planned with a budget.
    precision: Literal["auto", "float32", "mixed_bfloat16", "mixed_float16"] = "auto"
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

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class Config(Settings):
    """A run: every section, checked when made (each section by itself, then what involves several).

    Read from YAML with :func:`segpipe.config.load_config`; ``Config.from_dict(mapping)`` builds one
    from a mapping. ``data.root`` may be null here (a config file can leave it to the command line);
    :func:`segpipe.config.validate` insists on it.

    Raises
    ------
    ConfigError
        Naming the key's full path (``data.patch_size``, ``model.norm``).
    """

    SECTION = "the top level"  # how an unknown top-level key's message names where it was

    name: str | None = None  # run name; defaults to the config file's stem
    seed: int = 0
    output_dir: str = "runs"
    experiment: str | None = None  # runs go to <output_dir>/<experiment>/<name> (a sweep's folder)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: dict[str, Any] = field(default_factory=lambda: {"name": "dice"})
    train: TrainConfig = field(default_factory=TrainConfig)
    inference: InferenceSettings = field(default_factory=InferenceSettings)  # segpipe.inference.settings

    def __post_init__(self) -> None:
        # ``loss`` is free-form (its keys depend on the loss): segpipe.losses.get_loss checks it in full
        if not isinstance(self.loss, dict) or not ("name" in self.loss or "terms" in self.loss):
            raise ConfigError(expected("a mapping with 'name' (or 'terms' for a compound loss)", key="loss",
                                       received=self.loss))
        try:
            check_fields(self)
        except SettingError as exc:
            raise ConfigError(expected(exc.what, key=exc.key, received=exc.received, where=exc.where,
                                       hint=exc.hint)) from None
        check_patch_size(self.data.patch_size, self.model.depth, self.model.strides)
        if self.train.sync_batch_norm and self.model.norm != "batch":
            raise ConfigError(expected("'batch' when train.sync_batch_norm is true (only batch norm has "
                                       "statistics to synchronise)", key="model.norm", received=self.model.norm))
        if self.train.export_onnx and not self.train.export_bundle:
            raise ConfigError(expected("true when train.export_onnx is true (model.onnx is part of the bundle)",
                                       key="train.export_bundle", received=False))
        if self.train.freeze_encoder_epochs and self.train.init_from is None:
            raise ConfigError(expected("0 without train.init_from (a frozen random encoder learns nothing)",
                                       key="train.freeze_encoder_epochs", received=self.train.freeze_encoder_epochs,
                                       hint="Set train.init_from to the trained network to start from."))
        for key in ("name", "experiment"):
            check_folder_name(getattr(self, key), key)

    @classmethod
    def from_dict(cls, data: Any, *, where: str | None = None, prefix: str = "") -> "Config":
        """A config from a mapping (the merged YAML); every error is a :class:`ConfigError` naming the key."""
        try:
            return super().from_dict(data, where=where, prefix=prefix)
        except SettingError as exc:  # the same words, as the config's error type
            raise ConfigError(expected(exc.what, key=exc.key, received=exc.received, where=exc.where,
                                       hint=exc.hint)) from None

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


def check_folder_name(value: str | None, key: str) -> None:
    """``name`` and ``experiment`` become folder names: one non-empty path component."""
    if value is not None and (not value or value in (".", "..") or "/" in value or "\\" in value):
        raise ConfigError(expected("a folder name (no '/' or '\\', not '.' or '..')", key=key, received=value))


def check_patch_size(patch_size: list[int], depth: int, strides: list[list[int]] | None = None) -> None:
    """Each patch side must be divisible by the network's down-sampling along it (2**(depth-1) by default)."""
    divisor = model_divisor(depth, strides)
    bad = [s for s, d in zip(patch_size, divisor) if s % d]
    if bad:
        nearest = [max(d, round(s / d) * d) for s, d in zip(patch_size, divisor)]
        if strides is None:
            why = f"every side divisible by {divisor[0]} (model.depth={depth} halves the patch {depth - 1} times)"
        else:
            why = f"every side divisible by {divisor} per axis (the product of model.strides)"
        raise ConfigError(expected(why, key="data.patch_size", received=patch_size, hint=f"Nearest valid: {nearest}"))


def _plain(value: Any) -> Any:
    """Tuples (of frozen settings) as lists, so the dict is plain YAML/JSON."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
