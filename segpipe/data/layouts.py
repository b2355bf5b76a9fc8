"""Dataset layouts: find the cases of a dataset folder and its class and channel names.

Every layout is read into the same :class:`Dataset` description, so the later stages never look
at folder conventions again. Three layouts are understood:

``msd``
    Medical Segmentation Decathlon: ``dataset.json`` with ``modality`` (index -> name), ``labels``
    (value -> name) and ``training`` (list of ``{"image": ..., "label": ...}``). One image file per
    case; several modalities sit on its last axis.
``nnunet``
    nnU-Net v2 raw: ``dataset.json`` with ``channel_names`` (index -> name), ``labels``
    (name -> value) and ``file_ending``; one file per channel ``imagesTr/CASE_0000.nii.gz``, ...,
    labels ``labelsTr/CASE.nii.gz``.
``folders``
    ``images/`` and ``labels/`` matched by file name (``.nii`` and ``.nii.gz`` both). Classes come
    from the ``labels`` argument, an optional ``labels.json`` (value -> name), or else from the label
    maps themselves.

Reading a case into channels-last arrays (:func:`read_case_image`, :func:`read_case_label`) also
lives here, because how channels are stored (one 4-D file or one file per channel) is a layout
convention.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

from segpipe.io import NIFTI_SUFFIXES, Volume, read_json, read_nifti, strip_nifti_suffix
from segpipe.errors import Received, expected
from segpipe.data.labels import Region, check_ignore_label, parse_label_declaration

LAYOUTS = ("msd", "nnunet", "folders")


@dataclass(frozen=True)
class Case:
    """One training case: its id, one image file per input channel, and its label map.

    ``label_path`` is where the label is expected; it may not exist (the integrity check reports
    that). ``None`` means the layout declares no label for the case.
    """

    case_id: str
    image_paths: tuple[Path, ...]
    label_path: Path | None


@dataclass
class Dataset:
    """A dataset folder read through its layout."""

    root: Path
    layout: str
    cases: list[Case]
    labels: dict[int, str]  # label value -> class name, background (0) included
    channel_names: list[str] = field(default_factory=list)
    # Label files that belong to no case (label without image); reported by the integrity check.
    orphan_labels: list[Path] = field(default_factory=list)
    # Not a class: the value of unannotated voxels (segpipe.data.labels), above every class value.
    ignore_label: int | None = None
    # Region-based training (segpipe.data.labels): the regions in output order, and the label
    # value each one writes when predicted (later regions overwrite earlier ones).
    regions: tuple[Region, ...] | None = None
    regions_class_order: tuple[int, ...] | None = None

    @property
    def num_classes(self) -> int:
        return max(self.labels) + 1

    @property
    def class_names(self) -> list[str]:
        """Names indexed by label value; unnamed values in between get ``class_<v>``."""
        return [self.labels.get(v, f"class_{v}") for v in range(self.num_classes)]

    @property
    def declared_values(self) -> set[int]:
        """The label values a label map may hold: the classes and the ignore label."""
        return set(self.labels) | ({self.ignore_label} if self.ignore_label is not None else set())

    @property
    def num_outputs(self) -> int:
        """Output channels of the network: one per region, else one per class."""
        return len(self.regions) if self.regions else self.num_classes

    @property
    def output_names(self) -> list[str]:
        """One name per output channel: the regions, else the classes (background first)."""
        return [r.name for r in self.regions] if self.regions else self.class_names

    @property
    def num_channels(self) -> int:
        """Declared number of input channels (1 when the layout does not say)."""
        return max(1, len(self.channel_names))

    def case(self, case_id: str) -> Case:
        for case in self.cases:
            if case.case_id == case_id:
                return case
        raise KeyError(expected(f"a case of the dataset in {self.root}", key="case_id", received=case_id))


def detect_layout(root: str | Path, *, key: str = "root") -> str:
    """Name the layout of ``root``: ``msd``, ``nnunet`` or ``folders``.

    Raises
    ------
    FileNotFoundError
        ``root`` matches no layout (the message lists what each one needs).
    """
    root = Path(root)
    meta_path = root / "dataset.json"
    if meta_path.is_file():
        meta = read_json(meta_path)
        if "channel_names" in meta or "file_ending" in meta:
            return "nnunet"
        if "training" in meta or "modality" in meta:
            return "msd"
        raise ValueError(expected("'training'/'modality' (MSD) or 'channel_names'/'file_ending' (nnU-Net v2) "
                                  "among the top-level keys, to tell the layout", key="keys", received=sorted(meta),
                                  where=str(meta_path)))
    if (root / "images").is_dir() and (root / "labels").is_dir():
        return "folders"
    raise FileNotFoundError(expected(
        "a dataset folder with dataset.json (MSD or nnU-Net v2 layout) or with images/ and labels/ subfolders",
        key=key, received=Received(f"{root} ({_what_is(root)}, neither found)"),
    ))


def _what_is(path: Path) -> str:
    return "folder exists" if path.is_dir() else "a file, not a folder" if path.exists() else "no such folder"


def load_dataset(
    root: str | Path, layout: str | None = None, *, labels: Mapping[int | str, str] | None = None,
    key: str = "root",
) -> Dataset:
    """Read a dataset folder through its layout.

    Parameters
    ----------
    root
        the dataset folder.
    layout
        ``"msd"``, ``"nnunet"``, ``"folders"``, or ``None``/``"auto"`` to detect it.
    labels
        value -> class name; overrides the classes a layout declares (needed by ``folders``
        datasets without ``labels.json`` unless the classes may be read from the label maps).
    key
        what holds ``root``, for error messages (``data.root`` when it comes from a config).
    """
    root = Path(root)
    if layout in (None, "auto"):
        layout = detect_layout(root, key=key)
    readers = {"msd": _load_msd, "nnunet": _load_nnunet, "folders": _load_folders}
    if layout not in readers:
        raise ValueError(expected(f"one of {['auto', *LAYOUTS]}", key="layout", received=layout))
    dataset = _load_msd(root, key) if layout == "msd" else readers[layout](root)
    if labels is not None:
        dataset.labels = _labels_by_value(dict(labels))
    elif not dataset.labels:  # folders without labels.json
        dataset.labels = _labels_from_maps(dataset)
    return dataset


# ----------------------------------------------------------------------------------------------
# Layout readers


def _load_msd(root: Path, key: str = "root") -> Dataset:
    meta_path = root / "dataset.json"
    if not meta_path.is_file():
        raise FileNotFoundError(expected(
            "a dataset folder with dataset.json (MSD layout)",
            key=key, received=Received(f"{root} ({_what_is(root)}, no dataset.json)"),
        ))
    meta = read_json(meta_path)
    for key in ("labels", "training"):
        if key not in meta:
            raise ValueError(expected("a key the MSD layout requires", key=key, received=Received("<missing>"),
                                      where=str(meta_path)))
    labels, ignore_label = _pop_ignore(_labels_by_value(meta["labels"], where=str(meta_path)), str(meta_path))
    modality = meta.get("modality", {"0": "image"})
    channel_names = [str(modality[k]) for k in sorted(modality, key=int)]
    cases = []
    for i, entry in enumerate(meta["training"]):
        if not isinstance(entry, dict) or "image" not in entry:
            raise ValueError(expected("{'image': ..., 'label': ...}", key=f"training[{i}]", received=entry,
                                      where=str(meta_path)))
        image = root / entry["image"]
        label = root / entry["label"] if entry.get("label") else None
        cases.append(Case(strip_nifti_suffix(image.name), (image,), label))
    # Label files that no training entry names.
    named = {c.label_path.resolve() for c in cases if c.label_path is not None}
    orphans = [p for p in _nifti_files(root / "labelsTr") if p.resolve() not in named]
    _refuse_twins(root, root / "imagesTr", root / "labelsTr")
    return Dataset(root=root, layout="msd", cases=cases, labels=labels, channel_names=channel_names,
                   orphan_labels=orphans, ignore_label=ignore_label)


def _load_nnunet(root: Path) -> Dataset:
    meta_path = root / "dataset.json"
    meta = read_json(meta_path)
    for key in ("labels", "channel_names"):
        if key not in meta:
            raise ValueError(expected("a key the nnU-Net v2 layout requires", key=key, received=Received("<missing>"),
                                      where=str(meta_path)))
    # nnU-Net v2 writes labels as name -> value (or -> list of values: a region), "ignore" -> value.
    scheme = parse_label_declaration(meta["labels"], regions_class_order=meta.get("regions_class_order"),
                                     where=str(meta_path))
    labels = _labels_by_value(scheme.labels, where=str(meta_path))
    channels = meta["channel_names"]
    channel_names = [str(channels[k]) for k in sorted(channels, key=int)]
    ending = meta.get("file_ending", ".nii.gz")
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    _refuse_twins(root, images_dir, labels_dir)
    pattern = re.compile(rf"^(?P<case>.+)_(?P<channel>\d{{4}}){re.escape(ending)}$")
    case_ids = sorted({m["case"] for p in _listdir(images_dir) if (m := pattern.match(p.name))})
    cases = [
        Case(
            case_id,
            tuple(images_dir / f"{case_id}_{c:04d}{ending}" for c in range(len(channel_names))),
            labels_dir / f"{case_id}{ending}",
        )
        for case_id in case_ids
    ]
    known = set(case_ids)
    orphans = [p for p in _listdir(labels_dir) if p.name.endswith(ending) and p.name[: -len(ending)] not in known]
    return Dataset(root=root, layout="nnunet", cases=cases, labels=labels, channel_names=channel_names,
                   orphan_labels=orphans, ignore_label=scheme.ignore_label, regions=scheme.regions,
                   regions_class_order=scheme.regions_class_order)


def _load_folders(root: Path) -> Dataset:
    _refuse_twins(root, root / "images", root / "labels")
    images = {strip_nifti_suffix(p.name): p for p in _nifti_files(root / "images")}
    label_files = {strip_nifti_suffix(p.name): p for p in _nifti_files(root / "labels")}
    cases = []
    for case_id in sorted(images):
        image = images[case_id]
        # A missing label is expected beside the image's name, so the check can say where.
        label = label_files.get(case_id, root / "labels" / image.name)
        cases.append(Case(case_id, (image,), label))
    orphans = [label_files[k] for k in sorted(label_files) if k not in images]
    labels_json = root / "labels.json"
    labels, ignore_label = (_pop_ignore(_labels_by_value(read_json(labels_json), where=str(labels_json)),
                                        str(labels_json)) if labels_json.is_file() else ({}, None))
    return Dataset(root=root, layout="folders", cases=cases, labels=labels, channel_names=[],
                   orphan_labels=orphans, ignore_label=ignore_label)


def _refuse_twins(root: Path, *folders: Path) -> None:
    """Refuse ``NAME.nii`` beside ``NAME.nii.gz`` in a dataset folder: both would be case ``NAME``, and
    which one is the case would be a silent guess. One error naming every such pair.

    Raises
    ------
    ValueError
        names the files (relative to ``root``).
    """
    twins = []
    for folder in folders:
        by_name: dict[str, list[Path]] = {}
        for path in _nifti_files(folder):
            by_name.setdefault(strip_nifti_suffix(path.name), []).append(path)
        twins += [paths for paths in by_name.values() if len(paths) > 1]
    if twins:
        shown = "; ".join(" and ".join(_relative(p, root) for p in paths) for paths in twins)
        raise ValueError(expected("one file per case name (NAME.nii or NAME.nii.gz, not both)", key="files",
                                  received=Received(shown), where=str(root),
                                  hint="Remove or rename one file of each pair."))


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _listdir(folder: Path) -> list[Path]:
    return sorted(folder.iterdir()) if folder.is_dir() else []


def _nifti_files(folder: Path) -> list[Path]:
    # Skip hidden files: macOS "._x.nii.gz" resource forks and our own atomic-write temp files.
    return [p for p in _listdir(folder) if p.name.endswith(NIFTI_SUFFIXES) and not p.name.startswith(".")]


def _labels_by_value(raw: Mapping, *, where: str | None = None) -> dict[int, str]:
    """``raw`` (value -> name, from ``where`` or the ``labels`` argument) with integer values."""
    try:
        labels = {int(v): str(name) for v, name in raw.items()}
    except (AttributeError, TypeError, ValueError) as exc:
        raise ValueError(expected("a mapping of integer label values to names", key="labels",
                                  received=raw if not isinstance(raw, Mapping) else dict(raw), where=where)) from exc
    if 0 not in labels:
        raise ValueError(expected("labels that declare the background value 0", key="labels", received=labels,
                                  where=where))
    if min(labels) < 0 or max(labels) > 255:
        raise ValueError(expected("label values in 0..255", key="labels", received=sorted(labels), where=where))
    return labels


def _pop_ignore(labels: dict[int, str], where: str) -> tuple[dict[int, str], int | None]:
    """nnU-Net's convention in the value -> name form: the label named "ignore" is not a class."""
    ignore = [v for v, name in labels.items() if name.lower() == "ignore"]
    if not ignore:
        return labels, None
    classes = {v: name for v, name in labels.items() if v != ignore[0]}
    return classes, check_ignore_label(ignore[0], classes, key=f"labels[{ignore[0]!r}]", where=where)


