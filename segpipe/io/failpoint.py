"""The fault-injection hook of the crash tests: :func:`failpoint` kills the program at a named point."""
from __future__ import annotations

import multiprocessing
import os
import signal

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
