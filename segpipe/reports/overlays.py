"""Slice overlays of one case: the image with the reference and the prediction drawn as contours.

Three views, one per array axis, each at the slice where the error is largest: the slice holding
the most voxels of the symmetric difference ``reference XOR prediction`` (ties: the larger union,
then the lower index; no error at all: the largest union; empty masks: the middle slice). Views are
named from the affine's axis codes (``nibabel.aff2axcodes``): axial, coronal, sagittal, and drawn
with superior (else anterior) up; the pixel aspect ratio comes from the voxel spacing, so
anisotropic volumes are not stretched. Intensities are windowed by percentiles (0.5 %–99.5 % by
default) of the displayed region around the structure, which suits MR (arbitrary scale, bright
outliers) and CT (air at -1000 HU around the body) alike.

:func:`choose_cases` picks the best, median and worst case of a class by Dice for the report.
"""
from __future__ import annotations

import io
import math
from typing import Any, Mapping, Sequence

import numpy as np

from segpipe.errors import Received, expected

__all__ = [
    "error_slices",
    "intensity_window",
    "crop_box",
    "slice_aspect",
    "view_names",
    "render_overlay",
    "choose_cases",
    "REFERENCE_COLOR",
    "PREDICTION_COLOR",
]

# Yellow and magenta: far apart in hue and in lightness (still distinct for red-green colour
# blindness), and both visible on a grey-scale image.
REFERENCE_COLOR = "#ffd700"
PREDICTION_COLOR = "#ff00ff"
_ANATOMICAL = {"L": "sagittal", "R": "sagittal", "A": "coronal", "P": "coronal", "S": "axial", "I": "axial"}


