"""File I/O shared by every stage: NIfTI volumes with their geometry, and atomic writes.

Everything the pipeline writes (checkpoints, caches, predictions, tables) goes through a temporary
file in the destination folder, flushed and renamed into place, so a crash or a power loss leaves
either the old file or the new one, never a half-written file that a later run would trust.

This package's names are the public API (``from segpipe.io import write_json``); each lives in the
module that owns it:

=====================  ===========================================================================
:mod:`.durable`        atomic and durable writes (``atomic_path``, ``durable_replace``,
                       ``durable_mkdir``, ``fsync_*``), orphaned temporaries, full-disk errors
:mod:`.failpoint`      the fault-injection hook of the crash tests (``SEGPIPE_FAILPOINT``)
:mod:`.files`          JSON (NaN-safe), text and ``.npy`` files
:mod:`.nifti`          NIfTI read and write with the affine (``Volume``), affine checks
:mod:`.scan_size`      what a NIfTI header may claim (``check_scan_size``, ``ScanSizeError``)
=====================  ===========================================================================
"""
from __future__ import annotations

from segpipe.io.durable import (
    STORAGE_ERRNOS,
    atomic_path,
    durable_mkdir,
    durable_replace,
    explain_write_errors,
    fsync_directory,
    fsync_file,
    fsync_tree,
    process_alive,
    remove_orphaned_temporaries,
)
from segpipe.io.failpoint import failpoint
from segpipe.io.files import json_safe, read_json, save_npy, write_json, write_text
from segpipe.io.nifti import (
    NIFTI_SUFFIXES,
    Volume,
    affine_problem,
    affine_text,
    read_nifti,
    strip_nifti_suffix,
    write_nifti,
)
from segpipe.io.scan_size import DEFLATE_MAX_RATIO, ScanSizeError, check_scan_size

MAX_VOXELS = 2**31
"""Most voxels (all channels) a scan may claim: 8 GiB as float32, far above any CT or MRI volume, far
below what a hostile header can claim. :func:`read_nifti` refuses more before allocating anything;
pass ``max_voxels=`` (or set ``segpipe.io.MAX_VOXELS``, read at call time by
:func:`segpipe.io.scan_size.check_scan_size`) for larger scans."""

__all__ = [
    "DEFLATE_MAX_RATIO", "MAX_VOXELS", "NIFTI_SUFFIXES", "STORAGE_ERRNOS", "ScanSizeError", "Volume",
    "affine_problem", "affine_text", "atomic_path", "check_scan_size", "durable_mkdir", "durable_replace",
    "explain_write_errors", "failpoint", "fsync_directory", "fsync_file", "fsync_tree", "json_safe",
    "process_alive", "read_json", "read_nifti", "remove_orphaned_temporaries", "save_npy",
    "strip_nifti_suffix", "write_json", "write_nifti", "write_text",
]
