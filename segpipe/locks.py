"""One writer per folder: a lock file beside the folder, naming the process that holds it.

A run directory, a cache entry and a run's evaluation each have one writer at a time. The writer
holds ``<parent>/.<name>.lock`` (beside the folder, so deleting or replacing the folder keeps its
lock), a small JSON file with the holder's process id, host, start time and command::

    {"pid": 4242, "host": "gpu-3", "since": "2026-01-05T10:22:03+00:00", "command": "train.py ...",
     "start_ticks": "123456", "token": "9f2c..."}

The lock is created with ``O_CREAT | O_EXCL``, so of two processes exactly one gets it. A second
process either stops at once with an error naming the holder (:func:`hold` with ``wait_seconds=0``:
a second ``train.py`` or ``evaluate.py``) or waits for it with a bounded poll (a cache entry another
process is building). A lock of a process that no longer runs on this host is stale (a SIGKILL, a
power loss) and taken over with a printed message; a lock of another host is never taken over (its
process cannot be checked from here). The holder removes its lock when it leaves the ``with`` block,
also on an exception or a stop signal turned into one.

No TensorFlow here.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import secrets
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from segpipe.errors import Received, expected
from segpipe.io import explain_write_errors, process_alive

LOCK_SUFFIX = ".lock"
_UNREADABLE_GRACE_S = 5.0  # a lock file stays empty only between its creation and its first write


class LockHeldError(FileExistsError):
    """Another process holds the lock of a folder (the message names it: pid, host, since, command)."""


@dataclass(frozen=True)
class Holder:
    """Who holds a lock: process id, host, start time (ISO 8601) and command line."""

    pid: int
    host: str
    since: str
    command: str = ""
    start_ticks: str | None = None
    token: str = ""

    def describe(self) -> str:
        """``process 4242 on host gpu-3 since 2026-01-05T10:22:03+00:00 (train.py ...)``."""
        shown = self.command if len(self.command) <= 120 else self.command[:117] + "..."  # a long --set list
        command = f" ({shown})" if shown else ""
        return f"process {self.pid} on host {self.host} since {self.since}{command}"

    def is_stale(self) -> bool:
        """Whether the holder is known to be gone: a process of this host that no longer runs (or whose
        id now belongs to a process started later). A holder of another host is never stale."""
        if self.host != socket.gethostname():
            return False
        if not process_alive(self.pid):
            return True
        ticks = _start_ticks(self.pid)
        return self.start_ticks is not None and ticks is not None and ticks != self.start_ticks


def lock_file(folder: str | os.PathLike) -> Path:
    """The lock of ``folder``: ``<parent>/.<name>.lock``.

    Examples
    --------
    >>> lock_file("runs/default")
    PosixPath('runs/.default.lock')
    """
    folder = Path(folder)
    return folder.with_name(f".{folder.name}{LOCK_SUFFIX}")


def read_holder(path: str | os.PathLike) -> Holder | None:
    """The holder recorded in the lock file ``path``; None if there is no such file or it is not
    (yet) readable."""
    try:
        data = json.loads(Path(path).read_text())
        return Holder(pid=int(data["pid"]), host=str(data["host"]), since=str(data["since"]),
                      command=str(data.get("command", "")), start_ticks=data.get("start_ticks"),
                      token=str(data.get("token", "")))
    except (OSError, ValueError, KeyError, TypeError):
        return None


@contextlib.contextmanager
def hold(folder: str | os.PathLike, *, what: str, wait_seconds: float = 0.0,
         poll_seconds: float = 1.0) -> Iterator[Holder]:
    """Hold the lock of ``folder`` for the ``with`` block; yields this process's :class:`Holder`.

    Parameters
    ----------
    folder : path
        The folder one writer at a time may write (it need not exist; its parent is created).
    what : str
        What the folder is, for messages ("run directory", "cache entry", "evaluation folder").
    wait_seconds : float
        0 (default): if a live process holds the lock, raise at once. Otherwise wait up to this long
        for it, polling (every 0.05 s at first, at most every ``poll_seconds``).
    poll_seconds : float
        The longest pause between two looks at a held lock.

    Raises
    ------
    LockHeldError
        Another live process (or one on another host) holds the lock (after ``wait_seconds``).
    StorageError
        The lock file cannot be written (read-only or full disk, a file where its folder should be).

    Examples
    --------
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp()) / "run"
    >>> with hold(folder, what="run directory") as me:
    ...     lock_file(folder).is_file(), me.pid == os.getpid()
    (True, True)
    >>> lock_file(folder).exists()
    False
    """
    path = lock_file(folder)
    with explain_write_errors(path):  # a read-only or full disk: one error naming the lock file
        me = _acquire(path, Path(folder), what=what, wait_seconds=wait_seconds, poll_seconds=poll_seconds)
    try:
        yield me
    finally:
        _release(path, me)


def _acquire(path: Path, folder: Path, *, what: str, wait_seconds: float, poll_seconds: float) -> Holder:
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_seconds
    pause = 0.05
    announced = False
    while True:
        me = Holder(pid=os.getpid(), host=socket.gethostname(),
                    since=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    command=" ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else "",
                    start_ticks=_start_ticks(os.getpid()), token=secrets.token_hex(8))
        if _create(path, me):
            return me
        holder = read_holder(path)
        if holder is None:  # created this instant and not yet written, or damaged
            if _age_seconds(path) > _UNREADABLE_GRACE_S and _take_over(path, None, folder, what):
                continue
        elif holder.is_stale():
            _take_over(path, holder, folder, what)
            continue
        if time.monotonic() >= deadline:
            shown = holder.describe() if holder is not None else "a process whose lock file cannot be read"
            raise LockHeldError(expected(f"a {what} no other process is writing", key=what.replace(" ", "_"),
                                         received=Received(f"{folder} (locked by {shown}; lock file {path})"),
                                         hint=_held_hint(path, what, holder, waited=wait_seconds)))
        if not announced and holder is not None:
            print(f"Waiting for {holder.describe()}, which is writing the {what} {folder} ...", file=sys.stderr,
                  flush=True)
            announced = True
        time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
        pause = min(pause * 2, poll_seconds)


def _create(path: Path, me: Holder) -> bool:
    """Create the lock file with ``me`` in it, atomically; False if it exists."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump({"pid": me.pid, "host": me.host, "since": me.since, "command": me.command,
                   "start_ticks": me.start_ticks, "token": me.token}, f)
        f.flush()
        os.fsync(f.fileno())
    return True


