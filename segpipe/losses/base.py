"""The loss base class and the registry of loss names.

:class:`SegmentationLoss` is a thin ``keras.losses.Loss`` around a pure function: it validates the
function's keyword options at construction, ``call`` returns the function's per-sample values
(shape (B,)), and ``__call__`` applies sample weights and the reduction as Keras does (see
:mod:`segpipe.losses` for the rules).
"""
from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from typing import Any

import keras

from segpipe.errors import SettingError, expected
from segpipe.losses.options import VALIDATORS
from segpipe.losses.tensors import REDUCTIONS, reduce_per_sample, split_sample_weight

__all__ = ["SegmentationLoss", "LOSSES", "ALIASES", "register", "lookup", "available_losses",
           "SERIALIZABLE", "check_reduction"]

SERIALIZABLE = keras.saving.register_keras_serializable(package="segpipe")

LOSSES: dict[str, type["SegmentationLoss"]] = {}
"""Registry name -> loss class (filled by :func:`register` in region.py and voxel.py)."""
ALIASES: dict[str, str] = {"jaccard": "iou", "ce": "cross_entropy"}


def register(name: str):
    """Class decorator: registry name, Keras serialisation (package "segpipe")."""
    def decorate(cls):
        cls.registry_name = name
        LOSSES[name] = cls
        return SERIALIZABLE(cls)
    return decorate


def available_losses() -> list[str]:
    """Sorted registry names and aliases accepted by :func:`segpipe.losses.get_loss`."""
    return sorted([*LOSSES, *ALIASES])


def lookup(name: Any) -> type["SegmentationLoss"]:
    """The loss class of a registry name or alias (case and ``-``/``_`` insensitive)."""
    if not isinstance(name, str):
        raise SettingError("name", "a loss name (a string)", name)
    key = name.strip().lower().replace("-", "_")
    key = ALIASES.get(key, key)
    if key in LOSSES:
        return LOSSES[key]
    if key == "compound":
        raise SettingError("name", "a compound loss written as {'terms': [{'name': ..., 'weight': ...}, ...]}", name)
    valid = available_losses()
    close = difflib.get_close_matches(key, valid, n=1)
    raise SettingError("name", f"one of {valid}, or a compound {{'terms': [...]}}", name,
                       hint=f"Did you mean '{close[0]}'?" if close else None)


def check_reduction(reduction: Any) -> None:
    if reduction not in REDUCTIONS:
        raise SettingError("reduction", f"one of {list(REDUCTIONS)}", reduction)


