"""Small array helpers shared by several stages (preprocessing, fingerprint, metrics, caching, evaluation)."""
from __future__ import annotations

import hashlib
import math
from typing import Iterable

import numpy as np
from scipy import ndimage


def bounding_box(mask: np.ndarray, *, margin: int = 0) -> tuple[slice, ...] | None:
    """Slices of the smallest box holding the ``True`` voxels of ``mask``, grown by ``margin`` voxels
    per side (clipped to the array); None for an empty mask.

    Examples
    --------
    >>> mask = np.zeros((5, 5), bool); mask[1:3, 2] = True
    >>> bounding_box(mask)
    (slice(1, 3, None), slice(2, 3, None))
    >>> bounding_box(mask, margin=1)
    (slice(0, 4, None), slice(1, 4, None))
    """
    (box,) = ndimage.find_objects(np.asarray(mask, dtype=bool).astype(np.uint8), max_label=1)
    if box is None:
        return None
    return tuple(slice(max(s.start - margin, 0), min(s.stop + margin, n)) for s, n in zip(box, mask.shape))


def seed_from_text(text: str) -> int:
    """A 32-bit seed from a string (a case id), the same on every machine and Python run
    (``hash()`` is salted per process)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


def nan_stats(values: Iterable[float]) -> dict[str, float]:
    """``{"mean", "std", "median", "n"}`` of the values that are not NaN (NaN statistics and n = 0
    when none is); std is the population's (ddof 0). A metric's summary over cases.

    Examples
    --------
    >>> nan_stats([1.0, float("nan"), 3.0])
    {'mean': 2.0, 'std': 1.0, 'median': 2.0, 'n': 2}
    >>> nan_stats([float("nan")])["n"]
    0
    """
    array = np.asarray(list(values), dtype=np.float64)
    defined = array[~np.isnan(array)]
    if defined.size == 0:
        return {"mean": math.nan, "std": math.nan, "median": math.nan, "n": 0}
    return {"mean": float(defined.mean()), "std": float(defined.std()), "median": float(np.median(defined)),
            "n": int(defined.size)}