def _take_over(path: Path, stale: Holder | None, folder: Path, what: str) -> bool:
    """Remove the stale lock ``path`` if it still holds ``stale``; True if it was removed.

    Two processes may find the same stale lock: a guard file (``O_EXCL`` too) lets one of them
    look again and remove it, so neither removes the lock the other has just created.
    """
    guard = path.with_name(path.name + ".takeover")
    try:
        fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        with contextlib.suppress(OSError, ValueError):  # a guard of a process that died in these few lines
            if not process_alive(int(guard.read_text() or "0")) and _age_seconds(guard) > _UNREADABLE_GRACE_S:
                guard.unlink()
        time.sleep(0.01)
        return False
    try:
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        if read_holder(path) != stale:
            return False  # someone else took it over meanwhile: look again
        path.unlink(missing_ok=True)
    finally:
        guard.unlink(missing_ok=True)
    gone = (f"{stale.describe()}, which no longer runs" if stale is not None
            else "an unreadable lock file")
    print(f"Taking over the lock of the {what} {folder} from {gone} ({path}).", file=sys.stderr, flush=True)
    return True


def _release(path: Path, me: Holder) -> None:
    """Remove the lock if it is still ours (a takeover by mistake must not remove another's lock)."""
    holder = read_holder(path)
    if holder is not None and holder.token == me.token:
        path.unlink(missing_ok=True)


def _held_hint(path: Path, what: str, holder: Holder | None, *, waited: float) -> str:
    other_host = holder is not None and holder.host != socket.gethostname()
    return (f"Only one process writes a {what} at a time: wait for it to finish or stop it"
            + (f" (it runs on another host; if it is gone, delete {path} by hand)." if other_host else ".")
            + (f" Waited {waited:g} s." if waited > 0 else ""))


def _age_seconds(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def _start_ticks(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, /proc on Linux), or None where unknown;
    tells a reused process id from the holder's."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()  # after the command name, which may hold spaces
    return fields[19] if len(fields) > 19 else None