class SegmentationLoss(keras.losses.Loss):
    """Base class: a validated set of options forwarded to a pure per-sample loss function.

    The accepted options and their defaults are the keyword-only parameters of ``fn`` (except
    ``pool_weights``, which the class fills from ``sample_weight``). ``call(y_true, y_pred)``
    returns one float32 value per sample, shape (B,); calling the loss applies ``sample_weight``
    and ``reduction`` like ``keras.losses.CategoricalCrossentropy``.

    Parameters
    ----------
    reduction
        "sum_over_batch_size" (default), "sum", "mean" (= sum_over_batch_size in
        Keras 3), "mean_with_sample_weight", or None/"none" (the weighted per-sample values).
    name
        defaults to the registry name.
    dtype
        the dtype inputs are converted to by Keras (the math runs in float32).
    **options
        the loss's options (see its pure function).
    """

    registry_name: str = ""
    fn: Callable = staticmethod(lambda y_true, y_pred: None)
    voxel_weights_ok: bool = False  # voxel losses accept sample_weight of shape (B, X, Y, Z)
    _validators: dict[str, Callable] = {}

    def __init__(self, *, name: str | None = None, reduction: str | None = "sum_over_batch_size",
                 dtype=None, **options: Any):
        check_reduction(reduction)
        defaults = self.defaults()
        for key in options:
            if key not in defaults:
                close = difflib.get_close_matches(key, list(defaults), n=1)
                raise SettingError(key, f"an option of loss '{self.registry_name}' out of {sorted(defaults)}",
                                   options[key], hint=f"Did you mean '{close[0]}'?" if close else None)
        merged = {**defaults, **options}
        self.options = {key: self._validators.get(key, VALIDATORS[key])(self.registry_name, key, v)
                        for key, v in merged.items()}
        if self.options.get("sigmoid") and not self.options.get("include_background", True):
            raise SettingError("include_background", f"true for loss '{self.registry_name}' with sigmoid: true "
                                                     "(region outputs have no background channel to drop)", False)
        self._check_options()
        super().__init__(name=name or self.registry_name, reduction=reduction, dtype=dtype)

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Option name -> default value, read from the pure function's signature."""
        return {p.name: p.default for p in inspect.signature(cls.fn).parameters.values()
                if p.kind is p.KEYWORD_ONLY and p.name != "pool_weights"}

    @property
    def pools_batch(self) -> bool:
        """True if the value needs the whole batch (``batch=True``: counts pooled over samples)."""
        return bool(self.options.get("batch", False))

    def _check_options(self) -> None:
        """Hook for checks involving several options."""

    def call(self, y_true, y_pred):
        """Per-sample values, shape (B,) (no sample weights, no reduction)."""
        return self.fn(y_true, y_pred, **self.options)

    def weighted_values(self, y_true, y_pred, sample_weight=None):
        """``(values (B,), weights (B,) or None)`` that :func:`reduce_per_sample` reduces.

        Per-sample weights pass through (and, with ``batch=True``, also weight each sample's
        voxels in the pooled counts). Voxel weights (voxel losses only) are split into a
        per-sample weight, the voxel mean ``s_b = mean_v w_bv``, and the weighted voxel mean
        ``sum_v w_bv l_bv / sum_v w_bv`` as the sample's value, so that every reduction equals
        Keras's reduction of the per-voxel values except "sum" (a sum of per-sample voxel means).
        """
        per_sample, per_voxel = split_sample_weight(
            sample_weight, y_pred, loss_name=self.registry_name, voxel_ok=self.voxel_weights_ok)
        if per_voxel is not None:
            return self.voxel_weighted_values(y_true, y_pred, per_voxel)
        if self.pools_batch and per_sample is not None:
            return self.fn(y_true, y_pred, pool_weights=per_sample, **self.options), per_sample
        return self.call(y_true, y_pred), per_sample

    def voxel_weighted_values(self, y_true, y_pred, voxel_weights):
        raise NotImplementedError  # only voxel losses accept voxel weights (split_sample_weight)

    def __call__(self, y_true, y_pred, sample_weight=None):
        with keras.name_scope(self.name):
            values, weights = self.weighted_values(y_true, y_pred, sample_weight)
            return reduce_per_sample(values, weights, self.reduction)

    def check_num_classes(self, num_classes: int) -> None:
        """Check per-class options against the number of output channels (incl. background)."""
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(expected("a positive integer", key="num_classes", received=num_classes))
        include_background = self.options["include_background"]
        scored = num_classes - (0 if include_background or self.options.get("sigmoid") else 1)
        if scored < 1:  # the dataset's class count, not an option: not a SettingError
            raise ValueError(expected(f"at least 2 classes for loss '{self.registry_name}' with "
                                      "include_background=False", key="num_classes", received=num_classes))
        for key in ("class_weights", "alpha"):
            value = self.options.get(key)
            if isinstance(value, list) and len(value) != scored:
                raise SettingError(key, f"one entry per scored class for loss '{self.registry_name}': {scored} "
                                        f"(num_classes={num_classes}, include_background={include_background})",
                                   value)

    def with_options(self, **options: Any) -> "SegmentationLoss":
        """A copy with some options replaced (e.g. ``from_logits=True`` for a logits model)."""
        return type(self)(name=self.name, reduction=self.reduction,
                          **{**self.options, **options})

    def to_spec(self) -> dict[str, Any]:
        """Minimal config-file form: ``{"name": ..., <non-default options>}``."""
        defaults = self.defaults()
        return {"name": self.registry_name,
                **{k: v for k, v in self.options.items() if v != defaults[k]}}

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), **self.options}

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.to_spec().items() if k != "name")
        return f"{type(self).__name__}({options})"
