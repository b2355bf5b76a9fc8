"""Ownership markers: segpipe deletes or replaces only folders it created.

A folder segpipe creates to own (a run directory, a bundle) gets a small marker file,
``.segpipe``::

    {"kind": "run", "created": "2026-01-05T10:22:03+00:00", "segpipe": "0.1.0"}

``train.py --overwrite`` and ``predict.py export --overwrite`` delete a folder only if it holds the
marker of their kind (:func:`remove_owned`); any other folder of that name (someone's notes, a run
of another kind, a folder of an older segpipe) is refused with an error naming the folder and what
is in it, before any work starts. No TensorFlow here.
"""
from __future__ import annotations

import datetime
import os
import shutil
from pathlib import Path

from segpipe import __version__
from segpipe.errors import Received, expected
from segpipe.io import read_json, write_json

MARKER_NAME = ".segpipe"
KINDS = ("run", "bundle", "ensemble")
_SHOWN_ENTRIES = 5


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(expected(f"one of {list(KINDS)}", key="kind", received=kind))


def write_marker(folder: str | os.PathLike, kind: str) -> None:
    """Mark ``folder`` (created if needed) as segpipe's own folder of ``kind`` (atomically).

    Parameters
    ----------
    folder : path
        The folder segpipe has just created.
    kind : {"run", "bundle"}
        What it is; :func:`check_replaceable` of another kind refuses it.

    Examples
    --------
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp()) / "run"
    >>> write_marker(folder, "run")
    >>> has_marker(folder, "run"), has_marker(folder, "bundle")
    (True, False)
    """
    _check_kind(kind)
    write_json(Path(folder) / MARKER_NAME, {
        "kind": kind, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "segpipe": __version__,
    })


def has_marker(folder: str | os.PathLike, kind: str) -> bool:
    """Whether ``folder`` holds segpipe's marker of ``kind`` (a marker file that is a symlink, unreadable
    or of another kind does not count)."""
    _check_kind(kind)
    marker = Path(folder) / MARKER_NAME
    if marker.is_symlink() or not marker.is_file():
        return False
    try:
        data = read_json(marker)
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("kind") == kind


def check_replaceable(folder: str | os.PathLike, kind: str, *, key: str) -> None:
    """Nothing if ``folder`` does not exist or holds segpipe's marker of ``kind``; else an error.

    Parameters
    ----------
    folder : path
        The folder a command would delete or replace.
    kind : {"run", "bundle"}
        The marker it must hold.
    key : str
        The option that asked for the deletion (``--overwrite``), named in the message.

    Raises
    ------
    FileExistsError
        ``folder`` exists (as a folder, file or link) without the marker; the message names it, its
        first entries and their count.
    """
    _check_kind(kind)
    folder = Path(folder)
    if not (folder.exists() or folder.is_symlink()):
        return
    if folder.is_dir() and not folder.is_symlink() and has_marker(folder, kind):
        return
    raise FileExistsError(expected(
        f"a folder segpipe created (with its {kind} marker {MARKER_NAME}) to delete and write anew", key=key,
        received=Received(f"{folder} ({_describe(folder)})"),
        hint="segpipe only deletes folders it created: delete it by hand or choose another name.",
    ))


def remove_owned(folder: str | os.PathLike, kind: str, *, key: str) -> None:
    """Delete ``folder`` if it is segpipe's folder of ``kind`` (:func:`check_replaceable`); nothing if it
    does not exist.

    Raises
    ------
    FileExistsError
        ``folder`` is not segpipe's (nothing is deleted).
    """
    check_replaceable(folder, kind, key=key)
    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)


def _describe(folder: Path) -> str:
    """``holds 3 entries: a.txt, b/, notes.md`` / ``a file`` / ``a symbolic link`` / ``empty``."""
    if folder.is_symlink():
        return "a symbolic link"
    if not folder.is_dir():
        return "a file, not a folder"
    entries = sorted(folder.iterdir(), key=lambda p: p.name)
    if not entries:
        return "an empty folder without the marker"
    shown = ", ".join(p.name + ("/" if p.is_dir() else "") for p in entries[:_SHOWN_ENTRIES])
    more = ", ..." if len(entries) > _SHOWN_ENTRIES else ""
    return f"holds {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}: {shown}{more}"