def _labels_from_maps(dataset: Dataset) -> dict[int, str]:
    """Classes of a dataset that declares none: every value found in its label maps."""
    values: set[int] = {0}
    for case in dataset.cases:
        if case.label_path is not None and case.label_path.is_file():
            try:
                values |= {int(v) for v in np.unique(read_case_label(case))}
            except ValueError:
                continue  # unreadable or non-integer label: the integrity check reports it
    names = {0: "background"}
    return _labels_by_value({v: names.get(v, f"class_{v}") for v in sorted(values)}, where=str(dataset.root))


# ----------------------------------------------------------------------------------------------
# Reading a case


def squeeze_trailing_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """``shape`` without singleton axes after the three spatial ones: (X, Y, Z, 1) -> (X, Y, Z),
    (X, Y, Z, 1, C) (ITK vectors) -> (X, Y, Z, C)."""
    shape = tuple(int(s) for s in shape)
    while len(shape) > 3 and shape[3] == 1:
        shape = shape[:3] + shape[4:]
    return shape


def squeeze_trailing(array: np.ndarray) -> np.ndarray:
    """``array`` reshaped to :func:`squeeze_trailing_shape` (a view)."""
    return array.reshape(squeeze_trailing_shape(array.shape))


def read_case_image(case: Case, *, dtype=np.float32) -> Volume:
    """Read a case's image as channels-last (X, Y, Z, C), with the affine of its first channel file.

    One 4-D file supplies its channels on the last axis; several files are stacked in order.

    Raises
    ------
    ValueError
        a file is unreadable, not 3-D/4-D, or the channel files disagree in shape.
    """
    arrays, affine = [], None
    for path in case.image_paths:
        volume = read_nifti(path, dtype=dtype)
        array = squeeze_trailing(volume.array)
        if array.ndim == 3:
            array = array[..., None]
        if array.ndim != 4:
            raise ValueError(expected("a 3-D or 4-D image", key="shape", received=volume.array.shape, where=str(path)))
        if arrays and array.shape[:3] != arrays[0].shape[:3]:
            raise ValueError(expected(
                f"the spatial shape {arrays[0].shape[:3]} of {case.image_paths[0].name} (every channel of case "
                f"{case.case_id} on one grid)", key="shape", received=array.shape[:3], where=str(path),
            ))
        affine = volume.affine if affine is None else affine
        arrays.append(array)
    image = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=-1)
    return Volume(array=image, affine=affine)


