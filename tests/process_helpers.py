"""Subprocess helpers for the distribution and crash tests: bounded in time, children always killed."""
from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

REPO = Path(__file__).resolve().parent.parent
TRAIN = REPO / "train.py"


def shared_cache_dir(tmp_path_factory) -> Path:
    """One data cache for every tiny run of the session (same phantoms, same preprocessing), so only
    the first run preprocesses and subprocesses start training sooner."""
    return tmp_path_factory.getbasetemp() / "shared-data-cache"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tf_config(ports: list[int], index: int) -> str:
    """TF_CONFIG of worker ``index`` in a cluster of local workers."""
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    return json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})


def start(args: list[str], log: Path, **env: str) -> subprocess.Popen:
    """Start ``python ARGS`` in its own process group, output to ``log``."""
    environ = {**os.environ, "PYTHONPATH": str(REPO), **env}
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, *args], stdout=out, stderr=subprocess.STDOUT, env=environ,
                                cwd=REPO, start_new_session=True)


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL the process group of ``proc`` if it still runs."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@contextlib.contextmanager
def running(*procs: subprocess.Popen) -> Iterator[tuple[subprocess.Popen, ...]]:
    """Kill every process on the way out, whatever happened."""
    try:
        yield procs
    finally:
        for proc in procs:
            kill(proc)


def wait_until(condition: Callable[[], bool], timeout: float, what: str,
               procs: tuple[subprocess.Popen, ...] = ()) -> None:
    """Poll ``condition`` every 20 ms; fail after ``timeout`` seconds or if a process exits first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"Timed out after {timeout:.0f} s waiting for {what}")
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"Process exited with {proc.returncode} before {what}")
        time.sleep(0.02)


def checkpoint_state(run_dir: Path) -> dict | None:
    """``checkpoints/last/state.json`` of a run, or None while there is none."""
    path = run_dir / "checkpoints" / "last" / "state.json"
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def read_history(run_dir: Path) -> list[dict]:
    with open(run_dir / "history.csv") as f:
        return list(csv.DictReader(f))


def assert_same_history(a: list[dict], b: list[dict], rel: float = 1e-5, abs_: float = 1e-6) -> None:
    """Same epochs, same columns, every value within a tight tolerance."""
    import pytest

    assert [r["epoch"] for r in a] == [r["epoch"] for r in b]
    for row_a, row_b in zip(a, b):
        assert row_a.keys() == row_b.keys()
        for key in row_a:
            assert float(row_a[key]) == pytest.approx(float(row_b[key]), rel=rel, abs=abs_), (row_a["epoch"], key)
