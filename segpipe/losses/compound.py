"""Compound loss: a weighted sum of segpipe losses, per sample (e.g. nnU-Net's Dice + CE)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import keras

from segpipe.errors import Received, SettingError, expected
from segpipe.losses import region, voxel  # noqa: F401  (registers the single losses)
from segpipe.losses.base import SERIALIZABLE, SegmentationLoss, check_reduction, lookup
from segpipe.losses.tensors import reduce_per_sample
from segpipe.settings import is_number

__all__ = ["CompoundLoss", "build_loss_from_spec"]


def build_loss_from_spec(spec: str | Mapping[str, Any]) -> keras.losses.Loss:
    """A single loss from a name or ``{"name": ..., <options>}``, or a compound from ``{"terms": ...}``."""
    if isinstance(spec, str):
        return lookup(spec)()
    if not isinstance(spec, Mapping):
        raise ValueError(expected("a loss name, a config dict or a segpipe loss", key="spec", received=spec))
    config = dict(spec)
    if "terms" in config:
        name = config.pop("name", "compound")
        terms = config.pop("terms")
        extra = {**({"name": name} if name != "compound" else {}), **config}
        if extra:
            key = next(iter(extra))
            raise SettingError(key, "only `terms` (and `name: compound`) in a compound loss; options go into "
                                    "each term", extra[key])
        return CompoundLoss(terms)
    if "name" not in config:
        raise SettingError("name", "a loss config with a `name` (or `terms` for a compound loss)",
                           Received(f"<missing> in {dict(spec)!r}"))
    return lookup(config.pop("name"))(**config)


@SERIALIZABLE
class CompoundLoss(keras.losses.Loss):
    """Weighted sum of losses per sample: ``l_b = sum_i lambda_i * loss_i_b``, then Keras's reduction.

    The terms' own ``reduction`` is not used; the compound's applies to the summed per-sample
    values, and ``sample_weight`` is passed to every term (so voxel weights need voxel terms only).

    Parameters
    ----------
    terms
        a sequence whose items are config dicts ``{"name": ..., "weight": 1.0, <options>}``
        (``weight`` defaults to 1), loss names, or ``(weight, loss)`` pairs of segpipe losses.
    reduction, name, dtype
        as ``keras.losses.Loss``.

    Examples
    --------
    ``CompoundLoss([{"name": "dice", "include_background": False}, {"name": "ce"}])`` is
    nnU-Net's default Dice + CE (nnU-Net keeps the background in the CE term).
    """

    def __init__(self, terms: Sequence[Any], *, name: str | None = "compound",
                 reduction: str | None = "sum_over_batch_size", dtype=None):
        check_reduction(reduction)
        if isinstance(terms, (str, bytes, Mapping)) or not isinstance(terms, Sequence) or not terms:
            raise SettingError("terms", "a non-empty list of loss configs", terms)
        self.terms = [self._parse_term(term, f"terms[{i}]") for i, term in enumerate(terms)]
        if sum(w for w, _ in self.terms) <= 0:
            raise ValueError(expected("at least one compound term with a positive weight", key="weights",
                                      received=[w for w, _ in self.terms]))
        super().__init__(name=name, reduction=reduction, dtype=dtype)

    @staticmethod
    def _parse_term(term, key: str):
        """``(weight, loss)`` of the term at ``key`` ("terms[1]"), which prefixes its errors' keys."""
        if isinstance(term, (str, Mapping)):
            term = {"name": term} if isinstance(term, str) else dict(term)
            weight = term.pop("weight", 1.0)
            try:
                loss = build_loss_from_spec(term)
            except SettingError as exc:  # name the term once: terms[1].alpha
                raise exc.with_prefix(key + ".") from None
        elif (isinstance(term, (tuple, list)) and len(term) == 2
              and isinstance(term[1], (SegmentationLoss, CompoundLoss))):
            weight, loss = term
        else:
            raise SettingError(key, "a config dict, a loss name or a (weight, loss) pair", term)
        if not (is_number(weight, finite=True) and weight >= 0):
            raise SettingError(key + ".weight", "a non-negative number", weight)
        return float(weight), loss

    @property
    def pools_batch(self) -> bool:
        return any(loss.pools_batch for _, loss in self.terms)

    def weighted_values(self, y_true, y_pred, sample_weight=None):
        """``(sum_i lambda_i values_i, weights)``; every term sees the same ``sample_weight``,
        so the terms' weights agree (per-sample weights, or the voxel mean of voxel weights)."""
        total, weights = 0.0, None
        for weight, loss in self.terms:
            if weight:
                values, weights = loss.weighted_values(y_true, y_pred, sample_weight)
                total = total + weight * values
        return total, weights

    def call(self, y_true, y_pred):
        return self.weighted_values(y_true, y_pred)[0]

    def __call__(self, y_true, y_pred, sample_weight=None):
        with keras.name_scope(self.name):
            values, weights = self.weighted_values(y_true, y_pred, sample_weight)
            return reduce_per_sample(values, weights, self.reduction)

    def check_num_classes(self, num_classes: int) -> None:
        for i, (_, loss) in enumerate(self.terms):
            try:
                loss.check_num_classes(num_classes)
            except SettingError as exc:
                raise exc.with_prefix(f"terms[{i}].") from None

    def with_options(self, **options: Any) -> "CompoundLoss":
        """A copy with ``options`` set in every term."""
        return CompoundLoss([(w, loss.with_options(**options)) for w, loss in self.terms],
                            name=self.name, reduction=self.reduction)

    def to_spec(self) -> dict[str, Any]:
        return {"terms": [{**loss.to_spec(), "weight": w} for w, loss in self.terms]}

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), **self.to_spec()}

    def __repr__(self) -> str:
        return " + ".join(f"{w:g}*{loss!r}" for w, loss in self.terms)
