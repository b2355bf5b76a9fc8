"""Dataset integrity check: every problem of every case, listed at once, before any training.

:func:`check_dataset` reads each case (or only the NIfTI headers with ``read_data=False``) and
returns a list of :class:`Problem`; an empty list means the dataset is clean. Each problem names
the file, what was expected and what was received, so one pass over the output fixes the dataset.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import nibabel as nib
import numpy as np

from segpipe.data.layouts import Case, Dataset, squeeze_trailing, squeeze_trailing_shape
from segpipe.io import ScanSizeError, affine_problem, affine_text, check_scan_size
from segpipe.parallel import parallel_map

# Problem kinds, each with the severity it is reported with.
KINDS = {
    "missing-file": "error",  # an image channel file that does not exist
    "unreadable": "error",  # not a readable NIfTI file (corrupt, truncated, wrong format)
    "size-claim": "error",  # a header claiming more voxels than segpipe.io.MAX_VOXELS or than its file holds
    "missing-label": "error",  # image without label
    "orphan-label": "error",  # label without image
    "duplicate-case": "error",  # two cases with the same id
    "no-cases": "error",  # the layout finds no case at all
    "dimensions": "error",  # image not 3-D/4-D, label not 3-D
    "empty-axis": "error",  # an axis of 0 voxels
    "bad-affine": "error",  # a singular affine (a voxel size of 0) or one with NaN/inf entries
    "channel-count": "error",  # number of channels differs from the declared (or usual) one
    "channel-shape": "error",  # channel files of one case disagree in shape
    "channel-affine": "error",  # channel files of one case disagree in geometry
    "shape-mismatch": "error",  # image and label shapes differ
    "affine-mismatch": "error",  # image and label geometry differ beyond the tolerance
    "non-finite": "error",  # NaN or inf intensities, or finite values beyond float32's range (read as inf)
    "non-integer-label": "error",  # fractional, NaN or inf label values
    "undeclared-label": "error",  # label values outside the declared classes
    # from the per-case label values (check_labels; the fingerprint has them, no file is read again)
    "rare-label": "warning",  # a declared label value present in only a few cases
    "label-gaps": "warning",  # label values that are not 0..N-1: unused network outputs
    "absent-class": "warning",  # a declared class that occurs in no case
}
RARE_FRACTION = 0.1  # "a few cases": at most 10 % of them (at least 1), in datasets of >= 10 cases
MIN_CASES_FOR_RARE = 10


@dataclass(frozen=True)
class Problem:
    """One problem in one file: what was expected and what was received."""

    kind: str
    path: Path | None
    expected: str
    received: str
    case_id: str | None = None

    @property
    def severity(self) -> str:
        return KINDS[self.kind]

    def format(self, root: Path | None = None) -> str:
        """One line: ``ERROR [kind] file: Expected ... Received: ...`` (path relative to ``root``)."""
        where = "-"
        if self.path is not None:
            where = str(self.path)
            if root is not None:
                try:
                    where = str(Path(self.path).resolve().relative_to(Path(root).resolve()))
                except ValueError:
                    pass
        return f"{self.severity.upper()} [{self.kind}] {where}: Expected {self.expected}. Received: {self.received}"

    def __str__(self) -> str:
        return self.format()


def check_dataset(
    dataset: Dataset,
    *,
    read_data: bool = True,
    affine_tolerance_mm: float = 1e-3,
    workers: int = 1,
    progress: bool = False,
    label_checks: bool = False,
) -> list[Problem]:
    """Check every case of ``dataset`` and return all problems found (empty when clean).

    Parameters
    ----------
    dataset
        the dataset, as read by :func:`segpipe.data.layouts.load_dataset`.
    read_data
        read the voxels too (label values, NaN/inf, corrupt data). ``False`` checks
        only what the headers say (existence, shapes, geometry, channels): the fast pre-training
        check.
    affine_tolerance_mm
        largest absolute difference allowed between the affines of an image
        and its label (or between channel files). Defaults to 1e-3 mm.
    workers
        processes reading cases in parallel. Defaults to 1 (in this process).
    progress
        show a progress bar.
    label_checks
        also run :func:`check_labels` (what planning runs on the fingerprint: a value in
        only a few cases, gaps, absent classes) on the label values read here; needs ``read_data``.
        A file already named ``undeclared-label`` by the per-file check is not named twice.
        ``data_prep/check_dataset.py`` sets it; training leaves it to the fingerprint.
    """
    problems: list[Problem] = _check_not_empty(dataset)
    declared = dataset.declared_values  # the classes and the ignore label
    seen: dict[str, Case] = {}
    for case in dataset.cases:
        if case.case_id in seen:
            problems.append(Problem(
                "duplicate-case", case.image_paths[0], f"one case per id ({seen[case.case_id].image_paths[0]} has the same id)",
                f"a second case {case.case_id!r}", case.case_id))
        seen[case.case_id] = case
    for path in dataset.orphan_labels:
        problems.append(Problem("orphan-label", path, "an image for every label file", "a label with no image"))

    jobs = [(case, declared, read_data, affine_tolerance_mm) for case in dataset.cases]
    results = parallel_map(_check_case_job, jobs, workers=workers, progress=progress, desc="checking")
    channel_counts, class_voxels = {}, {}
    for case, (case_problems, channels, voxels) in zip(dataset.cases, results):
        problems.extend(case_problems)
        if channels is not None:
            channel_counts[case.case_id] = channels
        if voxels is not None:
            class_voxels[case.case_id] = voxels
    problems.extend(_check_channel_counts(dataset, channel_counts))
    if label_checks and read_data:
        named = {(p.kind, p.path) for p in problems}
        problems.extend(p for p in check_labels(dataset, class_voxels) if (p.kind, p.path) not in named)
    return problems


def check_labels(
    dataset: Dataset, class_voxels: Mapping[str, Mapping[Any, int]], *, declared: bool | None = None,
) -> list[Problem]:
    """Label-value problems across the dataset, from each case's voxel count per label value.

    ``class_voxels``: case id -> {label value: voxels} (the fingerprint's ``cases[id]["class_voxels"]``).
    ``declared``: whether the dataset declares its classes (dataset.json, labels.json); default: all
    layouts but ``folders`` without ``labels.json``, whose classes were read from the maps themselves.

    * ``undeclared-label`` (error): a value the dataset does not declare, naming each file and in how
      many cases it occurs — e.g. one map with 7 in a dataset whose other maps hold 0–2. With
      classes read from the maps, a value in only a few cases counts as undeclared (declare it in
      labels.json if it is real).
    * ``rare-label`` (warning): a declared value in only a few cases (at most 10 %, datasets of >= 10).
    * ``label-gaps`` (warning): values that are not 0..N-1 (the network gets unused outputs).
    * ``absent-class`` (warning): a declared class that occurs in no case.
    """
    if declared is None:
        declared = not (dataset.layout == "folders" and not (Path(dataset.root) / "labels.json").is_file())
    by_id = {c.case_id: c for c in dataset.cases}
    present: dict[int, list[str]] = {}
    for case_id, counts in class_voxels.items():
        for value, voxels in counts.items():
            if int(voxels) > 0:
                present.setdefault(int(value), []).append(case_id)
    n = len(class_voxels)
    few = max(1, int(RARE_FRACTION * n)) if n >= MIN_CASES_FOR_RARE else 0
    declared_values = dataset.declared_values if declared else set()
    problems: list[Problem] = []
    meta = Path(dataset.root) / ("labels.json" if dataset.layout == "folders" else "dataset.json")
    for value, cases in sorted(present.items()):
        if value == 0 or value == dataset.ignore_label:  # the ignore label is no class: any count is fine
            continue
        where = f"{len(cases)} of {n} cases"
        if declared and value not in declared_values:
            for case_id in cases:
                problems.append(Problem("undeclared-label", by_id[case_id].label_path if case_id in by_id else None,
                                        f"label values declared in {meta.name} ({sorted(declared_values)})",
                                        f"value {value} (in {where})", case_id))
        elif len(cases) <= few:
            kind = "rare-label" if declared else "undeclared-label"
            hint = "check these maps" if declared else "add labels.json to declare it if it is a real class"
            for case_id in cases:
                problems.append(Problem(kind, by_id[case_id].label_path if case_id in by_id else None,
                                        f"every label value in more than {few} of {n} cases ({hint})",
                                        f"value {value} only in {where}", case_id))
    values = sorted((set(present) | declared_values | {0}) - {dataset.ignore_label})
    if values != list(range(len(values))):
        missing = sorted(set(range(values[-1] + 1)) - set(values))
        problems.append(Problem("label-gaps", meta if declared else Path(dataset.root),
                                f"label values 0..{len(values) - 1} (one network output each)",
                                f"values {values}: {missing} never occur, {len(missing)} of {values[-1] + 1} outputs unused"))
    for value in sorted(declared_values - set(present) - {0, dataset.ignore_label}):
        problems.append(Problem("absent-class", meta, "every declared class in at least one case",
                                f"class {value} ({dataset.labels[value]!r}) in none of {n} cases"))
    return problems


def check_scans(
    cases: Iterable[Case], *, input_channels: int, channel_names: Iterable[str] = (), read_data: bool = True,
    affine_tolerance_mm: float = 1e-3,
) -> list[Problem]:
    """The problems of scans to segment (cases without labels), e.g. ``predict.py --input``.

    Each image file must be a readable 3-D or 4-D NIfTI image with at least one voxel along every
    axis, an invertible affine, finite intensities (``read_data``), channel files that agree, and
    ``input_channels`` channels in all (the model's). Returns every problem found (empty when clean).
    """
    names = list(channel_names)
    what = f"{input_channels} channel(s){f' {names}' if names else ''} (the model's input)"
    problems: list[Problem] = []
    for case in cases:
        found: list[Problem] = []

        def add(kind: str, path: Path | None, expected: str, received: str) -> None:
            found.append(Problem(kind, path, expected, received, case.case_id))

        channels, reference = _check_images(case, read_data, affine_tolerance_mm, add)
        if reference is not None and not found and channels != input_channels:
            add("channel-count", case.image_paths[0], what,
                f"{channels} channel(s) in {', '.join(Path(p).name for p in case.image_paths)}")
        problems += found
    return problems


def errors(problems: Iterable[Problem]) -> list[Problem]:
    """The problems that must stop training."""
    return [p for p in problems if p.severity == "error"]


# ----------------------------------------------------------------------------------------------


def _check_case_job(job: tuple) -> tuple[list[Problem], int | None, dict[int, int] | None]:
    return _check_case(*job)


def _check_case(case: Case, declared: set[int], read_data: bool,
                tol: float) -> tuple[list[Problem], int | None, dict[int, int] | None]:
    """The problems of one case, its channel count (None if its images are unusable) and its voxels per
    label value (None unless the label map was read and holds integer values)."""
    problems: list[Problem] = []

    def add(kind: str, path: Path | None, expected: str, received: str) -> None:
        problems.append(Problem(kind, path, expected, received, case.case_id))

    channels, reference = _check_images(case, read_data, tol, add)
    image_ok = reference is not None and not problems
    voxels = _check_label(case, declared, read_data, tol, reference, add)
    return problems, channels if image_ok else None, voxels


def _check_images(case: Case, read_data: bool, tol: float, add) -> tuple[int, tuple | None]:
    """Image channels: existence, readability, dimensions, agreement with each other, finite values.

    Returns the channel count and ``(shape, affine, path)`` of the first readable channel (None if none).
    """
    channels = 0
    reference = None
    for path in case.image_paths:
        if not Path(path).is_file():
            add("missing-file", path, "an image file", "no such file")
            continue
        loaded = _load(path, read_data)
        if isinstance(loaded, ScanSizeError):
            add("size-claim", path, loaded.what, loaded.received)
            continue
        if isinstance(loaded, str):
            add("unreadable", path, "a readable NIfTI image", loaded)
            continue
        shape, affine, array = loaded
        if not _grid_ok(path, shape, affine, add):
            continue
        if len(shape) not in (3, 4):
            add("dimensions", path, "a 3-D image (X, Y, Z) or 4-D (X, Y, Z, C)", f"shape {shape}")
            continue
        channels += 1 if len(shape) == 3 else shape[3]
        if reference is None:
            reference = (shape[:3], affine, path)
        elif shape[:3] != reference[0]:
            add("channel-shape", path, f"shape {reference[0]} as {Path(reference[2]).name}", f"shape {shape[:3]}")
        elif not _close(affine, reference[1], tol):
            add("channel-affine", path, f"the affine of {Path(reference[2]).name} (tolerance {tol} mm)",
                f"max difference {np.abs(affine - reference[1]).max():.3g}")
        if array is not None and np.issubdtype(array.dtype, np.floating):
            bad = _non_finite_as_float32(array)
            if bad:
                add("non-finite", path, "finite intensities", bad)
    return channels, reference


def _check_label(case: Case, declared: set[int], read_data: bool, tol: float, reference: tuple | None,
                 add) -> dict[int, int] | None:
    """Label: existence, readability, dimensions, geometry against the image, values.

    Returns the voxels per label value (None when the values were not read or are not integers).
    """
    label = case.label_path
    if label is None or not Path(label).is_file():
        add("missing-label", label if label is not None else case.image_paths[0],
            f"a label map{'' if label is None else ' at this path'}", "no such file")
        return
    loaded = _load(label, read_data)
    if isinstance(loaded, ScanSizeError):
        add("size-claim", label, loaded.what, loaded.received)
        return
    if isinstance(loaded, str):
        add("unreadable", label, "a readable NIfTI label map", loaded)
        return
    shape, affine, array = loaded
    if not _grid_ok(label, shape, affine, add):
        return
    if len(shape) != 3:
        add("dimensions", label, "a 3-D label map (X, Y, Z)", f"shape {shape}")
    elif reference is not None:
        ref_shape, ref_affine, _ = reference
        if shape != ref_shape:
            add("shape-mismatch", label, f"the image shape {ref_shape}", f"shape {shape}")
        elif not _close(affine, ref_affine, tol):
            add("affine-mismatch", label, f"the image affine (tolerance {tol} mm)",
                f"max difference {np.abs(affine - ref_affine).max():.3g} mm "
                f"(image {affine_text(ref_affine)}, label {affine_text(affine)})")
    if array is None:
        return
    if not np.issubdtype(array.dtype, np.integer):
        finite = np.isfinite(array)
        fractional = ~finite | (array != np.round(np.where(finite, array, 0)))
        count = int(np.count_nonzero(fractional))
        if count:
            examples = sorted({str(v) for v in array[fractional][:1000].tolist()})[:5]
            add("non-integer-label", label, "integer label values",
                f"{count} voxels with values like {', '.join(examples)} (dtype {array.dtype})")
            return
    found, counts = np.unique(array, return_counts=True)
    voxels = {int(v): int(n) for v, n in zip(found, counts)}
    outside = set(voxels) - declared
    if outside:
        add("undeclared-label", label, f"values among the declared classes {sorted(declared)}",
            f"values {sorted(voxels)} (undeclared: {sorted(outside)})")
    return voxels


def _load(path: Path, read_data: bool) -> tuple[tuple[int, ...], np.ndarray, np.ndarray | None] | ScanSizeError | str:
    """Shape (trailing singletons squeezed), affine and optionally voxels; a message if unreadable, the
    :class:`ScanSizeError` if the header claims more than allowed or than the file holds (checked
    before any voxel is read, also without ``read_data``)."""
    try:
        image = nib.load(str(path))
        check_scan_size(path, image)
        shape = tuple(int(s) for s in image.shape)
        affine = np.asarray(image.affine, dtype=np.float64)
        array = None
        if read_data:
            array = squeeze_trailing(np.asanyarray(image.dataobj))
            shape = array.shape
        else:
            shape = squeeze_trailing_shape(shape)
    except ScanSizeError as exc:
        return exc
    except Exception as exc:  # nibabel and zlib raise many types for corrupt files
        return f"{type(exc).__name__}: {exc}".strip()[:200]
    return shape, affine, array


def _non_finite_as_float32(array: np.ndarray) -> str | None:
    """How many voxels are NaN/inf once read as float32 (what training and prediction read), or None.

    Finite float64 values beyond float32's range (about 3.4e38) become inf there, so they are counted
    here too, and named apart.
    """
    bad = int(np.count_nonzero(~np.isfinite(array)))
    overflow = 0
    if array.dtype.itemsize > 4:
        # from half a float32 step above its largest value (2**128 - 2**104) on, the cast rounds to inf
        largest = np.finfo(np.float32).max
        limit = 2.0**128 - 2.0**103
        overflow = int(np.count_nonzero(np.isfinite(array) & (np.abs(array) >= limit)))
    if not bad + overflow:
        return None
    text = f"{bad + overflow} NaN/inf voxels as float32"
    if overflow:
        text += f" ({overflow} finite {array.dtype} value(s) beyond float32's range ±{float(largest):.3g})"
    return text


def _grid_ok(path: Path, shape: tuple[int, ...], affine: np.ndarray, add) -> bool:
    """At least one voxel along every axis, and an affine that maps voxels to space one to one."""
    if min(shape, default=0) < 1:  # nibabel reads a file with an empty first axis as shape (0,)
        add("empty-axis", path, "at least 1 voxel along every axis", f"shape {shape}")
        return False
    problem = affine_problem(affine)
    if problem is not None:
        add("bad-affine", path, "an invertible affine with finite entries (every voxel size > 0)", problem)
        return False
    return True


def _check_not_empty(dataset: Dataset) -> list[Problem]:
    """A dataset whose layout finds no case (``no-cases``), naming where the cases were looked for."""
    if dataset.cases:
        return []
    root = Path(dataset.root)
    where, received = {
        "msd": (root / "dataset.json", "an empty 'training' list"),
        "nnunet": (root / "imagesTr", "no image files named CASE_0000<file_ending>"),
        "folders": (root / "images", "no NIfTI files"),
    }.get(dataset.layout, (root, "no cases"))
    return [Problem("no-cases", where, f"at least one case ({dataset.layout} layout)", f"0 cases: {received}")]


def _close(a: np.ndarray, b: np.ndarray, tol: float) -> bool:
    return bool(np.all(np.abs(a - b) <= tol))


def _check_channel_counts(dataset: Dataset, counts: dict[str, int]) -> list[Problem]:
    """Every case must have the declared number of channels (or, undeclared, the most common one)."""
    if not counts:
        return []
    if dataset.channel_names:
        expected, source = len(dataset.channel_names), f"declared channels {dataset.channel_names}"
    else:
        values, freq = np.unique(list(counts.values()), return_counts=True)
        expected, source = int(values[np.argmax(freq)]), "the channel count of most cases"
    problems = []
    for case in dataset.cases:
        n = counts.get(case.case_id)
        if n is not None and n != expected:
            problems.append(Problem("channel-count", case.image_paths[0], f"{expected} channel(s) ({source})",
                                    f"{n} channel(s)", case.case_id))
    return problems
