"""Post-processing of predicted label maps.

:func:`keep_largest_component` keeps, for each chosen class, only its largest connected component
and sets the other components to background (0). It helps for structures that exist once per scan
(an organ) and hurts for those that may appear several times (lesions, metastases), so it is applied
per class and off by default; nnU-Net decides it per class on the validation folds.
:func:`keep_largest_foreground_component` does the same for all foreground classes taken together
(one mask of every label > 0), and :func:`apply_largest_component_steps` applies both in the order
:mod:`segpipe.evaluation.postprocessing` chose them (all foreground first, then per class).
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
from scipy import ndimage

from segpipe.errors import Received, expected


def keep_largest_component(labels: np.ndarray, classes: Iterable[int], *, connectivity: int = 3) -> np.ndarray:
    """Keep only the largest connected component of each class in ``classes``; the rest becomes 0.

    Parameters
    ----------
    labels
        integer label map (X, Y, Z).
    classes
        label values to process (0 is ignored); values absent from ``labels`` are skipped.
    connectivity
        which neighbours touch: 1 = faces (6 in 3-D), 2 = faces and edges (18),
        3 = also corners (26, as scikit-image and MONAI default). Defaults to 3.

    Returns
    -------
    np.ndarray
        A new label map of the same shape and dtype. When two components tie in size, the one
        ``scipy.ndimage.label`` numbers first is kept.

    Examples
    --------
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


def keep_largest_foreground_component(labels: np.ndarray, *, connectivity: int = 3) -> np.ndarray:
    """Keep only the largest connected component of all foreground (every label > 0) taken together.

    Voxels of any class outside that component become 0; inside it labels are unchanged (so two
    touching classes survive together). This is nnU-Net's first post-processing step ("remove all
    but the largest foreground region").

    Parameters
    ----------
    labels : np.ndarray
        Integer label map (X, Y, Z).
    connectivity : int, optional
        As in :func:`keep_largest_component`: 1 = faces, 2 = faces and edges, 3 = also corners
        (the default).

    Returns
    -------
    np.ndarray
        A new label map of the same shape and dtype. Ties in size keep the component
        ``scipy.ndimage.label`` numbers first.

    Examples
    --------
    >>> labels = np.zeros((6, 1, 1), np.uint8); labels[[0, 2, 3], 0, 0] = [2, 1, 2]
    >>> keep_largest_foreground_component(labels)[:, 0, 0].tolist()
    [0, 0, 1, 2, 0, 0]
    """
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(expected("an integer label map", key="labels.dtype", received=Received(str(labels.dtype))))
    if connectivity not in range(1, labels.ndim + 1):
        raise ValueError(expected(f"a connectivity in 1..{labels.ndim}", key="connectivity", received=connectivity))
    mask = labels > 0
    out = labels.copy()
    components, count = ndimage.label(mask, structure=ndimage.generate_binary_structure(labels.ndim, connectivity))
    if count > 1:
        sizes = np.bincount(components.ravel())
        sizes[0] = 0  # background
        out[mask & (components != int(np.argmax(sizes)))] = 0
    return out


def apply_largest_component_steps(
    labels: np.ndarray, *, largest_foreground: bool = False, classes: Iterable[int] = (), connectivity: int = 3
) -> np.ndarray:
    """Apply chosen post-processing: the all-foreground step (if on), then the per-class steps.

    The order is the one the choice was made in (:func:`segpipe.evaluation.postprocessing.choose_postprocessing`
    judges the per-class steps on top of the all-foreground step), so apply it in this order.

    Parameters
    ----------
    labels : np.ndarray
        Integer label map.
    largest_foreground : bool, optional
        Keep only the largest component of all foreground together first
        (:func:`keep_largest_foreground_component`). Defaults to False.
    classes : iterable of int, optional
        Then keep only the largest component of each of these classes (:func:`keep_largest_component`).
    connectivity : int, optional
        Neighbourhood of both steps (see :func:`keep_largest_component`). Defaults to 3.

    Returns
    -------
    np.ndarray
        A new label map (a copy even when no step is on).

    Examples
    --------
    >>> labels = np.zeros((7, 1, 1), np.uint8); labels[[0, 2, 3, 5], 0, 0] = [1, 1, 2, 2]
    >>> apply_largest_component_steps(labels, classes=[2])[:, 0, 0].tolist()
    [1, 0, 1, 2, 0, 0, 0]
    >>> apply_largest_component_steps(labels, largest_foreground=True)[:, 0, 0].tolist()
    [0, 0, 1, 2, 0, 0, 0]
    """
    out = (keep_largest_foreground_component(labels, connectivity=connectivity) if largest_foreground
           else np.array(labels))
    classes = list(classes)
    return keep_largest_component(out, classes, connectivity=connectivity) if classes else out