def read_case_label(case: Case) -> np.ndarray:
    """Read a case's label map as a 3-D integer array (uint8 when the values fit, else int64).

    Raises
    ------
    ValueError
        no label, an unreadable file, a map that is not 3-D, or non-integer values.
    """
    if case.label_path is None:
        raise ValueError(expected("a case with a label map", key="label_path", received=None, where=f"case {case.case_id}"))
    volume = read_nifti(case.label_path)
    array = squeeze_trailing(volume.array)
    if array.ndim != 3:
        raise ValueError(expected("a 3-D label map", key="shape", received=volume.array.shape, where=str(case.label_path)))
    if not np.issubdtype(array.dtype, np.integer):
        # Some datasets store labels as float with exact integer values (MSD hippocampus does).
        finite = np.isfinite(array)
        fractional = ~finite | (array != np.round(np.where(finite, array, 0)))
        if fractional.any():
            examples = ", ".join(sorted({str(v) for v in array[fractional][:1000].tolist()})[:5])
            raise ValueError(expected("integer label values", key="values", received=Received(
                f"{int(fractional.sum())} voxel(s) like {examples} (dtype {array.dtype})"), where=str(case.label_path)))
    if array.min(initial=0) >= 0 and array.max(initial=0) <= 255:
        return array.astype(np.uint8)
    return array.astype(np.int64)


