"""PLACEHOLDER until branch `locks` lands (helper writes the real module with this API)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from segpipe.errors import Received, expected

MARKER_NAME = ".segpipe"


def write_marker(folder: Path, kind: str) -> None:
    Path(folder, MARKER_NAME).write_text(json.dumps({"kind": kind}))


def has_marker(folder: Path, kind: str) -> bool:
    try:
        return json.loads(Path(folder, MARKER_NAME).read_text()).get("kind") == kind
    except (OSError, ValueError):
        return False


def check_replaceable(folder: Path, kind: str, *, key: str) -> None:
    folder = Path(folder)
    if folder.exists() and not has_marker(folder, kind):
        names = sorted(p.name for p in folder.iterdir())[:5]
        raise FileExistsError(expected(f"a {kind} folder segpipe wrote", key=key, received=Received(f"{folder} ({names})")))


def remove_owned(folder: Path, kind: str, *, key: str) -> None:
    check_replaceable(folder, kind, key=key)
    shutil.rmtree(folder, ignore_errors=True)