def error_slices(ref_mask: np.ndarray, pred_mask: np.ndarray) -> tuple[int, ...]:
    """Per axis, the index of the slice with the most wrongly labelled voxels.

    Parameters
    ----------
    ref_mask, pred_mask : ndarray of bool
        Reference and prediction of one class, same shape.

    Returns
    -------
    slices : tuple of int
        ``slices[a]`` indexes axis ``a``: the slice with the largest count of
        ``ref_mask ^ pred_mask``; ties go to the larger ``ref_mask | pred_mask``, then to the
        lower index. Without any error, the slice with the largest union; with empty masks, the
        middle slice.

    Examples
    --------
    >>> ref = np.zeros((5, 6, 7), bool); ref[1:4, 1:4, 1:4] = True
    >>> pred = ref.copy(); pred[3, 1:4, 1:4] = False; pred[3, 5, 6] = True
    >>> error_slices(ref, pred)
    (3, 1, 1)
    """
    ref_mask, pred_mask = np.asarray(ref_mask, bool), np.asarray(pred_mask, bool)
    if ref_mask.shape != pred_mask.shape:
        raise ValueError(expected(f"pred_mask of the same shape as ref_mask {ref_mask.shape}", key="pred_mask.shape",
                                  received=pred_mask.shape))
    error = ref_mask ^ pred_mask
    union = ref_mask | pred_mask
    out = []
    for axis in range(ref_mask.ndim):
        others = tuple(b for b in range(ref_mask.ndim) if b != axis)
        per_slice_error = error.sum(axis=others)
        per_slice_union = union.sum(axis=others)
        if per_slice_union.max(initial=0) == 0:
            out.append(ref_mask.shape[axis] // 2)
            continue
        # lexsort: last key first; argmax of (error, union, -index)
        order = np.lexsort((np.arange(per_slice_error.size), -per_slice_union, -per_slice_error))
        out.append(int(order[0]))
    return tuple(out)


def intensity_window(
    image: np.ndarray,
    *,
    percentiles: tuple[float, float] = (0.5, 99.5),
    region: tuple[slice, ...] | None = None,
) -> tuple[float, float]:
    """Display range ``(low, high)`` of ``image``: percentiles of its (finite) voxels in ``region``.

    Robust to outliers (a few very bright voxels do not darken the picture) and to the unit of
    the scan (MR arbitrary units, CT Hounsfield units). Falls back to the finite min/max when the
    percentiles coincide, and to ``(0, 1)`` for a constant or empty image.

    Examples
    --------
    >>> image = np.arange(1000.0); image[0] = -1e6; image[-1] = 1e6
    >>> low, high = intensity_window(image)
    >>> bool(0 < low < 10 and 990 < high < 1000)
    True
    """
    lower, upper = percentiles
    if not 0 <= lower < upper <= 100:
        raise ValueError(expected("0 <= lower < upper <= 100", key="percentiles", received=percentiles))
    values = np.asarray(image if region is None else image[region], dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 1.0
    low, high = (float(v) for v in np.percentile(values, [lower, upper]))
    if high <= low:
        low, high = float(values.min()), float(values.max())
    if high <= low:
        return low - 0.5, low + 0.5
    return low, high


def crop_box(
    ref_mask: np.ndarray, pred_mask: np.ndarray, *, spacing_mm: Sequence[float], margin_mm: float | None = 20.0
) -> tuple[slice, ...]:
    """Bounding box of ``ref_mask | pred_mask`` grown by ``margin_mm`` on every side (clipped).

    The whole volume when both masks are empty or ``margin_mm`` is None.
    """
    shape = np.asarray(ref_mask).shape
    union = np.asarray(ref_mask, bool) | np.asarray(pred_mask, bool)
    if margin_mm is None or not union.any():
        return tuple(slice(0, n) for n in shape)
    box = []
    for axis, (n, spacing) in enumerate(zip(shape, spacing_mm)):
        others = tuple(b for b in range(len(shape)) if b != axis)
        present = np.flatnonzero(union.any(axis=others))
        margin = int(math.ceil(margin_mm / float(spacing)))
        box.append(slice(max(0, int(present[0]) - margin), min(n, int(present[-1]) + 1 + margin)))
    return tuple(box)


def slice_aspect(spacing_mm: Sequence[float], *, vertical_axis: int, horizontal_axis: int) -> float:
    """``imshow`` aspect (pixel height / pixel width) of a slice showing these two array axes.

    Examples
    --------
    >>> slice_aspect((0.8, 0.8, 3.0), vertical_axis=2, horizontal_axis=0)  # a coronal view
    3.75
    """
    return float(spacing_mm[vertical_axis]) / float(spacing_mm[horizontal_axis])


def view_names(affine: np.ndarray | None, ndim: int = 3) -> list[str]:
    """Per array axis, the name of the view of a slice across that axis.

    ``axial (axis 2)`` etc. from the affine's axis codes; ``axis <a>`` without an affine.
    """
    if affine is None:
        return [f"axis {a}" for a in range(ndim)]
    codes = _axis_codes(affine)
    return [f"{_ANATOMICAL.get(codes[a], 'axis')} (axis {a})" for a in range(ndim)]


def render_overlay(
    image: np.ndarray | None,
    ref_mask: np.ndarray,
    pred_mask: np.ndarray,
    *,
    spacing_mm: Sequence[float],
    affine: np.ndarray | None = None,
    slices: Sequence[int] | None = None,
    caption: str = "",
    margin_mm: float | None = 20.0,
    percentiles: tuple[float, float] = (0.5, 99.5),
    dpi: int = 80,
) -> bytes:
    """A PNG (bytes) of three views of one case with reference and prediction contours.

    Parameters
    ----------
    image : ndarray or None
        The scan, same shape as the masks (the first channel of a multi-channel case). None draws
        the contours on black (and says so in the picture).
    ref_mask, pred_mask : ndarray of bool
        Reference and prediction of one class.
    spacing_mm : sequence of float
        Voxel size along each axis, in mm (sets the aspect ratio and the margin).
    affine : ndarray, optional
        The volume's affine: names the views and puts superior/anterior up.
    slices : sequence of int, optional
        Slice index per axis. Defaults to :func:`error_slices`.
    caption : str, optional
        Figure title, e.g. case, class, Dice and HD95.
    margin_mm : float or None, optional
        Views show the structure's bounding box plus this margin; None shows whole slices.
    percentiles : (float, float), optional
        Intensity window (see :func:`intensity_window`).
    dpi : int, optional
        Resolution of the PNG.
    """
    ref_mask, pred_mask = np.asarray(ref_mask, bool), np.asarray(pred_mask, bool)
    if ref_mask.ndim != 3 or ref_mask.shape != pred_mask.shape:
        raise ValueError(expected("3-D masks of one shape", key="ref_mask.shape",
                                  received=Received(f"{ref_mask.shape}, pred_mask.shape={pred_mask.shape}")))
    if image is not None:
        image = np.asarray(image)
        if image.ndim == 4:
            image = image[..., 0]
        if image.shape != ref_mask.shape:
            raise ValueError(expected(f"an image of the shape of the masks {ref_mask.shape}", key="image.shape",
                                      received=image.shape))
    if len(spacing_mm) != 3:
        raise ValueError(expected("3 numbers", key="spacing_mm", received=spacing_mm))
    slices = tuple(error_slices(ref_mask, pred_mask) if slices is None else (int(s) for s in slices))
    box = crop_box(ref_mask, pred_mask, spacing_mm=spacing_mm, margin_mm=margin_mm)
    low, high = intensity_window(image, percentiles=percentiles, region=box) if image is not None else (0.0, 1.0)
    codes = _axis_codes(affine) if affine is not None else None
    names = view_names(affine)

    plt = _pyplot()
    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(1, 3, figsize=(10.5, 4.2))
    for axis, ax in enumerate(axes):
        vertical, horizontal = _view_axes(axis, codes)
        index = slices[axis]
        box_in_plane = tuple(slice(index, index + 1) if b == axis else box[b] for b in range(3))
        flip = codes is not None and codes[vertical] in ("I", "P")

        def plane(volume, box_in_plane=box_in_plane, axis=axis, vertical=vertical, horizontal=horizontal, flip=flip):
            cut = np.squeeze(volume[box_in_plane], axis=axis)  # dims: the other two axes, in order
            cut = cut.T if vertical > horizontal else cut  # rows = the vertical axis
            return cut[::-1] if flip else cut  # origin="lower": row 0 at the bottom

        background = plane(image) if image is not None else np.zeros(plane(ref_mask).shape)
        ax.imshow(background, cmap="gray", vmin=low, vmax=high, origin="lower", interpolation="nearest",
                  aspect=slice_aspect(spacing_mm, vertical_axis=vertical, horizontal_axis=horizontal))
        # The reference wider and underneath, so a perfect prediction still shows both colours.
        _contour(ax, plane(ref_mask), REFERENCE_COLOR, linewidth=2.8)
        _contour(ax, plane(pred_mask), PREDICTION_COLOR, linewidth=1.3)
        n_error = int(np.sum(ref_mask[_slice_of(axis, index)] ^ pred_mask[_slice_of(axis, index)]))
        ax.set_title(f"{names[axis]}, slice {index + 1}/{ref_mask.shape[axis]}\n{n_error} voxels wrong",
                     fontsize="small")
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [Line2D([], [], color=REFERENCE_COLOR, linewidth=2.8, label="reference"),
               Line2D([], [], color=PREDICTION_COLOR, linewidth=1.3, label="prediction")]
    fig.legend(handles=handles, loc="lower center", ncol=2, frameon=False, fontsize="small")
    note = "" if image is not None else " (no image: contours on black)"
    fig.suptitle(caption + note, fontsize="medium")
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return buffer.getvalue()


def choose_cases(rows: Sequence[Mapping[str, Any]], label: int) -> list[tuple[str, Mapping[str, Any]]]:
    """The best, median and worst case of class ``label`` by Dice, as ``(role, row)`` pairs.

    Only cases with something to draw (reference or prediction non-empty) take part. Ranking:
    Dice, then HD95 (undefined counts as worst), then the case id. With fewer than three such
    cases each is shown once (roles ``best``/``worst``, or ``only``).

    Examples
    --------
    >>> rows = [{"case": c, "class": 1, "dice": d, "hd95": 1.0, "n_ref": 5, "n_pred": 5}
    ...         for c, d in [("a", 0.9), ("b", 0.5), ("c", 0.7), ("d", 0.8)]]
    >>> [(role, row["case"]) for role, row in choose_cases(rows, 1)]
    [('best', 'a'), ('median', 'c'), ('worst', 'b')]
    """
    candidates = [r for r in rows if int(r["class"]) == int(label)
                  and (float(r.get("n_ref", 1)) > 0 or float(r.get("n_pred", 1)) > 0)]

    def badness(row):  # ascending = worse first
        hd95 = float(row.get("hd95", math.nan))
        return (float(row["dice"]), -(math.inf if math.isnan(hd95) else hd95), str(row["case"]))

    ranked = sorted(candidates, key=badness)
    if not ranked:
        return []
    if len(ranked) == 1:
        return [("only", ranked[0])]
    if len(ranked) == 2:
        return [("best", ranked[1]), ("worst", ranked[0])]
    return [("best", ranked[-1]), ("median", ranked[(len(ranked) - 1) // 2]), ("worst", ranked[0])]


# --- helpers ---------------------------------------------------------------------------------


def _axis_codes(affine: np.ndarray) -> tuple[str, ...]:
    import nibabel as nib

    return tuple(nib.aff2axcodes(np.asarray(affine, dtype=np.float64)))


def _view_axes(axis: int, codes: Sequence[str] | None) -> tuple[int, int]:
    """(vertical, horizontal) array axes of the view across ``axis``: superior, else anterior, up."""
    others = [b for b in range(3) if b != axis]
    if codes is not None:
        for wanted in ("SI", "AP"):
            for b in others:
                if codes[b] in wanted:
                    return b, next(o for o in others if o != b)
    return others[1], others[0]


def _slice_of(axis: int, index: int) -> tuple[slice | int, ...]:
    return tuple(index if b == axis else slice(None) for b in range(3))


def _contour(ax, mask2d: np.ndarray, color: str, *, linewidth: float) -> None:
    if not mask2d.any():
        return
    # A zero border closes contours of masks that reach the edge of the view.
    padded = np.pad(mask2d.astype(np.float32), 1)
    rows, cols = padded.shape
    ax.contour(np.arange(-1, cols - 1), np.arange(-1, rows - 1), padded, levels=[0.5],
               colors=[color], linewidths=linewidth)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    return plt
