"""Reading configs: YAML files with ``extends:``, dotted overrides, validation.

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
from pathlib import Path
from typing import Any, Literal

import yaml

from segpipe.config.schema import Config, ConfigError, DataConfig
from segpipe.data.augment import AugmentSettings
from segpipe.data.preprocess import NORMALIZATIONS
from segpipe.errors import Received, SettingError, expected
from segpipe.inference.settings import InferenceSettings

REPLACED_WHOLE = {"loss"}  # sections a child file replaces instead of merging


# ---------------------------------------------------------------- reading YAML


def read_yaml_with_extends(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML config file, merging the files it ``extends`` (a path or a list) first."""
    path = Path(path).resolve()
    # a missing or cyclic parent is the ``extends`` key of the file that names it
    where, key = (str(_chain[-1]), "extends") if _chain else (None, "config")
    if path in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain, path))
        raise ConfigError(expected("config files that do not extend each other in a cycle", key=key,
                                   received=Received(cycle), where=where))
    if not path.is_file():
        raise ConfigError(expected("an existing config file", key=key, received=str(path), where=where))
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(expected("valid YAML", key="contents", received=Received(f"invalid YAML ({exc})"),
                                   where=str(path))) from exc
    if not isinstance(data, dict):
        raise ConfigError(expected("a mapping of config sections at the top level", key="contents",
                                   received=Received(f"a {type(data).__name__}"), where=str(path)))
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
            raise ConfigError(expected("an override of the form key.sub=value", key="--set", received=item))
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(expected("a YAML value after '='", key=key, received=raw,
                                       hint=f"YAML says: {' '.join(str(exc).split())}")) from exc
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
        raise ConfigError(_expected(prefix.rstrip(".") or "config", "a mapping", data))
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise ConfigError(_unknown_key(prefix, str(key), list(fields), data[key]))
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        kwargs[name] = _convert(value, hints[name], key)
        _check_range(kwargs[name], fields[name].metadata, key)
    try:
        return cls(**kwargs)
    except SettingError as exc:  # validated by the settings class itself; add the key's path once
        raise ConfigError(str(exc.with_prefix(prefix))) from None


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        alternatives = [a for a in args if a is not type(None)]
        if len(alternatives) == 1:
            return _convert(value, alternatives[0], key)
        for alternative in alternatives:  # e.g. str | list[str]: the first that fits
            try:
                return _convert(value, alternative, key)
            except ConfigError:
                continue
        raise ConfigError(_expected(key, " or ".join(_describe(a) for a in alternatives), value))
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, {} if value is None else value, prefix=f"{key}.")
    if origin is Literal:
        if isinstance(value, bool):  # YAML 1.1 reads a bare off/on/no/yes as a boolean: map it back
            value = next((a for a in args if isinstance(a, str) and yaml.safe_load(a) is value), value)
        if value not in args:
            raise ConfigError(_expected(key, f"one of {list(args)}", value, suggest=[str(a) for a in args]))
        return value
    if origin in (list, tuple):  # tuple[T, ...] of frozen settings
        if not isinstance(value, (list, tuple)):
            raise ConfigError(_expected(key, f"a list of {args[0].__name__}", value))
        items = [_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
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
    # a bug in this module (a schema type it cannot read), not in the config
    raise TypeError(expected("a config type this loader reads", key=key, received=Received(repr(tp))))


def _describe(tp: Any) -> str:
    """``str`` -> 'a string', ``list[str]`` -> 'a list of str' (for union error messages)."""
    if typing.get_origin(tp) in (list, tuple):
        return f"a list of {typing.get_args(tp)[0].__name__}"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(tp, getattr(tp, "__name__", str(tp)))


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


def _expected(key: str, what: str, received: Any, suggest: list[str] | None = None) -> str:
    hint = None
    if suggest and isinstance(received, str):
        close = difflib.get_close_matches(received, suggest, n=1)
        hint = f"Did you mean {close[0]!r}?" if close else None
    return expected(what, key=key, received=received, hint=hint)


def _unknown_key(prefix: str, key: str, valid: list[str], value: Any) -> str:
    """An unknown key, shown with its value: "Expected a key of data (...). Received: data.patch_sise=..."."""
    section = prefix.rstrip(".") or "the top level"
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"Did you mean '{prefix}{close[0]}'?" if close else None
    return expected(f"a key of {section} ({', '.join(valid)})", key=f"{prefix}{key}", received=value, hint=hint)


# ---------------------------------------------------------------- cross-field checks


def validate(config: Config) -> None:
    """Checks that involve several keys (single keys are checked while converting)."""
    data = config.data
    if data.root is None:
        raise ConfigError(expected("the dataset folder, which this config leaves to the command line", key="data.root",
                                   received=Received("null"), hint="Add --set data.root=PATH/TO/DATASET"))
    validate_data(data)
    check_patch_size(data.patch_size, config.model.depth)
    if not isinstance(config.loss, dict) or not ("name" in config.loss or "terms" in config.loss):
        raise ConfigError(_expected("loss", "a mapping with 'name' (or 'terms' for a compound loss)", config.loss))
    if config.train.sync_batch_norm and config.model.norm != "batch":
        raise ConfigError(expected("'batch' when train.sync_batch_norm is true (only batch norm has "
                                   "statistics to synchronise)", key="model.norm", received=config.model.norm))
    if config.train.export_onnx and not config.train.export_bundle:
        raise ConfigError(expected("true when train.export_onnx is true (model.onnx is part of the bundle)",
                                   key="train.export_bundle", received=False))
    for key in ("name", "experiment"):
        check_folder_name(getattr(config, key), key)


def check_folder_name(value: str | None, key: str) -> None:
    """``name`` and ``experiment`` become folder names: one non-empty path component."""
    if value is not None and (not value or value in (".", "..") or "/" in value or "\\" in value):
        raise ConfigError(_expected(key, "a folder name (no '/' or '\\', not '.' or '..')", value))


def check_inference_classes(inference: InferenceSettings, num_classes: int) -> None:
    """``inference.postprocess_largest_component`` must name foreground labels of the dataset (checked before training)."""
    try:
        inference.check_classes(num_classes)
    except SettingError as exc:
        raise ConfigError(str(exc.with_prefix("inference."))) from None


def validate_data(data: DataConfig) -> None:
    """Checks of the ``data`` section beyond single-key types and ranges."""
    if len(data.patch_size) != 3:
        raise ConfigError(_expected("data.patch_size", "3 sizes [x, y, z]", data.patch_size))
    if data.phantoms is not None and len(data.phantoms.shape) != 3:
        raise ConfigError(_expected("data.phantoms.shape", "3 sizes [x, y, z]", data.phantoms.shape))
    if data.phantoms is not None and len(data.phantoms.spacing_mm) != 3:
        raise ConfigError(_expected("data.phantoms.spacing_mm", "3 spacings [x, y, z]", data.phantoms.spacing_mm))
    if data.target_spacing_mm is not None and len(data.target_spacing_mm) != 3:
        raise ConfigError(_expected("data.target_spacing_mm", "3 spacings [x, y, z] in mm (RAS order) or null",
                                    data.target_spacing_mm))
    schemes = [data.normalization] if isinstance(data.normalization, str) else data.normalization
    for i, scheme in enumerate(schemes):
        if scheme not in NORMALIZATIONS:
            key = "data.normalization" if isinstance(data.normalization, str) else f"data.normalization[{i}]"
            raise ConfigError(_expected(key, f"one of {list(NORMALIZATIONS)}", scheme, suggest=list(NORMALIZATIONS)))
    if not schemes:
        raise ConfigError(_expected("data.normalization", "a scheme or a list with one per channel", data.normalization))
    if data.split_file is not None and data.folds is not None:
        raise ConfigError(_expected("data.folds", "null with data.split_file (the file fixes the split)", data.folds))
    if data.folds is None and data.fold != 0:
        raise ConfigError(_expected("data.fold", "0 when data.folds is null (no k-fold split)", data.fold))
    if data.folds is not None and data.fold >= data.folds:
        raise ConfigError(_expected("data.fold", f"a fold in 0..{data.folds - 1} (data.folds={data.folds})", data.fold))
    validate_augment(data.augment)


def validate_augment(augment: dict[str, Any]) -> None:
    """Check ``data.augment`` entry by entry, so an error names ``data.augment.<transform>.<key>``."""
    kinds = {f.name: f for f in dataclasses.fields(AugmentSettings)}
    for name, spec in augment.items():
        if name not in kinds:
            raise ConfigError(_unknown_key("data.augment.", str(name), list(kinds), spec))
        key = f"data.augment.{name}"
        if name == "order":
            if isinstance(spec, bool) or not isinstance(spec, int):
                raise ConfigError(_expected(key, "an integer spline order in 0..5", spec))
        elif not isinstance(spec, dict):
            raise ConfigError(_expected(key, "a mapping like {p: 0.2, ...}", spec))
        else:
            defaults = kinds[name].default_factory()
            allowed = [f.name for f in dataclasses.fields(defaults)]
            for sub, value in spec.items():
                if sub not in allowed:
                    raise ConfigError(_unknown_key(f"{key}.", str(sub), allowed, value))
                _check_augment_type(value, getattr(defaults, sub), f"{key}.{sub}")
                _build_augment({name: {sub: value}})
        _build_augment({name: spec})


def _check_augment_type(value: Any, default: Any, key: str) -> None:
    """A number where the default is a number, a list of numbers where it is a tuple."""
    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if isinstance(default, tuple):
        if not isinstance(value, list) or not all(number(v) for v in value):
            raise ConfigError(_expected(key, f"a list of numbers like {list(default)}", value))
    elif not number(value):
        raise ConfigError(_expected(key, f"a number like {default}", value))


def _build_augment(entry: dict[str, Any]) -> None:
    try:
        AugmentSettings.from_dict(entry)
    except SettingError as exc:  # keyed by "rotation.p": add the section's path once
        raise ConfigError(str(exc.with_prefix("data.augment."))) from None


def check_patch_size(patch_size: list[int], depth: int) -> None:
    """Each patch side must be divisible by 2**(depth-1), because the U-Net halves it that often."""
    factor = 2 ** (depth - 1)
    bad = [s for s in patch_size if s % factor]
    if bad:
        nearest = [max(factor, round(s / factor) * factor) for s in patch_size]
        raise ConfigError(expected(f"every side divisible by {factor} (model.depth={depth} halves the patch "
                                   f"{depth - 1} times)", key="data.patch_size", received=patch_size,
                                   hint=f"Nearest valid: {nearest}"))


def to_yaml(config: Config) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
