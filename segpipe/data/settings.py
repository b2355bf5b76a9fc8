"""The data stage's settings: the config's ``data:`` section (:class:`DataConfig`) and the phantoms.

They check themselves when made (:mod:`segpipe.settings`); :mod:`segpipe.config` aggregates them
with the other stages' settings. Preprocessing and augmentation settings proper are
:class:`segpipe.data.preprocess.PreprocessSettings` and :class:`segpipe.data.augment.AugmentSettings`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from segpipe.data.augment import AugmentSettings
from segpipe.data.preprocess import check_normalization
from segpipe.errors import SettingError
from segpipe.settings import Settings, check_fields, number_range


@dataclass
class PhantomConfig(Settings):
    """Settings of the generated phantom dataset (see ``segpipe.data.phantoms``).

    Raises
    ------
    SettingError
        A field of the wrong type or out of range, or a shape or spacing that is not 3 values.
    """

    num_cases: int = field(default=24, metadata=number_range(2))
    shape: list[int] = field(default_factory=lambda: [48, 48, 48], metadata=number_range(8))
    spacing_mm: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0], metadata=number_range(0, exclusive_min=True))
    seed: int = 0
    noise_std: float = field(default=0.25, metadata=number_range(0))

    def __post_init__(self) -> None:
        check_fields(self)
        if len(self.shape) != 3:
            raise SettingError("shape", "3 sizes [x, y, z]", self.shape)
        if len(self.spacing_mm) != 3:
            raise SettingError("spacing_mm", "3 spacings [x, y, z]", self.spacing_mm)


@dataclass
class DataConfig(Settings):
    """The dataset, its preprocessing and cache, the split, and the patch loader (docs/data.md).

    The config's ``data:`` section. It checks itself when made (types, ranges, the split keys
    together, the normalisation through :func:`segpipe.data.preprocess.check_normalization`, the
    augmentation through :meth:`segpipe.data.augment.AugmentSettings.from_dict`), so a
    ``DataConfig`` built in Python is checked as one read from YAML.

    Raises
    ------
    SettingError
        Naming the key relative to the section (``patch_size``, ``augment.rotation.p``).
    """

    # dataset folder, relative to the working dir; null in a config file means "give it on the command line"
    root: str | None = "data/phantoms"
    phantoms: PhantomConfig | None = None  # if set and ``root`` does not exist, generate phantoms there
    layout: Literal["auto", "msd", "nnunet", "folders"] = "auto"
    check: Literal["full", "headers", "off"] = "headers"  # integrity check before training
    # Dataset cache folder (fingerprint, splits, preprocessed-<settings hash>/); None: under output_dir.
    cache_dir: str | None = None
    preprocess_workers: int = field(default=2, metadata=number_range(1))  # processes for check/fingerprint/cache
    # Preprocessing (segpipe.data.preprocess.PreprocessSettings); None spacing: the fingerprint's.
    target_spacing_mm: list[float] | None = field(default=None, metadata=number_range(0, exclusive_min=True))
    normalization: str | list[str] = "zscore"  # one scheme, or one per channel
    crop_to_nonzero: bool = True
    image_order: int = field(default=3, metadata=number_range(0, 5))
    label_interpolation: Literal["onehot_linear", "nearest"] = "onehot_linear"
    # Label conventions (docs/data.md, "Regions and ignored voxels"); dataset.json may declare them too.
    # The value of unannotated voxels (not a class: no loss, no metric, no patch centred on it), above
    # every class value, as nnU-Net's "ignore" label.
    ignore_label: int | None = field(default=None, metadata=number_range(1, 255))
    # Region-based training: region name -> list of label values (in output order), one sigmoid per
    # region; regions_class_order: the label value each region writes when predicted (later ones win).
    regions: dict[str, Any] | None = None
    regions_class_order: list[int] | None = field(default=None, metadata=number_range(1, 255))
    augment: dict[str, Any] = field(default_factory=dict)  # segpipe.data.augment.AugmentSettings; {} = defaults
    # Split: a seeded fraction, or k-fold (fold ``fold`` of ``folds``); saved once per dataset.
    val_fraction: float = field(default=0.2, metadata=number_range(0, 1, exclusive_min=True))
    folds: int | None = field(default=None, metadata=number_range(2))
    fold: int = field(default=0, metadata=number_range(0))
    # A fixed split instead: a JSON file {"train": [case ids], "val": [case ids]} (a run's splits.json
    # works), relative to the working dir; val_fraction is then unused. With folds too, the folds are
    # made over the file's train cases and its val cases are held out (a test set no fold trains on).
    split_file: str | None = None
    validation: Literal["whole", "patches"] = "whole"  # whole preprocessed cases, or fixed patches
    val_patches_per_case: int = field(default=4, metadata=number_range(1))  # validation: patches only
    patch_size: list[int] = field(default_factory=lambda: [32, 32, 32], metadata=number_range(4))
    batch_size: int = field(default=2, metadata=number_range(1))
    foreground_fraction: float = field(default=0.33, metadata=number_range(0, 1))
    num_workers: int = field(default=2, metadata=number_range(1))  # parallel patch extraction in tf.data

    def __post_init__(self) -> None:
        check_fields(self)
        if len(self.patch_size) != 3:
            raise SettingError("patch_size", "3 sizes [x, y, z]", self.patch_size)
        if self.target_spacing_mm is not None and len(self.target_spacing_mm) != 3:
            raise SettingError("target_spacing_mm", "3 spacings [x, y, z] in mm (RAS order) or null",
                               self.target_spacing_mm)
        check_normalization(self.normalization)
        if self.folds is None and self.fold != 0:
            raise SettingError("fold", "0 when data.folds is null (no k-fold split)", self.fold)
        if self.folds is not None and self.fold >= self.folds:
            raise SettingError("fold", f"a fold in 0..{self.folds - 1} (data.folds={self.folds})", self.fold)
        AugmentSettings.from_dict(self.augment, prefix="augment.")
