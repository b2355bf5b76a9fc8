"""How much a U-Net of segpipe down-samples each axis (no Keras here: data and config use it)."""
from __future__ import annotations

import math
from typing import Sequence


def model_divisor(depth: int, strides: Sequence[Sequence[int]] | None = None) -> list[int]:
    """How much the network down-samples each axis: 2**(depth-1), or the product of that axis's strides.

    Every patch side must divide by it.

    Examples
    --------
    >>> model_divisor(4)
    [8, 8, 8]
    >>> model_divisor(3, [[1, 1, 1], [2, 2, 1], [2, 2, 2]])
    [4, 4, 2]
    """
    if strides is None:
        return [2 ** (depth - 1)] * 3
    return [int(math.prod(int(t[a]) for t in strides)) for a in range(3)]
