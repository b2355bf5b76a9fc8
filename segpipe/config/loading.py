"""Reading configs: YAML files with ``extends:``, dotted overrides, then :meth:`Config.from_dict`.

A run is described by one :class:`Config`. It is read from YAML (``extends: base.yaml`` merges a
parent file first, paths relative to the child), then dotted overrides such as
``train.epochs=3`` are applied, then the mapping becomes a :class:`Config`, whose sections check
themselves (:mod:`segpipe.settings`): unknown keys name the closest valid key, wrong types and
out-of-range values name the key, what was expected and what was received.

``loss`` is the one free-form section: its keys depend on the loss, so it is checked by
:func:`segpipe.losses.get_loss` when training is set up, before any data is read. A child file
that sets ``loss`` replaces the parent's loss as a whole (options of one loss rarely make sense for
another); every other mapping is merged key by key.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from segpipe.config.schema import Config, ConfigError
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
    """Read, merge, override and check a config. ``name`` defaults to the file's stem."""
    data = read_yaml_with_extends(path) if path is not None else {}
    data = apply_overrides(data, overrides or [])
    config = Config.from_dict(data)
    if config.name is None:
        config.name = Path(path).stem if path is not None else "default"
    validate(config)
    return config


def validate(config: Config) -> None:
    """Check ``config`` again as a whole (after fields were changed, as a sweep does), and that it names a dataset.

    A :class:`Config` checks itself when it is made; ``data.root`` may be null there (a config file
    can leave it to the command line), not in a config that is about to run.
    """
    if config.data.root is None:
        raise ConfigError(expected("the dataset folder, which this config leaves to the command line", key="data.root",
                                   received=Received("null"), hint="Add --set data.root=PATH/TO/DATASET"))
    Config.from_dict(_fields(config))  # every error a ConfigError naming the key's path


def _fields(settings: Any) -> Any:
    """A settings object as the mapping it was made from (nested settings too), for a fresh check."""
    if dataclasses.is_dataclass(settings) and not isinstance(settings, type):
        return {f.name: _fields(getattr(settings, f.name)) for f in dataclasses.fields(settings)}
    return settings


def check_inference_classes(inference: InferenceSettings, num_classes: int) -> None:
    """``inference.postprocess_largest_component`` must name foreground labels of the dataset (checked before
    training)."""
    try:
        inference.check_classes(num_classes)
    except SettingError as exc:
        raise ConfigError(str(exc.with_prefix("inference."))) from None


def to_yaml(config: Config) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