# ---------------------------------------------------------------- files of one case, by name


def find_image(image_dir: str | Path, case: str) -> Path | None:
    """The scan of ``case`` in ``image_dir``: ``CASE_0000.nii(.gz)`` (first channel) or ``CASE.nii(.gz)``, or None."""
    for stem in (f"{case}_0000", case):
        for suffix in NIFTI_SUFFIXES:
            path = Path(image_dir) / f"{stem}{suffix}"
            if path.is_file():
                return path
    return None


def image_folder_of(label_dir: Path) -> Path | None:
    """The scans beside a label folder: ``labelsTr`` -> ``imagesTr``, ``labelsTs`` -> ``imagesTs``,
    ``labels`` -> ``images`` (MSD, nnU-Net v2 and ``images/``+``labels/``), if that folder exists."""
    if label_dir.name.startswith("labels"):
        candidate = label_dir.with_name("images" + label_dir.name[len("labels"):])
        if candidate.is_dir():
            return candidate
    return None


def image_of_label(case: str, label_file: Path, image_dir: str | Path | None = None) -> Path | None:
    """The scan of ``case``: in ``image_dir`` if given, else beside the label folder of ``label_file`` or
    of the file it links to (run mode links the dataset's label maps), or None."""
    if image_dir is not None:
        return find_image(image_dir, case)
    for folder in dict.fromkeys((label_file.parent, label_file.resolve().parent)):
        images = image_folder_of(folder)
        found = find_image(images, case) if images is not None else None
        if found is not None:
            return found
    return None


