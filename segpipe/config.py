"""The typed configuration tree: YAML files with ``extends:``, dotted overrides, validation.

A run is described by one :class:`Config`. It is read from YAML (``extends: base.yaml`` merges a
parent file first, paths relative to the child), then dotted overrides such as
``train.epochs=3`` are applied, then every key is checked against the dataclasses below: unknown
keys name the closest valid key, wrong types and out-of-range values name the key, what was
expected and what was received.

``loss`` is the one free-form section: its keys depend on the loss, so it is checked by
:func:`segpipe.losses.get_loss` when training is set up, before any data is read. A child file
that sets ``loss`` replaces the parent's loss as a whole (options of one loss rarely make sense for
another); every other mapping is merged key by key.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

REPLACED_WHOLE = {"loss"}  # sections a child file replaces instead of merging


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
    root: str = "data/phantoms"  # dataset folder (MSD layout); relative paths are relative to the working dir
    phantoms: PhantomConfig | None = None  # if set and ``root`` does not exist, generate phantoms there
    val_fraction: float = field(default=0.2, metadata=_range(0, 1, exclusive_min=True))
    patch_size: list[int] = field(default_factory=lambda: [32, 32, 32], metadata=_range(4))
    batch_size: int = field(default=2, metadata=_range(1))
    foreground_fraction: float = field(default=0.33, metadata=_range(0, 1))
    num_workers: int = field(default=2, metadata=_range(1))  # parallel patch extraction in tf.data


@dataclass
class ModelConfig:
    name: Literal["unet3d"] = "unet3d"
    depth: int = field(default=4, metadata=_range(1, 7))  # resolution levels; the patch halves depth-1 times
    base_filters: int = field(default=16, metadata=_range(1))
    max_filters: int = field(default=320, metadata=_range(1))
    norm: Literal["batch", "instance", "none"] = "batch"
    deep_supervision: bool = False


@dataclass
class TrainConfig:
    epochs: int = field(default=40, metadata=_range(1))
    steps_per_epoch: int = field(default=50, metadata=_range(1))
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    learning_rate: float = field(default=1e-3, metadata=_range(0, exclusive_min=True))
    lr_schedule: Literal["constant", "poly", "cosine"] = "poly"
    weight_decay: float = field(default=0.0, metadata=_range(0))
    momentum: float = field(default=0.99, metadata=_range(0, 1))  # sgd only
    monitor: str = "val_dice_fg_mean"  # what "best checkpoint" maximises (or minimises, for a loss)


@dataclass
class Config:
    name: str | None = None  # run name; defaults to the config file's stem
    seed: int = 0
    output_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: dict[str, Any] = field(default_factory=lambda: {"name": "dice"})
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- reading YAML


def read_yaml_with_extends(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML config file, merging the files it ``extends`` (a path or a list) first."""
    path = Path(path).resolve()
    if path in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain, path))
        raise ConfigError(f"Config files extend each other in a cycle: {cycle}")
    if not path.is_file():
        raise ConfigError(f"Config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"Invalid YAML in {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"Expected a mapping at the top of {path}. Received: {type(data).__name__}")
    parents = data.pop("extends", None) or []
    if isinstance(parents, str):
        parents = [parents]
    merged: dict[str, Any] = {}
    for parent in parents:
        merged = merge(merged, read_yaml_with_extends(path.parent / parent, (*_chain, path)))
    return merge(merged, data)


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive merge: mappings merge key by key, anything else (and ``loss``) replaces."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in REPLACED_WHOLE:
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` strings; values are parsed as YAML (``3``, ``[1, 2]``, ``null``)."""
    data = dict(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"Expected an override of the form key.sub=value. Received: {item!r}")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"Override {item!r}: value is not valid YAML: {exc}") from exc
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            child = node.get(part)
            child = dict(child) if isinstance(child, dict) else {}
            node[part] = child
            node = child
        node[leaf] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read, merge, override and validate a config. ``name`` defaults to the file's stem."""
    data = read_yaml_with_extends(path) if path is not None else {}
    data = apply_overrides(data, overrides or [])
    config = from_dict(Config, data)
    if config.name is None:
        config.name = Path(path).stem if path is not None else "default"
    validate(config)
    return config


# ---------------------------------------------------------------- typed conversion


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, checking keys, types and ranges."""
    if not isinstance(data, dict):
        raise ConfigError(_expected(prefix or "config", "a mapping", data))
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise ConfigError(_unknown_key(prefix, str(key), list(fields)))
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        kwargs[name] = _convert(value, hints[name], key)
        _check_range(kwargs[name], fields[name].metadata, key)
    return cls(**kwargs)


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(value, inner, key)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, {} if value is None else value, prefix=f"{key}.")
    if origin is Literal:
        if value not in args:
            raise ConfigError(_expected(key, f"one of {list(args)}", value, suggest=[str(a) for a in args]))
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(_expected(key, f"a list of {args[0].__name__}", value))
        return [_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(_expected(key, "a mapping", value))
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(_expected(key, "true or false", value))
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(_expected(key, "an integer", value))
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(_expected(key, "a number", value))
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(_expected(key, "a string", value))
        return value
    raise TypeError(f"Unsupported config type {tp!r} for {key}")  # a bug in this module, not in the config


def _check_range(value: Any, meta: typing.Mapping[str, Any], key: str) -> None:
    if not meta or value is None:
        return
    values = value if isinstance(value, list) else [value]
    lo, hi, exclusive = meta.get("min"), meta.get("max"), meta.get("exclusive_min")
    for v in values:
        if lo is not None and (v <= lo if exclusive else v < lo):
            raise ConfigError(_expected(key, f"{'>' if exclusive else '>='} {lo}", value))
        if hi is not None and v > hi:
            raise ConfigError(_expected(key, f"<= {hi}", value))


def _expected(key: str, expected: str, received: Any, suggest: list[str] | None = None) -> str:
    hint = ""
    if suggest and isinstance(received, str):
        close = difflib.get_close_matches(received, suggest, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"{key}: expected {expected}. Received: {received!r}.{hint}"


def _unknown_key(prefix: str, key: str, valid: list[str]) -> str:
    where = prefix.rstrip(".") or "the top level"
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" Did you mean '{prefix}{close[0]}'?" if close else ""
    return f"Unknown config key '{prefix}{key}'.{hint} Valid keys in {where}: {', '.join(valid)}"


# ---------------------------------------------------------------- cross-field checks


def validate(config: Config) -> None:
    """Checks that involve several keys (single keys are checked while converting)."""
    data = config.data
    if len(data.patch_size) != 3:
        raise ConfigError(_expected("data.patch_size", "3 sizes [x, y, z]", data.patch_size))
    if data.phantoms is not None and len(data.phantoms.shape) != 3:
        raise ConfigError(_expected("data.phantoms.shape", "3 sizes [x, y, z]", data.phantoms.shape))
    if data.phantoms is not None and len(data.phantoms.spacing_mm) != 3:
        raise ConfigError(_expected("data.phantoms.spacing_mm", "3 spacings [x, y, z]", data.phantoms.spacing_mm))
    check_patch_size(data.patch_size, config.model.depth)
    if not isinstance(config.loss, dict) or not ("name" in config.loss or "terms" in config.loss):
        raise ConfigError(_expected("loss", "a mapping with 'name' (or 'terms' for a compound loss)", config.loss))


def check_patch_size(patch_size: list[int], depth: int) -> None:
    """Each patch side must be divisible by 2**(depth-1), because the U-Net halves it that often."""
    factor = 2 ** (depth - 1)
    bad = [s for s in patch_size if s % factor]
    if bad:
        nearest = [max(factor, round(s / factor) * factor) for s in patch_size]
        raise ConfigError(
            f"data.patch_size: expected every side divisible by {factor} (model.depth={depth} halves "
            f"the patch {depth - 1} times). Received: {patch_size}. Nearest valid: {nearest}"
        )


def to_yaml(config: Config) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
