"""File I/O shared by every stage: NIfTI volumes with their geometry, and atomic writes.

Everything the pipeline writes (checkpoints, caches, predictions, tables) goes through a
temporary file in the destination folder followed by ``os.replace``, so a crash leaves either
the old file or the new one, never a half-written file that a later run would trust. The file is
flushed to disk (``fsync``) before the rename and its folder after it, so this holds after a power
loss too: without the first flush a journaling file system may commit the rename before the data,
leaving an empty file under the final name; without the second the rename itself may be lost.
Folders written whole and then renamed into place (a checkpoint, a bundle) use
:func:`durable_replace`.
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import multiprocessing
import os
import re
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import nibabel as nib
import numpy as np

from segpipe.errors import Received, StorageError, expected

NIFTI_SUFFIXES = (".nii.gz", ".nii")
# Errors that mean "this disk or folder cannot take the file" (full, over quota, read-only, not ours,
# a file where a folder should be), as opposed to a bug.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR})


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


MAX_VOXELS = 2**31
"""Most voxels (all channels) a scan may claim: 8 GiB as float32, far above any CT or MRI volume, far
below what a hostile header can claim. :func:`read_nifti` refuses more before allocating anything;
pass ``max_voxels=`` (or set ``segpipe.io.MAX_VOXELS``) for larger scans."""
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
        Most voxels allowed. Defaults to :data:`MAX_VOXELS` (read at call time).

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
    segpipe.io.ScanSizeError: .../a.nii: Expected at most 10 voxels ... Received: header=shape (4, 4, 4) float32: 64 voxels, 256 bytes (file: 608 bytes).
    """  # noqa: E501 (the doctest's expected exception line above)
    limit = MAX_VOXELS if max_voxels is None else max_voxels
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


def _bytes_text(n: int | None) -> str:
    """``77 bytes``, ``381.5 MiB (400000000 bytes)``; ``missing`` for None."""
    if n is None:
        return "missing"
    unit, scale = next(((u, s) for u, s in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)) if n >= s), ("", 1))
    return f"{n / scale:.1f} {unit} ({n} bytes)" if unit else f"{n} bytes"


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