def label_file(folder: Path, case: str) -> Path:
    """``folder/CASE.nii.gz`` or ``folder/CASE.nii``.

    Raises
    ------
    FileNotFoundError
        Neither exists.
    """
    for suffix in NIFTI_SUFFIXES:
        if (folder / f"{case}{suffix}").is_file():
            return folder / f"{case}{suffix}"
    raise FileNotFoundError(expected(f"a label map of case {case!r} ({', '.join(NIFTI_SUFFIXES)})", key="folder",
                                     received=Received(f"{folder} (has none)")))


def is_reference_label_folder(folder: str | Path) -> bool:
    """Whether ``folder`` holds a dataset's reference label maps: ``labelsTr``/``labelsTs`` beside a
    ``dataset.json`` (MSD, nnU-Net v2), a folder the MSD ``training`` entries name labels in, or
    ``labels`` beside ``images`` (folders layout). Prediction never writes there.

    Examples
    --------
    >>> import tempfile
    >>> root = Path(tempfile.mkdtemp())
    >>> (root / "images").mkdir(); (root / "labels").mkdir()
    >>> is_reference_label_folder(root / "labels"), is_reference_label_folder(root / "images")
    (True, False)
    """
    folder = Path(folder).resolve()
    root = folder.parent
    if folder.name == "labels" and (root / "images").is_dir():
        return True
    meta_path = root / "dataset.json"
    if not meta_path.is_file():
        return False
    if folder.name in ("labelsTr", "labelsTs"):
        return True
    try:
        training = read_json(meta_path).get("training", [])
    except (OSError, ValueError, AttributeError):  # not a dataset.json segpipe reads: no labels named
        return False
    entries = training if isinstance(training, list) else []
    named = {(root / e["label"]).resolve().parent for e in entries if isinstance(e, dict) and isinstance(e.get("label"), str)}
    return folder in named
