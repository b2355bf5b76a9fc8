"""The options of an evaluation, checked where they are defined.

:class:`LesionOptions` groups what lesion-wise scoring needs (which labels, the minimum lesion size,
the matching reach); :class:`EvaluationOptions` everything else an evaluation of folders takes. Both
check and normalise their values on construction, so a bad value is refused before any case is
read (in run mode: before the validation cases are predicted), with one message naming the option.

Examples
--------
>>> LesionOptions(labels=[2, 1, 2], min_size_mm3=10)
LesionOptions(labels=(1, 2), min_size_mm3=10.0, dilation_vox=0)
>>> EvaluationOptions(tolerance_mm={1: 2, 2: 0.5}).tolerance(2)
0.5
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from segpipe.data.labels import MAX_LABEL, Region
from segpipe.errors import Received, expected

__all__ = ["LesionOptions", "EvaluationOptions"]


def _is_integer(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _labels(values: Iterable[Any], key: str) -> tuple[int, ...]:
    """Sorted unique integer labels (whole-number floats accepted)."""
    values, labels = list(values), set()
    for value in values:
        if not (_is_integer(value) or (_is_number(value) and float(value).is_integer())):
            raise ValueError(expected("integer label values", key=key, received=list(values)))
        labels.add(int(value))
    return tuple(sorted(labels))


@dataclass(frozen=True)
class LesionOptions:
    """Lesion-wise scoring (:mod:`segpipe.metrics.lesions`): connected components matched per label.

    Parameters
    ----------
    labels : iterable of int, optional
        Foreground labels (> 0) also scored lesion by lesion; stored sorted and unique. Default: none
        (no lesion-wise scoring).
    min_size_mm3 : float, optional
        Smaller connected components are not lesions (reference and prediction). Default 0.
    dilation_vox : int, optional
        Matching reach of the reference lesions in voxels (BraTS 2023: 1-3). Default 0 (by overlap).

    Raises
    ------
    ValueError
        A label <= 0 or not an integer, a negative or non-finite size, a reach that is not an
        integer >= 0 (the message names ``lesion_labels``, ``lesion_min_size_mm3`` or
        ``lesion_dilation_vox``, the command-line spelling).

    Examples
    --------
    >>> LesionOptions(labels=[0])
    Traceback (most recent call last):
    ...
    ValueError: Expected lesion_labels > 0 (foreground labels). Received: lesion_labels=[0].
    """

    labels: tuple[int, ...] = ()
    min_size_mm3: float = 0.0
    dilation_vox: int = 0

    def __post_init__(self) -> None:
        labels = _labels(self.labels or (), "lesion_labels")
        if any(v <= 0 for v in labels):
            raise ValueError(expected("lesion_labels > 0 (foreground labels)", key="lesion_labels",
                                      received=list(labels)))
        if not (_is_number(self.min_size_mm3) and math.isfinite(self.min_size_mm3) and self.min_size_mm3 >= 0):
            raise ValueError(expected("lesion_min_size_mm3 >= 0", key="lesion_min_size_mm3",
                                      received=self.min_size_mm3))
        if not _is_integer(self.dilation_vox) or self.dilation_vox < 0:
            raise ValueError(expected("lesion_dilation_vox as an integer >= 0", key="lesion_dilation_vox",
                                      received=self.dilation_vox))
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "min_size_mm3", float(self.min_size_mm3))
        object.__setattr__(self, "dilation_vox", int(self.dilation_vox))

    @property
    def enabled(self) -> bool:
        """Whether any label is scored lesion by lesion."""
        return bool(self.labels)


@dataclass(frozen=True)
class EvaluationOptions:
    """How folders of label maps are scored (:func:`segpipe.evaluation.folders.score_folders`).

    Parameters
    ----------
    labels : iterable of int, optional
        Label values to score; stored sorted and unique. Default: the foreground values found in the
        references.
    class_names : list of str (indexed by label value) or dict of int to str, optional
        Names for the tables. Default: ``class_<value>``.
    tolerance_mm : float or dict of int to float, optional
        NSD tolerance in mm (>= 0), for all classes or per label. Default 1 mm.
    workers : int, optional
        Parallel processes (1 or less: in this process). Default: the CPU cores available.
    lesions : LesionOptions, optional
        Lesion-wise scoring. Default: none.
    report : bool, optional
        Also write ``report.html`` and ``overlays/``. Default True.
    image_dir : path-like, optional
        Scans drawn under the report's overlays. Default: the ``images*`` folder beside the references.
    ignore_label : int, optional
        Reference voxels holding this value (1..255) were not annotated: they count nowhere, in no
        class and no region (:func:`segpipe.metrics.regions.mask_ignored`). Default: none.
    regions : sequence of Region, optional
        Also scored per region (:class:`segpipe.data.labels.Region`; unique names, values 1..255);
        stored as a tuple. Default: none.

    Raises
    ------
    ValueError
        A value of the wrong type or out of range (the message names the option).

    Examples
    --------
    >>> EvaluationOptions(tolerance_mm=-1.0)
    Traceback (most recent call last):
    ...
    ValueError: Expected tolerance_mm >= 0 (mm; a number or a mapping of label to number). Received: tolerance_mm=-1.0.
    """

    labels: tuple[int, ...] | None = None
    class_names: Sequence[str] | Mapping[int, str] | None = None
    tolerance_mm: float | Mapping[int, float] = 1.0
    workers: int | None = None
    lesions: LesionOptions = field(default_factory=LesionOptions)
    report: bool = True
    image_dir: Path | None = None
    ignore_label: int | None = None
    regions: tuple[Region, ...] = ()

    def __post_init__(self) -> None:
        if self.labels is not None:
            object.__setattr__(self, "labels", _labels(self.labels, "labels"))
        if self.class_names is not None and (isinstance(self.class_names, str)
                                             or not isinstance(self.class_names, (Mapping, Sequence))):
            raise ValueError(expected("a list of names (indexed by label value) or a mapping of label to name",
                                      key="class_names", received=self.class_names))
        object.__setattr__(self, "tolerance_mm", self._checked_tolerance())
        if self.workers is not None and not _is_integer(self.workers):
            raise ValueError(expected("an integer number of processes or None", key="workers", received=self.workers))
        if not isinstance(self.lesions, LesionOptions):
            raise ValueError(expected("LesionOptions", key="lesions", received=Received(type(self.lesions).__name__)))
        if not isinstance(self.report, (bool, np.bool_)):
            raise ValueError(expected("True or False", key="report", received=self.report))
        if self.image_dir is not None:
            if not isinstance(self.image_dir, (str, os.PathLike)):
                raise ValueError(expected("a folder path or None", key="image_dir", received=self.image_dir))
            object.__setattr__(self, "image_dir", Path(self.image_dir))
        if self.ignore_label is not None and not (_is_integer(self.ignore_label)
                                                  and 0 < self.ignore_label <= MAX_LABEL):
            raise ValueError(expected(f"an ignore label in 1..{MAX_LABEL} or None", key="ignore_label",
                                      received=self.ignore_label))
        object.__setattr__(self, "regions", self._checked_regions())

    def _checked_regions(self) -> tuple[Region, ...]:
        regions = tuple(self.regions or ())
        what = f"regions as Region(name, values) with unique names and values in 1..{MAX_LABEL}"
        names = [g.name for g in regions if isinstance(g, Region)]
        if len(names) != len(regions) or len(set(names)) != len(names) or not all(
                g.values and all(_is_integer(v) and 0 < v <= MAX_LABEL for v in g.values) for g in regions):
            raise ValueError(expected(what, key="regions", received=Received(repr(regions))))
        return regions

    def _checked_tolerance(self) -> float | dict[int, float]:
        what = "tolerance_mm >= 0 (mm; a number or a mapping of label to number)"
        value = self.tolerance_mm
        if isinstance(value, Mapping):
            if not all((_is_integer(k) or (isinstance(k, str) and k.isdigit())) and _is_number(v)
                       for k, v in value.items()):
                raise ValueError(expected(what, key="tolerance_mm", received=dict(value)))
            value = {int(k): float(v) for k, v in value.items()}
            bad = {k: v for k, v in value.items() if not (math.isfinite(v) and v >= 0)}
            if bad:
                raise ValueError(expected(what, key="tolerance_mm", received=bad))
            return value
        if not (_is_number(value) and math.isfinite(value) and value >= 0):
            raise ValueError(expected(what, key="tolerance_mm", received=value))
        return float(value)

    def tolerance(self, label: int) -> float:
        """The NSD tolerance of ``label`` in mm.

        Raises
        ------
        KeyError
            ``tolerance_mm`` is a mapping without ``label``.
        """
        if isinstance(self.tolerance_mm, Mapping):
            return self.tolerance_mm[int(label)]
        return self.tolerance_mm
