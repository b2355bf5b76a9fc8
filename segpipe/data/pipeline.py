"""From a config to cached, split cases: the data preparation that training and inference share.

:func:`prepare_data` runs the stages of ``segpipe.data`` in order:

1. open the dataset (``data.root`` through ``data.layout``; phantoms are generated first if
   ``data.phantoms`` is set and the folder is missing);
2. the integrity check (``data.check``): every error is listed at once and nothing starts;
3. the fingerprint (once per dataset, recomputed when a source file changes);
4. the preprocessing settings, resolved from the config and the fingerprint;
5. the cache (parallel, with a progress bar): cases whose key still matches are reused;
6. the split, saved once per dataset and reused by every run on it.

Everything a dataset accumulates lives in one *dataset cache folder* (``data.cache_dir``, default
``<output_dir>/.cache/<dataset name>-<hash of its path>/``)::

    fingerprint.json
    splits.json                      every split asked for, keyed by seed and val_fraction / folds
    preprocessed-<settings hash>/    one folder per preprocessing setting: CASE/{image,label,locations}.npy, meta.json

A run directory gets copies of what it used: ``splits.json`` (its train/val ids) and
``preprocessing.json`` (the resolved :class:`PreprocessSettings` as a dict, the input of
``PreprocessSettings(**...)``), so resuming, predicting and exporting use exactly the same data.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

from segpipe.data.cache import CachedCase, build_cache
from segpipe.data.checks import check_dataset, check_labels, errors
from segpipe.data.fingerprint import load_or_compute_fingerprint
from segpipe.data.labels import check_ignore_label, parse_regions
from segpipe.data.layouts import Dataset, load_dataset
from segpipe.data.phantoms import PhantomSettings, write_phantom_dataset
from segpipe.data.preprocess import PreprocessSettings, target_shape
from segpipe.data.settings import DataConfig
from segpipe.errors import ConfigError, Received, expected
from segpipe.io import read_json, write_json
from segpipe.models.geometry import model_divisor


SPLITS_VERSION = 1


class _Network(Protocol):
    depth: int
    strides: list[list[int]] | None


class RunConfig(Protocol):
    """What the data preparation reads of a run's config: :class:`segpipe.config.Config` is one.

    A protocol, not the class: the config aggregates the stages' settings and so sits above ``data``.
    """

    seed: int
    output_dir: str
    data: DataConfig
    model: _Network


class DataError(ValueError):
    """A dataset that cannot be trained on (integrity errors); the message lists every problem."""


@dataclass
class PreparedData:
    """A dataset ready for the loader: its cached cases, the settings that made them, and the split.

    Attributes
    ----------
    dataset
        the dataset as read through its layout.
    settings
        the resolved preprocessing settings (target spacing and intensity statistics filled in).
    cases
        case id -> cached case (memory-mapped arrays and the meta of the inverse mapping).
    split
        ``{"train": [...], "val": [...]}`` plus ``"split"`` (its key) and, for k-fold, ``"fold"``.
    cache_dir
        the preprocessed folder of these settings.
    fingerprint
        the dataset fingerprint.
    """

    dataset: Dataset
    settings: PreprocessSettings
    cases: dict[str, CachedCase]
    split: dict[str, Any]
    cache_dir: Path
    fingerprint: dict[str, Any]

    @property
    def num_channels(self) -> int:
        """Input channels of the preprocessed images."""
        return int(next(iter(self.cases.values())).meta["channels"])

    def subset(self, name: str) -> list[CachedCase]:
        """The cached cases of ``split[name]`` (``"train"`` or ``"val"``), in split order."""
        return [self.cases[case_id] for case_id in self.split[name]]


def prepare_data(
    config: RunConfig,
    *,
    dataset: Dataset | None = None,
    settings: PreprocessSettings | None = None,
    split: dict[str, Any] | None = None,
    progress: bool = True,
) -> PreparedData:
    """Open, check, fingerprint, cache and split the dataset of ``config``.

    Parameters
    ----------
    config
        the run's config (``data`` section, ``seed``, ``output_dir``).
    dataset
        the dataset if already opened (see :func:`open_dataset`).
    settings
        preprocessing settings to use instead of resolving them from the config (a run's
        ``preprocessing.json``, so a resumed run or its inference preprocesses as it trained).
    split
        a split to use instead of the dataset's (a run's ``splits.json``).
    progress
        show progress bars.

    Raises
    ------
    DataError
        the integrity check found errors (all listed), or too few cases for the split.
    ConfigError
        settings that do not fit the dataset (names the key).

    Notes
    -----
    What can be checked without reading voxels (integrity of the headers, the split) is checked
    before anything is read or written; the label values and the patch size are checked on the
    fingerprint, before any case is preprocessed.
    """
    data = config.data
    dataset = dataset if dataset is not None else open_dataset(data)
    run_integrity_check(dataset, data.check, workers=data.preprocess_workers, progress=progress)
    case_ids = [case.case_id for case in dataset.cases]
    if split is None and data.split_file is not None:
        split = read_split_file(data.split_file)
        if data.folds:
            split = folds_of_split(split, folds=data.folds, fold=data.fold, seed=config.seed)
    if split is not None:
        _check_split(split, case_ids)
    else:
        check_splittable(dataset, data)
    root = dataset_cache_dir(config, dataset)
    fingerprint = load_or_compute_fingerprint(dataset, root / "fingerprint.json",
                                              workers=data.preprocess_workers, progress=progress)
    run_label_check(dataset, fingerprint, data.check)
    if settings is None:  # a run's own settings (resume, inference) passed this check when it started
        settings = resolve_settings(data, fingerprint)
        check_patch_fits(config, fingerprint, settings)
    folder = root / f"preprocessed-{settings_hash(settings)}"
    cached = build_cache(dataset, folder, settings, workers=data.preprocess_workers, progress=progress)
    if split is None:
        split = load_or_make_split(root / "splits.json", case_ids, seed=config.seed,
                                   val_fraction=data.val_fraction, folds=data.folds, fold=data.fold)
        _check_split(split, case_ids)
    return PreparedData(dataset, settings, {c.case_id: c for c in cached}, split, folder, fingerprint)


# ----------------------------------------------------------------------------------------------
# Dataset, check, cache location, settings


def open_dataset(data: DataConfig) -> Dataset:
    """Open ``data.root`` through ``data.layout``; generate phantoms there first if configured and missing."""
    root = Path(data.root)
    if data.phantoms is not None:
        _ensure_phantoms(root, data.phantoms)
    return apply_label_settings(load_dataset(root, data.layout, key="data.root"), data)


def apply_label_settings(dataset: Dataset, data: DataConfig) -> Dataset:
    """Set the ignore label and regions of ``data`` (``data.ignore_label``, ``data.regions``) on ``dataset``.

    A value the dataset also declares (dataset.json) must agree. Region label values must be classes
    of the dataset. Returns ``dataset`` (changed in place).

    Raises
    ------
    ConfigError
        naming the key, for a conflict or a value the dataset does not declare.
    """
    if data.ignore_label is not None:
        if dataset.ignore_label not in (None, data.ignore_label):
            raise ConfigError(expected(f"the ignore label the dataset declares ({dataset.ignore_label}) or null",
                                      key="data.ignore_label", received=data.ignore_label))
        classes = {v: name for v, name in dataset.labels.items() if v != data.ignore_label}
        dataset.ignore_label = check_ignore_label(data.ignore_label, classes, key="data.ignore_label")
        dataset.labels = classes
    if data.regions_class_order is not None and data.regions is None:
        raise ConfigError(expected("data.regions with data.regions_class_order", key="data.regions",
                                  received=None))
    if data.regions is not None:
        if dataset.regions is not None:
            raise ConfigError(expected("null: the dataset's dataset.json already declares regions",
                                      key="data.regions", received=data.regions))
        regions, order = parse_regions(data.regions, data.regions_class_order, key="data.regions")
        unknown = sorted({v for r in regions for v in r.values} - set(dataset.labels))
        if unknown:
            raise ConfigError(expected(f"region label values among the dataset's classes {sorted(dataset.labels)}",
                                      key="data.regions", received=data.regions,
                                      hint=f"Undeclared values: {unknown}."))
        dataset.regions, dataset.regions_class_order = regions, order
    return dataset


def _ensure_phantoms(root: Path, phantoms: Any) -> None:
    settings = PhantomSettings(num_cases=phantoms.num_cases, shape=tuple(phantoms.shape),
                               spacing_mm=tuple(phantoms.spacing_mm), seed=phantoms.seed,
                               noise_std=phantoms.noise_std)
    if not root.exists():
        print(f"Generating {settings.num_cases} phantom cases into {root}")
        write_phantom_dataset(root, settings)
        return
    meta = root / "dataset.json"
    found = read_json(meta).get("segpipe_phantom_settings") if meta.is_file() else None
    if found is None:  # not a phantom dataset: the user's own data at data.root, opened as it is
        return
    wanted = {k: list(v) if isinstance(v, tuple) else v for k, v in vars(settings).items()}
    if found != wanted:
        raise ConfigError(expected(
            f"a phantom dataset made with the settings of data.phantoms ({wanted})", key="segpipe_phantom_settings",
            received=found, where=str(root / "dataset.json"), hint="Delete the folder or choose another data.root.",
        ))


def run_integrity_check(dataset: Dataset, mode: str, *, workers: int = 1, progress: bool = False) -> None:
    """``data.check``: ``full`` reads every voxel, ``headers`` only the headers, ``off`` skips.

    Raises
    ------
    DataError
        listing every error, one line each, naming the file.
    """
    if mode == "off":
        return
    full = mode == "full"
    # Header checks take milliseconds per case: processes would cost more to start than they save.
    problems = check_dataset(dataset, read_data=full, workers=workers if full else 1, progress=progress and full)
    _report(problems, dataset, f"a dataset without integrity errors (data.check: {mode})")


def run_label_check(dataset: Dataset, fingerprint: dict[str, Any], mode: str) -> None:
    """Label values across cases (from the fingerprint, so no file is read again), unless ``data.check: off``.

    Raises
    ------
    DataError
        a label value the dataset does not declare (each file named); warnings are printed.
    """
    if mode == "off":
        return
    problems = check_labels(dataset, {k: c["class_voxels"] for k, c in fingerprint["cases"].items()})
    _report(problems, dataset, "only declared label values")



def _report(problems: list, dataset: Dataset, what: str) -> None:
    """Warnings to stderr; errors, all listed, as one DataError saying ``what`` was expected."""
    found = errors(problems)
    for problem in problems:
        if problem not in found:
            print(problem.format(dataset.root), file=sys.stderr)
    if found:
        lines = "\n  ".join(p.format(dataset.root) for p in found)
        raise DataError(expected(what, key="data.root",
                                 received=Received(f"{dataset.root} with {len(found)} error(s)")) + f"\n  {lines}")


def check_splittable(dataset: Dataset, data: DataConfig) -> None:
    """Enough cases for the configured split: 2 (one to train, one to validate), or ``data.folds``.

    Raises
    ------
    DataError
        naming the dataset folder and how many cases it has.
    """
    need, purpose = (data.folds, f"{data.folds} folds (data.folds)") if data.folds else (2, "a training and a validation case")
    if len(dataset.cases) < need:
        raise DataError(expected(f"at least {need} cases for {purpose}", key="data.root",
                                 received=Received(f"{dataset.root} with {len(dataset.cases)} case(s)")))


def check_patch_fits(config: RunConfig, fingerprint: dict[str, Any], settings: PreprocessSettings) -> None:
    """``data.patch_size`` must not exceed the largest preprocessed case along every axis at once.

    A patch larger than every case along one axis is padded there (nnU-Net does the same, and
    thin-slab data needs it); larger along all three, every patch is padding on every side, which is
    a patch size meant for another dataset or spacing. Shapes come from the fingerprint: each case's
    (cropped) shape at the target spacing, as preprocessing will make it.

    Raises
    ------
    ConfigError
        naming ``data.patch_size``, the largest case and the largest valid patch.
    """
    patch = list(config.data.patch_size)
    shapes = [target_shape(c["cropped_shape"] if settings.crop_to_nonzero else c["shape"], c["spacing_mm"],
                           settings.target_spacing_mm) for c in fingerprint["cases"].values()]
    if not shapes:
        return
    largest = [int(v) for v in np.max(shapes, axis=0)]
    if all(p > n for p, n in zip(patch, largest)):
        divisor = model_divisor(config.model.depth, config.model.strides)
        fits = [max(d, n // d * d) for n, d in zip(largest, divisor)]
        spacing = list(settings.target_spacing_mm) if settings.target_spacing_mm else "each case's own"
        raise ConfigError(expected(
            f"a patch no larger than the largest case along at least one axis (largest case: {largest} voxels at "
            f"the target spacing {spacing} mm)", key="data.patch_size", received=patch,
            hint=f"A patch that fits and divides by the network's down-sampling: {fits}.",
        ))


def dataset_cache_dir(config: RunConfig, dataset: Dataset) -> Path:
    """``data.cache_dir``, or ``<output_dir>/.cache/<dataset name>-<8 hex of its resolved path>``."""
    if config.data.cache_dir:
        return Path(config.data.cache_dir)
    root = Path(dataset.root).resolve()
    digest = hashlib.sha256(str(root).encode()).hexdigest()[:8]
    return Path(config.output_dir) / ".cache" / f"{root.name}-{digest}"


def resolve_settings(data: DataConfig, fingerprint: dict[str, Any]) -> PreprocessSettings:
    """The preprocessing settings of ``data``, with the fingerprint's target spacing if none is set.

    The fingerprint's foreground intensity statistics are always included (``ct`` needs them, and an
    exported model documents them).
    """
    channels = len(fingerprint["intensity"])
    if not isinstance(data.normalization, str) and len(data.normalization) != channels:
        raise ConfigError(expected(f"one scheme, or one per channel ({channels} in {fingerprint['dataset']})",
                                   key="data.normalization", received=data.normalization))
    spacing = data.target_spacing_mm if data.target_spacing_mm is not None else fingerprint["target_spacing_mm"]
    return PreprocessSettings(
        target_spacing_mm=tuple(spacing),
        normalization=data.normalization if isinstance(data.normalization, str) else tuple(data.normalization),
        crop_to_nonzero=data.crop_to_nonzero,
        image_order=data.image_order,
        label_interpolation=data.label_interpolation,
        intensity_stats=tuple(fingerprint["intensity"]),
    )


def settings_hash(settings: PreprocessSettings) -> str:
    """12 hex digits naming the cache folder of ``settings`` (different settings, different folders)."""
    blob = json.dumps(settings.to_dict(), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------------------------
# Splits


def split_key(*, seed: int, val_fraction: float, folds: int | None) -> str:
    """The name of a split in the dataset's ``splits.json``."""
    return f"seed={seed},folds={folds}" if folds else f"seed={seed},val_fraction={val_fraction:g}"


