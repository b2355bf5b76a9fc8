"""Atomic and durable writes: a temporary file beside the destination, flushed, then renamed into place.

Everything the pipeline writes (checkpoints, caches, predictions, tables) goes through a
temporary file in the destination folder followed by ``os.replace``, so a crash leaves either
the old file or the new one, never a half-written file that a later run would trust. The file is
flushed to disk (``fsync``) before the rename and its folder after it, so this holds after a power
loss too: without the first flush a journaling file system may commit the rename before the data,
leaving an empty file under the final name; without the second the rename itself may be lost.
Folders written whole and then renamed into place (a checkpoint, a bundle) use
:func:`durable_replace`. Also here: removing the temporaries of killed writers
(:func:`remove_orphaned_temporaries`) and naming the file of a full disk (:func:`explain_write_errors`).
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
from pathlib import Path
from typing import Iterator

from segpipe.errors import Received, StorageError, expected
from segpipe.io.failpoint import failpoint

# Errors that mean "this disk or folder cannot take the file" (full, over quota, read-only, not ours,
# a file where a folder should be), as opposed to a bug.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR})


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
