"""NIfTI volumes with their geometry: read (the header's size claim bounded first), written atomically.

Also the checks and one-line text of a voxel-to-world affine (:func:`affine_problem`, :func:`affine_text`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from segpipe.errors import Received, expected
from segpipe.io.durable import atomic_path, explain_write_errors
from segpipe.io.scan_size import check_scan_size

NIFTI_SUFFIXES = (".nii.gz", ".nii")


@dataclass
class Volume:
    """A NIfTI volume and the geometry needed to write a result back into its space."""

    array: np.ndarray
    affine: np.ndarray

    @property
    def spacing_mm(self) -> tuple[float, ...]:
        """Voxel size along the first three array axes, from the affine's column norms."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))


def strip_nifti_suffix(name: str) -> str:
    """``case_001.nii.gz`` -> ``case_001``; names without a NIfTI suffix are returned unchanged."""
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def read_nifti(path: str | os.PathLike, *, dtype: Any = None, max_voxels: int | None = None) -> Volume:
    """Read a NIfTI file (``.nii`` or ``.nii.gz``) into an array with its affine.

    The header's size claim is checked (:func:`check_scan_size`) before any memory is allocated for
    the voxels.

    Parameters
    ----------
    path : str or os.PathLike
        The file.
    dtype : numpy dtype, optional
        Cast the voxels to this type. A cast to a narrower float type refuses finite values that would
        overflow it (a float64 scan with values beyond float32's range would otherwise read as inf).
    max_voxels : int, optional
        Most voxels the header may claim; defaults to :data:`MAX_VOXELS`.

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    ScanSizeError
        The header claims more voxels than ``max_voxels`` or than the file can hold (names the file).
    ValueError
        The file is not a readable NIfTI image, or values overflow ``dtype`` (names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(expected("an existing NIfTI file", key="path", received=str(path)))
    try:
        image = nib.load(str(path))  # the header only
    except Exception as exc:  # nibabel raises several types for corrupt files
        raise ValueError(expected("a readable NIfTI image", key="contents", received=Received(f"unreadable ({exc})"),
                                  where=str(path))) from exc
    check_scan_size(path, image, max_voxels=max_voxels)
    try:
        array = np.asarray(image.dataobj)
    except Exception as exc:
        raise ValueError(expected("a readable NIfTI image", key="contents", received=Received(f"unreadable ({exc})"),
                                  where=str(path))) from exc
    if dtype is not None:
        array = _cast(array, np.dtype(dtype), path)
    return Volume(array=array, affine=np.asarray(image.affine, dtype=np.float64))


def _cast(array: np.ndarray, dtype: np.dtype, path: Path) -> np.ndarray:
    """``array`` as ``dtype``; a ValueError naming ``path`` when finite values overflow a narrower float type."""
    if not (np.issubdtype(dtype, np.floating) and np.issubdtype(array.dtype, np.floating)
            and np.finfo(array.dtype).max > np.finfo(dtype).max):
        return array.astype(dtype, copy=False)
    with np.errstate(over="ignore", invalid="ignore"):
        cast = array.astype(dtype)
    infinite = np.isinf(cast)
    if not infinite.any():  # the common case: one boolean pass
        return cast
    overflow = infinite & np.isfinite(array)
    count = int(np.count_nonzero(overflow))
    if count:
        largest = float(np.max(np.abs(array[overflow])))
        raise ValueError(expected(
            f"values within {dtype}'s range (|x| <= {float(np.finfo(dtype).max):.3g})", key="values",
            received=Received(f"{count} finite {array.dtype} voxel(s) beyond it (largest |x| {largest:.3g})"),
            where=str(path)))
    return cast


def write_nifti(path: str | os.PathLike, array: np.ndarray, affine: np.ndarray, *, dtype: Any = None) -> None:
    """Write ``array`` with ``affine`` as NIfTI, atomically. The dtype of ``array`` is kept, or ``dtype``
    (float data into an integer type is stored scaled: nibabel sets the header's slope and intercept).

    Raises
    ------
    StorageError
        the disk is full or the folder read-only (names ``path``; nothing half-written).
    """
    image = nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=np.float64))
    image.header.set_data_dtype(np.asarray(array).dtype if dtype is None else dtype)
    with explain_write_errors(path), atomic_path(path) as tmp:
        nib.save(image, str(tmp))


def affine_text(affine: np.ndarray) -> str:
    """The top three rows of a 4x4 affine on one line (for error messages)."""
    return np.array2string(np.asarray(affine)[:3], precision=4, suppress_small=True, separator=",").replace("\n", "")


def affine_problem(affine: np.ndarray) -> str | None:
    """What is wrong with a voxel-to-world affine (non-finite entries, singular), or None.

    Examples
    --------
    >>> affine_problem(np.eye(4)) is None
    True
    >>> affine_problem(np.diag([1.0, 0.0, 1.0, 1.0]))
    'affine [[1.,0.,0.,0.], [0.,0.,0.,0.], [0.,0.,1.,0.]] (singular: determinant 0, voxel sizes [1.0, 0.0, 1.0] mm)'
    """
    affine = np.asarray(affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)):
        return f"affine {affine_text(affine)} (NaN/inf entries)"
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    det = float(np.linalg.det(affine[:3, :3]))
    # relative to the voxel sizes, so sub-millimetre voxels are not "nearly singular"
    if spacing.min() <= 0 or abs(det) <= 1e-6 * float(np.prod(spacing)):
        sizes = [round(float(s), 4) for s in spacing]
        return f"affine {affine_text(affine)} (singular: determinant {abs(det):.3g}, voxel sizes {sizes} mm)"
    return None
