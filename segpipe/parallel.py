"""``[fn(job) for job in jobs]`` over processes, with a progress bar: the one parallel map of segpipe
(integrity check, fingerprint, preprocessing cache, folder evaluation)."""
from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Sequence

from tqdm.auto import tqdm


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def parallel_map(fn: Callable[[Any], Any], jobs: Sequence[Any], *, workers: int | None = 1, progress: bool = False,
                 desc: str = "", unit: str = "case") -> list[Any]:
    """``[fn(job) for job in jobs]`` in ``workers`` processes (when more than one), in job order.

    Parameters
    ----------
    fn : callable
        A module-level function (it is pickled into the workers).
    jobs : sequence
        One argument of ``fn`` per job.
    workers : int or None
        Processes; None: :func:`available_cores`. 1 runs in this process.
    progress, desc, unit
        A tqdm progress bar over the jobs.

    Processes are spawned, not forked: the caller may already run TensorFlow threads, which a fork
    can deadlock. An exception in a job is raised here (the others are cancelled).

    Examples
    --------
    >>> parallel_map(abs, [-1, 2, -3])
    [1, 2, 3]
    """
    workers = available_cores() if workers is None else int(workers)
    bar = tqdm(total=len(jobs), desc=desc, disable=not progress or not jobs, unit=unit)
    try:
        if workers <= 1 or len(jobs) <= 1:
            results = []
            for job in jobs:
                results.append(fn(job))
                bar.update()
            return results
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=context) as pool:
            results = []
            for result in pool.map(fn, jobs, chunksize=max(1, len(jobs) // (8 * workers))):
                results.append(result)
                bar.update()
            return results
    finally:
        bar.close()
