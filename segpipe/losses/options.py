"""Option validators shared by every loss (errors in the Keras form "Expected ... Received: arg=value").

Each validator takes ``(loss name, option key, value)`` and returns the normalised value or raises
:class:`segpipe.errors.SettingError` keyed by the option (training prefixes it with ``loss.``, a
compound loss with ``terms[i].``). :class:`segpipe.losses.base.SegmentationLoss` runs them at
construction, as MONAI does, so a bad option in a config file fails before any data is read.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from segpipe.errors import SettingError
from segpipe.settings import is_number

__all__ = ["VALIDATORS", "yaml_hint", "weights", "focal_alpha"]


def yaml_hint(value: Any) -> str | None:
    """A hint for YAML's string pitfalls (``1e-5`` and ``"true"`` read as strings), or None.

    >>> str(SettingError("batch", "a boolean for loss 'dice'", "true", hint=yaml_hint("true")))
    "Expected a boolean for loss 'dice'. Received: batch='true'. Write an unquoted true/false."
    """
    if isinstance(value, str):
        try:
            float(value)
            return "YAML reads numbers such as 1e-5 without a dot as strings; write 1.0e-5."
        except ValueError:
            if value.lower() in ("true", "false"):
                return "Write an unquoted true/false."
    return None


def boolean(loss: str, key: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise SettingError(key, f"a boolean for loss '{loss}'", v, hint=yaml_hint(v))
    return v


def number(low: float, high: float = math.inf, *, low_open: bool = False,
           high_open: bool = False) -> Callable[[str, str, Any], float]:
    """A validator for a number in ``[low, high]`` (either end open)."""
    def check(loss: str, key: str, v: Any) -> float:
        ok = is_number(v, finite=True) and (v > low if low_open else v >= low) and (
            v < high if high_open else v <= high)
        if not ok:
            if high == math.inf:
                expected = f"a number {'>' if low_open else '>='} {low:g}"
            else:
                expected = (f"a number in {'(' if low_open else '['}{low:g}, "
                            f"{high:g}{')' if high_open else ']'}")
            raise SettingError(key, f"{expected} for loss '{loss}'", v, hint=yaml_hint(v))
        return float(v)
    return check


def _is_list_like(v: Any) -> bool:
    return hasattr(v, "__iter__") and hasattr(v, "__len__") and not isinstance(
        v, (str, bytes, Mapping))


def weights(loss: str, key: str, v: Any) -> list[float] | None:
    """None, or a non-empty list of non-negative numbers with a positive sum."""
    if v is None:
        return None
    if (not _is_list_like(v) or len(v) == 0
            or not all(is_number(x, finite=True) and x >= 0 for x in v) or sum(v) <= 0):
        raise SettingError(key, "null or a non-empty list of non-negative numbers with a positive sum "
                                f"(one per scored class) for loss '{loss}'", v, hint=yaml_hint(v))
    return [float(x) for x in v]


def focal_alpha(loss: str, key: str, v: Any) -> float | list[float] | None:
    """Focal ``alpha``: None, a number in [0, 1], or one weight per scored class."""
    if v is None:
        return None
    return weights(loss, key, v) if _is_list_like(v) else number(0.0, 1.0)(loss, key, v)


def weight_type(loss: str, key: str, v: Any) -> str:
    if v not in ("square", "simple", "uniform"):
        raise SettingError(key, f"one of ['square', 'simple', 'uniform'] for loss '{loss}'", v)
    return v


VALIDATORS: dict[str, Callable[[str, str, Any], Any]] = {
    "include_background": boolean, "batch": boolean, "from_logits": boolean,
    "squared_pred": boolean, "sigmoid": boolean, "smooth_nr": number(0.0), "smooth_dr": number(0.0),
    "alpha": number(0.0), "beta": number(0.0), "gamma": number(0.0, low_open=True),
    "class_weights": weights, "label_smoothing": number(0.0, 1.0, high_open=True),
    "weight_type": weight_type,
}
"""Option name -> validator (a loss class may override one, e.g. focal ``alpha``)."""
