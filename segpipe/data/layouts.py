"""Dataset layouts: find the cases of a dataset folder and its class and channel names.

Every layout is read into the same :class:`Dataset` description, so the later stages never look
at folder conventions again.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from segpipe.io import read_json, strip_nifti_suffix


@dataclass(frozen=True)
class Case:
    """One training case: its id, one image file per input channel, and its label map."""

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

    @property
    def num_classes(self) -> int:
        return max(self.labels) + 1

    @property
    def class_names(self) -> list[str]:
        """Names indexed by label value; unnamed values in between get ``class_<v>``."""
        return [self.labels.get(v, f"class_{v}") for v in range(self.num_classes)]

    def case(self, case_id: str) -> Case:
        for case in self.cases:
            if case.case_id == case_id:
                return case
        raise KeyError(f"Case {case_id!r} is not in dataset {self.root}")


def load_dataset(root: str | Path) -> Dataset:
    """Read a dataset folder in Medical Segmentation Decathlon layout.

    Expects ``root/dataset.json`` with ``labels`` (value -> name), ``modality`` (index -> name) and
    ``training`` (list of ``{"image": ..., "label": ...}`` paths relative to ``root``).
    """
    root = Path(root)
    meta_path = root / "dataset.json"
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"Expected a dataset folder with dataset.json (MSD layout). Received: {root} "
            f"({'folder exists' if root.is_dir() else 'no such folder'}, no dataset.json)"
        )
    meta = read_json(meta_path)
    for key in ("labels", "training"):
        if key not in meta:
            raise ValueError(f"{meta_path}: missing required key {key!r}")
    labels = {int(v): str(name) for v, name in meta["labels"].items()}
    if 0 not in labels:
        raise ValueError(f"{meta_path}: 'labels' must declare the background value 0. Received: {labels}")
    modality = meta.get("modality", {"0": "image"})
    channel_names = [modality[k] for k in sorted(modality, key=int)]
    cases = []
    for i, entry in enumerate(meta["training"]):
        if not isinstance(entry, dict) or "image" not in entry:
            raise ValueError(f"{meta_path}: training[{i}] must be {{'image': ..., 'label': ...}}. Received: {entry!r}")
        image = root / entry["image"]
        label = root / entry["label"] if entry.get("label") else None
        cases.append(Case(strip_nifti_suffix(image.name), (image,), label))
    return Dataset(root=root, layout="msd", cases=cases, labels=labels, channel_names=channel_names)