_UMASK = os.umask(0o022)  # read once (os.umask can only read by setting), then restored
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``.

    The temporary name keeps the final suffix (``.nii.gz``, ``.npy``, ``.keras``) because several
    writers choose their format from it, and holds the writer's process id, so that
    :func:`remove_orphaned_temporaries` can tell a killed write from one under way. On error the
    temporary file is removed.
    """
    path = Path(path)
    durable_mkdir(path.parent)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.{os.getpid()}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if tmp.is_file():  # mkstemp makes it 0600; give it the mode an ordinary write would (umask)
            os.chmod(tmp, 0o666 & ~_UMASK)
        # The writer (nibabel, np.save, model.save, savefig ...) has closed the file: flush it, so the
        # rename never reaches the disk before the data does.
        fsync_file(tmp)
        failpoint("atomic_write", path)
        os.replace(tmp, path)
        fsync_directory(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a file's data and metadata to disk (``os.fsync``).

    Parameters
    ----------
    path : str or os.PathLike
        An existing, closed (or at least flushed) file.

    Raises
    ------
    OSError
        The file cannot be opened or the disk reports a write error (``EIO``, ``ENOSPC``): the data
        may not be on disk, so the caller must not rename it into place.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.NamedTemporaryFile() as f:
    ...     _ = f.write(b"data"); f.flush(); fsync_file(f.name)
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except PermissionError:  # a file we may write but not read (a umask of 0o2xx): fsync works on either
        fd = os.open(path, os.O_WRONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_directory(path: str | os.PathLike) -> None:
    """Flush a folder's entries (names created, renamed or removed in it) to disk.

    A no-op where the platform cannot open folders (Windows), where this process may write into the
    folder but not read it (it cannot be opened), or where the file system does not flush folders
    (``EINVAL``/``EBADF`` from ``fsync``, e.g. some network file systems): there is nothing more
    this process can do, and the write itself has succeeded.

    Parameters
    ----------
    path : str or os.PathLike
        An existing folder.

    Raises
    ------
    OSError
        The folder does not exist, or the disk reports a write error (``EIO``).

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     fsync_directory(folder)
    """
    flag = getattr(os, "O_DIRECTORY", None)
    if flag is None:
        return
    try:
        fd = os.open(path, os.O_RDONLY | flag)
    except PermissionError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)


def durable_mkdir(path: str | os.PathLike) -> Path:
    """Create a folder and its missing parents (``mkdir -p``), each recorded on disk in its parent.

    Without flushing the parent, a file written durably into a new folder can still vanish with the
    folder after a power loss. Existing folders cost nothing. Returns ``path``.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     durable_mkdir(Path(folder, "a", "b")).is_dir()
    True
    """
    path = Path(path)
    missing = [p for p in (path, *path.parents) if not p.exists()]  # deepest first
    path.mkdir(parents=True, exist_ok=True)
    for folder in reversed(missing):
        fsync_directory(folder.parent)
    return path


def fsync_tree(path: str | os.PathLike) -> None:
    """Flush a file, or a folder and everything in it (files first, then each folder), to disk.

    Symbolic links are not followed (their targets are not part of the tree).

    Parameters
    ----------
    path : str or os.PathLike
        An existing file or folder.

    Raises
    ------
    OSError
        As :func:`fsync_file` and :func:`fsync_directory`.
    """
    path = Path(path)
    if not path.is_dir() or path.is_symlink():
        if not path.is_symlink():
            fsync_file(path)
        return
    for folder, _, files in os.walk(path, topdown=False):  # children before the folder naming them
        for name in files:
            if not os.path.islink(os.path.join(folder, name)):
                fsync_file(os.path.join(folder, name))
        fsync_directory(folder)


def durable_replace(src: str | os.PathLike, dst: str | os.PathLike, *, flushed: bool = False) -> None:
    """``os.replace(src, dst)`` that survives a power loss: ``src`` (a file, or a folder tree: every file
    and folder in it) is flushed to disk first, then renamed, then the folder of ``dst`` is flushed
    (and that of ``src``, before and after, where it differs).

    Parameters
    ----------
    src : str or os.PathLike
        The finished file or folder (typically a temporary beside ``dst``).
    dst : str or os.PathLike
        Its final name; an existing file (or empty folder) there is replaced atomically.
    flushed : bool, optional
        ``src`` is on disk already (the caller ran :func:`fsync_tree` on it, and nothing changed it
        since): skip flushing it again. Default False.

    Raises
    ------
    OSError
        From ``os.replace`` or a flush; ``dst`` is then either unchanged or the new ``src``.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     tmp = Path(folder, ".result.tmp"); _ = tmp.write_text("done")
    ...     durable_replace(tmp, Path(folder, "result.txt"))
    ...     print(Path(folder, "result.txt").read_text())
    done
    """
    src, dst = Path(src), Path(dst)
    if not flushed:
        fsync_tree(src)
    other_folder = src.parent.resolve() != dst.parent.resolve()
    if other_folder:
        fsync_directory(src.parent)
    os.replace(src, dst)
    fsync_directory(dst.parent)
    if other_folder:
        fsync_directory(src.parent)


# ".<stem>.<pid>.<8 random characters of mkstemp>.tmp<suffix>" (atomic_path); the stem may hold dots.
_TEMPORARY_NAME = re.compile(r"^\..*\.(?P<pid>\d+)\.[a-z0-9_]{8}\.tmp(\.|$)")


def remove_orphaned_temporaries(folder: str | os.PathLike, *, recursive: bool = False) -> list[Path]:
    """Delete the temporary files of :func:`atomic_path` writes whose process no longer runs.

    A SIGKILL between writing a temporary file and renaming it leaves the file behind; nothing ever
    reads it (only the final name is read), so this is for the disk space. Files of processes that
    still run (another writer into the same folder) are kept. Returns the paths removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in folder.rglob(".*.tmp*") if recursive else folder.glob(".*.tmp*"):
        match = _TEMPORARY_NAME.match(path.name)
        if match is None or not path.is_file() or process_alive(int(match["pid"])):
            continue
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
    return removed


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (someone else's counts)."""
    if pid <= 0:  # 0 and negative ids would address process groups
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def explain_write_errors(path: str | os.PathLike) -> Iterator[None]:
    """Turn a full disk, a quota or a read-only folder while writing ``path`` into a :class:`StorageError`
    that names ``path``; other errors pass unchanged.

    Used around :func:`atomic_path` writes, so the message can promise what the rename guarantees:
    nothing half-written is left, and an earlier version of the file is unchanged.
    """
    try:
        yield
    except StorageError:
        raise
    except OSError as exc:
        if exc.errno not in STORAGE_ERRNOS:
            raise
        raise StorageError(expected(
            "free space and a writable folder for this file", key="path",
            received=Received(f"{path} ({exc.strerror or exc})"),
            hint="Nothing was half-written: an earlier version of the file, if any, is unchanged.",
        )) from exc


# ---------------------------------------------------------------- fault injection (testing hook)

# SEGPIPE_FAILPOINT=NAME[@TEXT][#N]: SIGKILL the program the N-th time (default 1) this process reaches
# failpoint NAME with a path containing TEXT. Read once at import; unset (always, outside the
# fault-injection tests: tests/test_fault_injection.py, benchmarks/fault_injection.py) it costs one
# comparison per call. Points: "atomic_write" (the temporary file is complete, not yet renamed onto
# its path) and, in segpipe.training.checkpoints, "checkpoint_written" (last.tmp/ complete and
# flushed), "checkpoint_swap" (last/ renamed to last.old/, last.tmp/ not yet renamed to last/) and
# "checkpoint_swapped" (the new last/ in place, last.old/ not yet removed).
_FAILPOINT = os.environ.get("SEGPIPE_FAILPOINT") or None
_failpoint_hits = 0


def failpoint(name: str, path: str | os.PathLike = "") -> None:
    """Kill the program here with SIGKILL if ``SEGPIPE_FAILPOINT`` names this point (see above).

    In a worker process of :func:`segpipe.parallel.parallel_map` the parent is killed first, so the
    whole program dies as it would on a real SIGKILL of its main process.
    """
    if _FAILPOINT is None:
        return
    global _failpoint_hits
    spec, _, count = _FAILPOINT.partition("#")
    point, _, text = spec.partition("@")
    if point != name or text not in str(path):
        return
    _failpoint_hits += 1
    if _failpoint_hits == int(count or 1):
        parent = multiprocessing.parent_process()
        if parent is not None and parent.pid is not None:
            os.kill(parent.pid, signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)


def write_nifti(path: str | os.PathLike, array: np.ndarray, affine: np.ndarray, *, dtype: Any = None) -> None:
    """Write ``array`` with ``affine`` as NIfTI, atomically. The dtype of ``array`` is kept, or ``dtype``
    (float data into an integer type is stored scaled: nibabel sets the header's slope and intercept).

    Raises:
        StorageError: the disk is full or the folder read-only (names ``path``; nothing half-written).
    """
    image = nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=np.float64))
    image.header.set_data_dtype(np.asarray(array).dtype if dtype is None else dtype)
    with explain_write_errors(path), atomic_path(path) as tmp:
        nib.save(image, str(tmp))


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    write_text(path, json.dumps(data, indent=2, default=_json_default) + "\n")


def json_safe(value: Any) -> Any:
    """``value`` with NaN and inf as None (strict JSON has no such numbers), numpy scalars as Python
    numbers and mapping keys as strings; for reports read by other tools."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


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


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file; a parse error names the file and the position."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(expected("valid JSON", key="contents", received=Received(f"invalid JSON ({exc})"),
                                  where=str(path))) from exc


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """Save a ``.npy`` array atomically.

    Raises:
        StorageError: the disk is full or the folder read-only (names ``path``; nothing half-written).
    """
    with explain_write_errors(path), atomic_path(path) as tmp:
        np.save(tmp, array)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(expected("a JSON-serialisable value (number, string, list, mapping, numpy value or path)",
                             key="value", received=Received(f"an object of type {type(value).__name__}")))