def make_split(case_ids: Sequence[str], val_fraction: float, seed: int) -> dict[str, list[str]]:
    """A seeded random split with ``round(n * val_fraction)`` validation cases, at least one on each side."""
    _need_cases(case_ids, 2, "a train/validation split")
    order = np.random.default_rng(seed).permutation(sorted(case_ids))
    n_val = min(max(1, round(len(case_ids) * val_fraction)), len(case_ids) - 1)
    return {"train": sorted(order[n_val:].tolist()), "val": sorted(order[:n_val].tolist())}


def make_folds(case_ids: Sequence[str], folds: int, seed: int) -> list[dict[str, list[str]]]:
    """``folds`` seeded folds: every case validates in exactly one of them (fold sizes differ by at most 1)."""
    _need_cases(case_ids, folds, f"{folds} folds (data.folds)")
    order = np.random.default_rng(seed).permutation(sorted(case_ids))
    parts = [set(p.tolist()) for p in np.array_split(order, folds)]
    return [{"train": sorted(set(case_ids) - part), "val": sorted(part)} for part in parts]


def folds_of_split(split: dict[str, Any], *, folds: int, fold: int, seed: int) -> dict[str, Any]:
    """Fold ``fold`` of ``folds`` seeded folds over the train cases of a fixed ``split`` (``data.split_file``
    with ``data.folds``); the split's val cases are held out of every fold (``"held_out"``).

    Returns ``{"train", "val", "split", "fold", "held_out"}``; the same for the same inputs (no state).

    Examples
    --------
    >>> split = {"train": ["a", "b", "c", "d"], "val": ["e"], "split": "file:s.json"}
    >>> part = folds_of_split(split, folds=2, fold=0, seed=0)
    >>> sorted(part["train"] + part["val"]), part["held_out"], part["split"]
    (['a', 'b', 'c', 'd'], ['e'], 'file:s.json,seed=0,folds=2')
    """
    chosen = make_folds(split["train"], folds, seed)[fold]
    return {"train": list(chosen["train"]), "val": list(chosen["val"]),
            "split": f"{split['split']},{split_key(seed=seed, val_fraction=0.0, folds=folds)}", "fold": fold,
            "held_out": list(split["val"])}


