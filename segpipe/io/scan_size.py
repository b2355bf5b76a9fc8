"""Bounds on what a NIfTI header may claim, checked before nibabel allocates memory for the voxels.

The limit on voxels is the documented setting ``segpipe.io.MAX_VOXELS`` (defined in
:mod:`segpipe.io`, read at call time, so setting it there takes effect).
"""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from segpipe.errors import Received, expected

DEFLATE_MAX_RATIO = 1032
"""deflate's largest compression ratio (258-byte matches in about 2 bits each): a gzip file of n bytes
never holds more than 1032·n bytes, so a ``.nii.gz`` that claims more is refused before reading."""


class ScanSizeError(ValueError):
    """A scan's header claims more voxels than allowed, or than its file can hold.

    ``what`` and ``received`` are the two halves of the message (for :mod:`segpipe.data.checks`).
    """

    def __init__(self, path: str | os.PathLike, what: str, received: str):
        self.path, self.what, self.received = Path(path), what, received
        super().__init__(expected(what, key="header", received=Received(received), where=str(path)))


def check_scan_size(path: str | os.PathLike, image: Any, *, max_voxels: int | None = None) -> None:
    """Refuse a loaded (header-only) NIfTI image whose claimed size is absurd, before its voxels are read.

    nibabel reads the header on ``nib.load`` and allocates the whole claimed array on the first data
    access, before it finds out that the file is short: a 77-byte ``.nii.gz`` can make it allocate
    hundreds of MiB. This checks the claim (shape x bytes per voxel) against ``max_voxels`` and
    against what the file can hold: an uncompressed file at least its data offset plus the data
    bytes, a gzip file at most :data:`DEFLATE_MAX_RATIO` times its size.

    Parameters
    ----------
    path : str or os.PathLike
        The file (named in the error).
    image : nibabel image
        ``nib.load(path)``; its voxel data not yet read.
    max_voxels : int, optional
        Most voxels allowed. Defaults to ``segpipe.io.MAX_VOXELS`` (read at call time).

    Raises
    ------
    ScanSizeError
        The claim is over ``max_voxels`` or more than the file can hold; names the file, the claimed
        shape, dtype and bytes, and the file's size.

    Examples
    --------
    >>> import nibabel as nib, tempfile
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = Path(folder, "a.nii")
    ...     nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), path)
    ...     check_scan_size(path, nib.load(path))  # fine
    ...     check_scan_size(path, nib.load(path), max_voxels=10)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    segpipe.io.scan_size.ScanSizeError: .../a.nii: Expected at most 10 voxels ... 64 voxels, 256 bytes ...
    """
    limit = configured_max_voxels() if max_voxels is None else max_voxels
    proxy = image.dataobj
    shape = tuple(int(n) for n in getattr(proxy, "shape", image.shape))
    dtype = np.dtype(getattr(proxy, "dtype", image.get_data_dtype()))
    voxels = math.prod(shape)
    data_bytes = voxels * dtype.itemsize
    file_like = getattr(proxy, "file_like", None)  # the data file's name (``.img`` of a pair)
    data_file = Path(file_like) if isinstance(file_like, (str, os.PathLike)) else Path(path)
    offset = int(getattr(proxy, "offset", 0) or 0)
    size = data_file.stat().st_size if data_file.is_file() else None
    claim = f"shape {shape} {dtype}: {voxels} voxels, {_bytes_text(data_bytes)}"
    on_disk = f"file: {_bytes_text(size)}" if data_file == Path(path) else f"data file {data_file}: {_bytes_text(size)}"
    if voxels > limit:
        raise ScanSizeError(path, f"at most {limit} voxels (segpipe.io.MAX_VOXELS; raise it with max_voxels=)",
                            f"{claim} ({on_disk})")
    if size is None:
        return  # nibabel names a missing data file itself
    suffix = data_file.name.lower()
    if suffix.endswith(".gz"):
        if offset + data_bytes > DEFLATE_MAX_RATIO * size:
            raise ScanSizeError(path, f"a gzip file that can hold the voxels its header claims (at most "
                                f"{DEFLATE_MAX_RATIO}x its size)", f"{claim} ({on_disk})")
    elif not suffix.endswith((".bz2", ".zst")) and size < offset + data_bytes:
        raise ScanSizeError(path, f"a file that holds the voxels its header claims (at least data offset {offset} + "
                            f"{data_bytes} data bytes)", f"{claim} ({on_disk})")


def configured_max_voxels() -> int:
    """``segpipe.io.MAX_VOXELS`` as it is set now: the package holds the documented setting, so a caller that
    sets it there (``segpipe.io.MAX_VOXELS = ...``) changes every later check.

    Returns
    -------
    int
        Most voxels a scan may claim.
    """
    return sys.modules[__package__].MAX_VOXELS


def _bytes_text(n: int | None) -> str:
    """``77 bytes``, ``381.5 MiB (400000000 bytes)``; ``missing`` for None."""
    if n is None:
        return "missing"
    unit, scale = next(((u, s) for u, s in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)) if n >= s), ("", 1))
    return f"{n / scale:.1f} {unit} ({n} bytes)" if unit else f"{n} bytes"
