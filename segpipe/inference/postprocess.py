"""Post-processing of predicted label maps.

:func:`keep_largest_component` keeps, for each chosen class, only its largest connected component
and sets the other components to background (0). It helps for structures that exist once per scan
(an organ) and hurts for those that may appear several times (lesions, metastases), so it is applied
per class and off by default; nnU-Net decides it per class on the validation folds.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
from scipy import ndimage

from segpipe.errors import Received, expected


def keep_largest_component(labels: np.ndarray, classes: Iterable[int], *, connectivity: int = 3) -> np.ndarray:
    """Keep only the largest connected component of each class in ``classes``; the rest becomes 0.

    Args:
        labels: integer label map (X, Y, Z).
        classes: label values to process (0 is ignored); values absent from ``labels`` are skipped.
        connectivity: which neighbours touch: 1 = faces (6 in 3-D), 2 = faces and edges (18),
            3 = also corners (26, as scikit-image and MONAI default). Defaults to 3.

    Returns:
        A new label map of the same shape and dtype. When two components tie in size, the one
        ``scipy.ndimage.label`` numbers first is kept.

    Example:
        >>> labels = np.zeros((5, 1, 1), np.uint8); labels[[0, 2, 3], 0, 0] = 1
        >>> keep_largest_component(labels, [1])[:, 0, 0].tolist()
        [0, 0, 1, 1, 0]
    """
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(expected("an integer label map", key="labels.dtype", received=Received(str(labels.dtype))))
    if connectivity not in range(1, labels.ndim + 1):
        raise ValueError(expected(f"a connectivity in 1..{labels.ndim}", key="connectivity", received=connectivity))
    structure = ndimage.generate_binary_structure(labels.ndim, connectivity)
    out = labels.copy()
    for value in sorted({int(c) for c in classes} - {0}):
        mask = labels == value
        if not mask.any():
            continue
        components, count = ndimage.label(mask, structure=structure)
        if count <= 1:
            continue
        sizes = np.bincount(components.ravel())
        sizes[0] = 0  # index 0 is everything that is not this class
        out[mask & (components != int(np.argmax(sizes)))] = 0
    return out