def load_or_make_split(
    path: str | os.PathLike, case_ids: Sequence[str], *, seed: int, val_fraction: float,
    folds: int | None = None, fold: int = 0,
) -> dict[str, Any]:
    """The split stored in ``path`` under its key, made and stored first if missing.

    A stored split that does not cover exactly ``case_ids`` (cases added or removed) is remade,
    with a warning. Returns ``{"train", "val", "split": key}`` (and ``"fold"`` for k-fold).
    """
    path = Path(path)
    key = split_key(seed=seed, val_fraction=val_fraction, folds=folds)
    stored = read_json(path) if path.is_file() else {}
    splits = dict(stored.get("splits", {})) if stored.get("splits_version") == SPLITS_VERSION else {}
    entry = splits.get(key)
    if entry is not None and _covered(entry) != set(case_ids):
        print(f"warning: {path}: split {key} does not match the dataset's cases any more; making it anew",
              file=sys.stderr)
        entry = None
    if entry is None:
        entry = make_folds(case_ids, folds, seed) if folds else make_split(case_ids, val_fraction, seed)
        splits[key] = entry
        # Deterministic in (cases, key): two runs writing at once write the same entry.
        write_json(path, {"splits_version": SPLITS_VERSION, "splits": splits})
    chosen = entry[fold] if folds else entry
    return {"train": list(chosen["train"]), "val": list(chosen["val"]), "split": key,
            **({"fold": fold} if folds else {})}


