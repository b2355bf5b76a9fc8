"""On-disk cache of preprocessed cases: ``CACHE_DIR/<case_id>/{image,label,locations}.npy + meta.json``.

A cached case is trusted only if its ``meta.json`` exists, carries the key computed now from the
preprocessing settings and the source files (path, size and modification time, or a content hash),
and its arrays open with the shapes and dtypes the meta records. Every file is written atomically
(temporary file + rename, :mod:`segpipe.io`); a case is rebuilt by first deleting its meta and
writing the meta last, so an interrupted run can leave stale or temporary files behind but never a
case that passes the check with the wrong arrays.

One process builds a case: it holds the entry's lock (``CACHE_DIR/.<case_id>.lock``,
:mod:`segpipe.locks`) while it looks again and builds. Two trainings on one dataset build each case
once: the second waits for the lock (a bounded poll, :data:`ENTRY_WAIT_SECONDS`) and then reads the
finished case. A rebuild removes only the temporary files of writers that no longer run.

Arrays: image (X, Y, Z, C) float32, label (X, Y, Z) uint8, locations (N, 4) int32
``[class, x, y, z]`` (see :func:`segpipe.data.sampling.class_locations`). Arrays are opened with
memory mapping, so many large cases cost no RAM until patches are read.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from segpipe.arrays import seed_from_text
from segpipe.data.layouts import Case, Dataset
from segpipe.data.preprocess import PreprocessSettings, preprocess_case
from segpipe.data.sampling import class_locations, pack_locations, unpack_locations
from segpipe.errors import Received, StorageError, expected
from segpipe.io import explain_write_errors, read_json, remove_orphaned_temporaries, save_npy, write_json
from segpipe.locks import hold
from segpipe.parallel import parallel_map

CACHE_VERSION = 1  # bump when the cached format or the preprocessing code changes meaning
_ARRAYS = {"image": (np.float32, 4), "label": (np.uint8, 3), "locations": (np.int32, 2)}
# How long a process waits for another that is building the same case (a dead builder's lock is taken
# over at the next look, at most a second later); longer than any one case takes to preprocess.
ENTRY_WAIT_SECONDS = 3600.0


@dataclass
class CachedCase:
    """A preprocessed case in the cache; arrays are opened on demand (memory-mapped by default).

    Each array is memory-mapped once and the map kept (it holds no file descriptor): the loader's
    threads then only read pages, never a ``.npy`` header, which numpy parses with
    ``ast.literal_eval``; on CPython 3.11 that can fail in a thread while the main thread traces a
    graph ("SystemError: AST constructor recursion depth mismatch"). The sampler and the validation
    data open their cases in the thread that builds them (:func:`segpipe.data.sampling.open_cases`).
    """

    case_id: str
    directory: Path
    meta: dict[str, Any]
    _locations: dict[int, np.ndarray] | None = field(default=None, repr=False, compare=False)
    _maps: dict[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    def path(self, name: str) -> Path:
        return self.directory / f"{name}.npy"

    def load_image(self, *, mmap: bool = True) -> np.ndarray:
        """Image (X, Y, Z, C) float32."""
        return self._map("image") if mmap else np.load(self.path("image"))

    def load_label(self, *, mmap: bool = True) -> np.ndarray:
        """Label map (X, Y, Z) uint8."""
        return self._map("label") if mmap else np.load(self.path("label"))

    @property
    def locations(self) -> dict[int, np.ndarray]:
        """Stored foreground voxel indices per class (read once, then kept: they are small)."""
        if self._locations is None:
            self._locations = unpack_locations(np.load(self.path("locations")))
        return self._locations

    def _map(self, name: str) -> np.ndarray:
        if name not in self._maps:
            self._maps[name] = np.load(self.path(name), mmap_mode="r")
        return self._maps[name]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": {}}  # a pickled map would carry its whole array


def build_cache(
    dataset: Dataset,
    cache_dir: str | os.PathLike,
    settings: PreprocessSettings,
    *,
    workers: int = 1,
    progress: bool = True,
    hash_contents: bool = False,
    max_locations_per_class: int = 10_000,
) -> list[CachedCase]:
    """Preprocess every case of ``dataset`` into ``cache_dir``, reusing cases whose key still matches.

    Parameters
    ----------
    dataset
        the dataset (every case needs a label).
    cache_dir
        the cache folder for this dataset (created if needed).
    settings
        the preprocessing settings; any change re-preprocesses every case.
    workers
        processes preprocessing in parallel. Defaults to 1 (in this process).
    progress
        show a progress bar over the cases being (re)built.
    hash_contents
        key source files by a SHA-256 of their content instead of size and mtime.
    max_locations_per_class
        foreground voxel locations stored per class for sampling.

    Returns
    -------
    list[CachedCase]
        The cached cases, in the dataset's order.

    Raises
    ------
    ValueError
        cases that failed to preprocess, all listed at once.
    StorageError
        the disk filled up or the folder is read-only (names the file; the cases cached
        before stay valid, the one being written is rebuilt next time).
    """
    cache_dir = Path(cache_dir)
    with explain_write_errors(cache_dir / "settings.json"):
        cache_dir.mkdir(parents=True, exist_ok=True)
        write_json(cache_dir / "settings.json", {"cache_version": CACHE_VERSION, "settings": settings.to_dict(),
                                                 "dataset": str(dataset.root)})  # for people; never trusted
    extra = {"max_locations_per_class": max_locations_per_class}
    cached: dict[str, CachedCase] = {}
    jobs = []
    for case in dataset.cases:
        if case.label_path is None:
            raise ValueError(expected("a label for every case to cache", key=f"cases[{case.case_id!r}].label_path",
                                      received=None))
        key = case_key(case, settings, hash_contents=hash_contents, extra=extra)
        directory = cache_dir / case.case_id
        found = load_cached_case(directory, key=key)
        if found is not None:
            cached[case.case_id] = found
        else:
            jobs.append((case, settings, directory, key, max_locations_per_class))
    results = parallel_map(_build_case_job, jobs, workers=workers, progress=progress, desc="preprocessing")
    failures = [f"{job[0].case_id}: {result}" for job, result in zip(jobs, results) if isinstance(result, str)]
    if failures:
        raise ValueError(expected("every case to preprocess", key="cases", received=Received(f"{len(failures)} failed"))
                         + "\n  " + "\n  ".join(failures))
    for result in results:
        cached[result.case_id] = result
    return [cached[case.case_id] for case in dataset.cases]


def load_cached_case(directory: str | os.PathLike, *, key: str | None = None) -> CachedCase | None:
    """The cached case in ``directory`` if it is complete (and has ``key``, when given), else ``None``."""
    directory = Path(directory)
    try:
        meta = read_json(directory / "meta.json")
    except (OSError, ValueError):
        return None
    if meta.get("cache_version") != CACHE_VERSION or (key is not None and meta.get("key") != key):
        return None
    maps = {}
    for name, (dtype, ndim) in _ARRAYS.items():
        try:
            array = np.load(directory / f"{name}.npy", mmap_mode="r")  # reads the header only
        except (OSError, ValueError):
            return None
        if array.dtype != dtype or array.ndim != ndim or list(array.shape) != meta.get("arrays", {}).get(name):
            return None
        maps[name] = array
    # the checked image and label maps are the case's (the locations are read whole when first needed)
    return CachedCase(case_id=meta["case_id"], directory=directory, meta=meta,
                      _maps={"image": maps["image"], "label": maps["label"]})


def case_key(
    case: Case, settings: PreprocessSettings, *, hash_contents: bool = False, extra: dict[str, Any] | None = None
) -> str:
    """Hex digest over the cache version, settings, ``extra`` and each source file's identity."""
    files = []
    for path in (*case.image_paths, case.label_path):
        path = Path(path).resolve()
        stat = path.stat()
        identity: list[Any] = [str(path), stat.st_size]
        identity.append(_file_sha256(path) if hash_contents else stat.st_mtime_ns)
        files.append(identity)
    blob = json.dumps({"version": CACHE_VERSION, "case_id": case.case_id, "settings": settings.to_dict(),
                       "extra": extra or {}, "files": files}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


# ----------------------------------------------------------------------------------------------


def _build_case_job(job: tuple) -> CachedCase | str:
    """Build one case (unless another process has built it meanwhile: one builder at a time, under the
    entry's lock); returns the error message instead of raising, so all failures are reported."""
    case, settings, directory, key, max_locations = job
    directory = Path(directory)
    try:
        with hold(directory, what="cache entry", wait_seconds=ENTRY_WAIT_SECONDS):
            found = load_cached_case(directory, key=key)  # built by the process that held the lock
            return found if found is not None else _build_case(case, settings, directory, key, max_locations)
    except StorageError:  # a full or read-only disk is no fault of this case: stop at once, naming the file
        raise
    except Exception as exc:  # noqa: BLE001 - reported with the case id by build_cache
        return f"{type(exc).__name__}: {exc}"


def _build_case(case: Case, settings: PreprocessSettings, directory: Path, key: str, max_locations: int) -> CachedCase:
    with explain_write_errors(directory):
        directory.mkdir(parents=True, exist_ok=True)
        # Invalidate first: from here until the new meta lands, the case is never trusted.
        (directory / "meta.json").unlink(missing_ok=True)
        remove_orphaned_temporaries(directory)  # of an interrupted earlier run (never a live writer's)
    result = preprocess_case(case, settings)
    # A seed from the case id, so the stored subsample is the same on every machine and run.
    seed = seed_from_text(case.case_id)
    locations = pack_locations(class_locations(result.label, max_per_class=max_locations, seed=seed))
    arrays = {"image": result.image, "label": result.label, "locations": locations}
    for name, array in arrays.items():
        save_npy(directory / f"{name}.npy", array)  # a full disk: StorageError naming the file
    meta = dict(result.meta)
    meta.update(
        case_id=case.case_id,
        cache_version=CACHE_VERSION,
        key=key,
        source={"images": [str(p) for p in case.image_paths], "label": str(case.label_path)},
        arrays={name: list(array.shape) for name, array in arrays.items()},
        class_voxels={str(k): int(np.count_nonzero(result.label == k)) for k in np.unique(result.label)},
    )
    with explain_write_errors(directory / "meta.json"):
        write_json(directory / "meta.json", meta)  # last: its presence marks the case complete
    return CachedCase(case_id=case.case_id, directory=directory, meta=meta)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
