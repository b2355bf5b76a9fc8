"""A folder's file manifest: every file with its size and SHA-256, and the check of a received folder against it.

The writer of a bundle records :func:`file_manifest` in ``bundle.json``; the reader calls
:func:`check_manifest` before any file is loaded. The check refuses, naming the file:

- a symbolic link anywhere in the folder (a link can point outside it), and anything that is not a
  plain file or folder (a FIFO would block a reader, a device would be read forever);
- a manifest path that is absolute, holds ``..`` or is not in normal form;
- a listed file that is missing, of another size, or of another SHA-256 (sizes are compared before
  any byte is hashed);
- a file the manifest does not list (except ``bundle.json`` and segpipe's ``.segpipe`` marker),
  and a file with an executable bit (nothing in a bundle is meant to run).

The manifest protects against damage and against a sender who edits a file but not
``bundle.json``; it is no signature: whoever sends a folder can rewrite both. What a loaded file may
do is decided per format (:mod:`segpipe.inference.runtimes`).

Examples
--------
>>> import tempfile
>>> folder = Path(tempfile.mkdtemp())
>>> _ = (folder / "weights.bin").write_bytes(b"0123")
>>> file_manifest(folder)["weights.bin"]["bytes"]
4
>>> check_manifest(folder, file_manifest(folder))
"""
from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path, PurePosixPath
from typing import Any, Mapping

from segpipe.errors import Received, expected

UNLISTED = frozenset({"bundle.json", ".segpipe"})  # written around the manifest, checked on their own
MAX_FILES = 10_000
_CHUNK = 2**20


class IntegrityError(ValueError):
    """A folder that does not match its manifest; the message names the file."""


def file_manifest(folder: str | os.PathLike, *, skip: frozenset[str] = UNLISTED) -> dict[str, dict[str, Any]]:
    """``{relative POSIX path: {"bytes": size, "sha256": hex digest}}`` of every file below ``folder``.

    Parameters
    ----------
    folder
        The folder (links and special files are refused as by :func:`check_manifest`).
    skip
        Top-level names left out (the manifest's own file and the marker).

    Returns
    -------
    dict
        Sorted by path.
    """
    folder = Path(folder)
    return {name: {"bytes": path.stat().st_size, "sha256": sha256(path)}
            for name, path in sorted(_walk(folder).items()) if name not in skip}


def check_manifest(folder: str | os.PathLike, manifest: Mapping[str, Any], *,
                   where: str | None = None, skip: frozenset[str] = UNLISTED) -> None:
    """Refuse ``folder`` unless its files are exactly those of ``manifest``, unchanged (see the module).

    Parameters
    ----------
    folder
        The received folder.
    manifest
        What :func:`file_manifest` returned when the folder was written.
    where
        The file the manifest came from, for messages (default ``FOLDER/bundle.json``).
    skip
        Top-level names that may exist without an entry.

    Raises
    ------
    IntegrityError
        Naming the file and what is wrong with it.
    """
    folder = Path(folder)
    where = where or str(folder / "bundle.json")
    if not isinstance(manifest, Mapping) or len(manifest) > MAX_FILES:
        raise IntegrityError(expected(f"a mapping of at most {MAX_FILES} files -> {{bytes, sha256}}", key="manifest",
                                      received=Received(type(manifest).__name__), where=where))
    for name, entry in manifest.items():
        _check_entry(name, entry, where)
    found = _walk(folder)
    for name, path in found.items():
        if name in skip:
            continue
        if name not in manifest:
            raise IntegrityError(expected("only the files the manifest lists", key="manifest", where=where,
                                          received=Received(f"{path} (an extra file)")))
        if path.stat().st_mode & (stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH):
            raise IntegrityError(expected("no executable file", key=f"manifest.{name}", where=where,
                                          received=Received(f"{path} (executable)")))
    for name, entry in manifest.items():
        path = found.get(name)
        if path is None:
            raise IntegrityError(expected("every file the manifest lists", key=f"manifest.{name}", where=where,
                                          received=Received(f"{folder / name} (missing; incomplete bundle?)")))
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise IntegrityError(expected(f"{entry['bytes']} bytes", key=f"manifest.{name}", where=where,
                                          received=Received(f"{path} ({size} bytes: changed since it was written)")))
        if sha256(path) != entry["sha256"]:
            raise IntegrityError(expected(f"SHA-256 {entry['sha256']}", key=f"manifest.{name}", where=where,
                                          received=Received(f"{path} (other contents: changed since it was written)")))


def sha256(path: str | os.PathLike) -> str:
    """The hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _walk(folder: Path) -> dict[str, Path]:
    """Every plain file below ``folder`` by relative POSIX path; a link or special file is an error."""
    if folder.is_symlink():
        raise IntegrityError(expected("a folder, not a symbolic link", key="bundle", received=Received(str(folder))))
    files: dict[str, Path] = {}
    for root, dirs, names in os.walk(folder, followlinks=False):
        for name in [*dirs, *names]:
            path = Path(root) / name
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                raise IntegrityError(expected("no symbolic link in the folder (a link can point outside it)",
                                              key="files", received=Received(f"{path} -> {os.readlink(path)}")))
            if stat.S_ISREG(mode):
                files[path.relative_to(folder).as_posix()] = path
            elif not stat.S_ISDIR(mode):
                raise IntegrityError(expected("plain files and folders only", key="files",
                                              received=Received(f"{path} (a special file)")))
        if len(files) > MAX_FILES:
            raise IntegrityError(expected(f"at most {MAX_FILES} files", key="files",
                                          received=Received(f"more in {folder}")))
    return files


def _check_entry(name: Any, entry: Any, where: str) -> None:
    posix = PurePosixPath(name) if isinstance(name, str) else None
    if (posix is None or not name or posix.is_absolute() or ".." in posix.parts or str(posix) != name
            or "\\" in name or "\0" in name):
        raise IntegrityError(expected("relative paths inside the folder, in normal form", key="manifest",
                                      received=name, where=where))
    if (not isinstance(entry, Mapping) or isinstance(entry.get("bytes"), bool)
            or not isinstance(entry.get("bytes"), int) or entry["bytes"] < 0
            or not isinstance(entry.get("sha256"), str) or len(entry["sha256"]) != 64):
        raise IntegrityError(expected("{bytes: size, sha256: 64 hex digits}", key=f"manifest.{name}",
                                      received=entry, where=where))