def read_split_file(path: str | os.PathLike) -> dict[str, Any]:
    """A fixed split from a JSON file ``{"train": [case ids], "val": [case ids]}`` (``data.split_file``).

    Other keys (a run's ``splits.json`` also has ``split``) are ignored. Returns ``{"train", "val",
    "split": "file:<path>"}``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(expected("a JSON file with train/val case ids", key="data.split_file",
                                         received=Received(f"{path} (not found)")))
    stored = read_json(path)  # a parse error names the file and the position
    parts = {}
    for name in ("train", "val"):
        ids = stored.get(name) if isinstance(stored, dict) else None
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            shown = ("<missing>" if ids is None else "a list with non-string items" if isinstance(ids, list)
                     else f"a {type(ids).__name__}")
            raise ValueError(expected("a list of case ids", key=name, received=Received(shown), where=str(path)))
        parts[name] = list(ids)
    overlap = sorted(set(parts["train"]) & set(parts["val"]))
    if overlap:
        raise ValueError(expected("val cases that are not in train", key="val",
                                  received=Received(f"{len(overlap)} case(s) also in train, e.g. {overlap[:5]}"),
                                  where=str(path)))
    return {**parts, "split": f"file:{path.as_posix()}"}


def _covered(entry: dict | list) -> set[str]:
    parts = entry if isinstance(entry, list) else [entry]
    return {case_id for part in parts for name in ("train", "val") for case_id in part[name]}


def _need_cases(case_ids: Sequence[str], minimum: int, purpose: str) -> None:
    if len(case_ids) < minimum:
        raise ValueError(expected(f"at least {minimum} cases for {purpose}", key="case_ids",
                                  received=Received(f"{len(case_ids)} case(s)")))


def _check_split(split: dict[str, Any], case_ids: Sequence[str]) -> None:
    """Every case of ``split`` is in the dataset, and both sides have one."""
    unknown = sorted((set(split["train"]) | set(split["val"])) - set(case_ids))
    if unknown:
        raise DataError(expected("split cases that are in the dataset", key="split",
                                 received=Received(f"{len(unknown)} unknown case id(s): {unknown[:10]}")))
    if not split["train"] or not split["val"]:
        raise DataError(expected("training and validation cases", key="split", received=Received(
            f"{len(split['train'])} training, {len(split['val'])} validation")))
