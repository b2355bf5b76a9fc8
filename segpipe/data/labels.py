"""Label conventions beyond one class per value: the ignore label and regions (nnU-Net v2's syntax).

* **Ignore label**: a label value for voxels nobody annotated. nnU-Net v2 declares it as the label
  named ``"ignore"`` in ``dataset.json`` and requires it to be the highest value; segpipe reads it
  from there or from ``data.ignore_label``. It is not a class: it weighs 0 in every loss, counts in
  no metric and no patch is centred on it.
* **Regions**: ``"labels": {"background": 0, "whole_tumor": [1, 2, 3], "tumor_core": [2, 3],
  "enhancing_tumor": 3}`` with ``"regions_class_order": [1, 2, 3]``. A voxel belongs to every
  region whose value list holds its label; the network has one sigmoid per region; a label map is
  recovered by writing ``regions_class_order[i]`` where region i's probability is > 0.5, regions in
  order (later ones overwrite earlier ones, as nnU-Net does).

Target tensors (what the loader gives the losses and metrics; docs/losses.md, "Ignored voxels"):
one-hot targets mark an ignored voxel with an all-zero row; region targets have one channel per
region and, with an ignore label, one extra last channel, the ignore mask (1 = not annotated).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from segpipe.errors import expected

__all__ = ["Region", "LabelScheme", "parse_label_declaration", "check_ignore_label", "parse_regions",
           "target_table", "region_targets", "regions_to_labels", "MAX_LABEL"]

MAX_LABEL = 255
"""Label maps are stored as uint8."""


@dataclass(frozen=True)
class Region:
    """A region: its name and the label values it contains."""

    name: str
    values: tuple[int, ...]


@dataclass(frozen=True)
class LabelScheme:
    """What a ``labels`` declaration says: classes (value -> name), the ignore label, the regions."""

    labels: dict[int, str]
    ignore_label: int | None = None
    regions: tuple[Region, ...] | None = None
    regions_class_order: tuple[int, ...] | None = None


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def parse_regions(raw: Mapping[str, Any], regions_class_order: Sequence[int] | None, *, key: str,
                  where: str | None = None) -> tuple[tuple[Region, ...], tuple[int, ...]]:
    """Regions from ``name -> value or list of values`` (background excluded) and their class order.

    Parameters
    ----------
    raw : mapping
        Region name -> a label value or a non-empty list of label values (> 0), in output order.
    regions_class_order : sequence of int or None
        One label value per region, written where the region is predicted (later regions win).
    key : str
        What holds ``raw`` (``labels`` in dataset.json, ``data.regions`` in a config), for errors.
    where : str, optional
        The file, for errors.

    Returns
    -------
    (regions, regions_class_order)

    Raises
    ------
    ValueError
        An empty or malformed region, a value outside 1..255, no or a wrong-length class order.

    Examples
    --------
    >>> regions, order = parse_regions({"whole": [1, 2], "core": 2}, [1, 2], key="labels")
    >>> regions[1], order
    (Region(name='core', values=(2,)), (1, 2))
    """
    if not isinstance(raw, Mapping) or not raw:
        raise ValueError(expected("a non-empty mapping of region names to label values", key=key, received=raw,
                                  where=where))
    regions = []
    for name, value in raw.items():
        values = [value] if _is_int(value) else value
        if (not isinstance(values, (list, tuple)) or not values
                or not all(_is_int(v) and 0 < v <= MAX_LABEL for v in values) or len(set(values)) != len(values)):
            raise ValueError(expected("a label value or a list of distinct label values in 1..255",
                                      key=f"{key}[{name!r}]", received=value, where=where))
        regions.append(Region(str(name), tuple(int(v) for v in values)))
    order_key = "regions_class_order" if key == "labels" else key.rsplit(".", 1)[0] + ".regions_class_order"
    if (not isinstance(regions_class_order, (list, tuple)) or len(regions_class_order) != len(regions)
            or not all(_is_int(v) and 0 < v <= MAX_LABEL for v in regions_class_order)):
        raise ValueError(expected(f"one label value in 1..255 per region ({len(regions)}: "
                                  f"{[r.name for r in regions]}), written where the region is predicted",
                                  key=order_key, received=regions_class_order, where=where))
    return tuple(regions), tuple(int(v) for v in regions_class_order)


def check_ignore_label(ignore_label: Any, labels: Mapping[int, str], *, key: str, where: str | None = None) -> int:
    """The ignore label, checked: an integer in 1..255 above every class value (nnU-Net's rule).

    Raises
    ------
    ValueError
        Naming ``key``, when it is not an integer or not above the highest class value.
    """
    highest = max(labels) if labels else 0
    if not _is_int(ignore_label) or not highest < ignore_label <= MAX_LABEL:
        raise ValueError(expected(f"an integer label value above every class value (highest: {highest}) and at "
                                  "most 255: the ignore label is the highest value, as in nnU-Net",
                                  key=key, received=ignore_label, where=where))
    return int(ignore_label)


def parse_label_declaration(raw: Mapping[str, Any], *, regions_class_order: Sequence[int] | None = None,
                            where: str | None = None) -> LabelScheme:
    """nnU-Net v2's ``labels`` (name -> value, or -> list of values for regions) as a :class:`LabelScheme`.

    The entry named ``"ignore"`` is the ignore label. Regions are used when a value is a list or
    ``regions_class_order`` is given; the classes are then the label values the regions use (a
    value named by a one-value region takes that name, the others ``label_<v>``).

    Raises
    ------
    ValueError
        Naming the entry: a non-integer value, no background 0, an ignore label that is not the
        highest value, a malformed region or class order.

    Examples
    --------
    >>> scheme = parse_label_declaration({"background": 0, "lesion": 1, "ignore": 2})
    >>> scheme.labels, scheme.ignore_label
    ({0: 'background', 1: 'lesion'}, 2)
    """
    if not isinstance(raw, Mapping):
        raise ValueError(expected("a mapping of label names to values", key="labels", received=raw, where=where))
    entries = {str(k): v for k, v in raw.items() if str(k) != "ignore"}
    region_mode = regions_class_order is not None or any(isinstance(v, (list, tuple)) for v in entries.values())
    background = [k for k, v in entries.items() if _is_int(v) and v == 0]
    if not background:
        raise ValueError(expected("labels that declare the background value 0", key="labels", received=dict(raw),
                                  where=where))
    regions = order = None
    if region_mode:
        regions, order = parse_regions({k: v for k, v in entries.items() if k not in background},
                                       regions_class_order, key="labels", where=where)
        values = sorted({v for r in regions for v in r.values} | set(order))
        names = {r.values[0]: r.name for r in regions if len(r.values) == 1}
        labels = {0: background[0], **{v: names.get(v, f"label_{v}") for v in values}}
    else:
        labels = {}
        for name, value in entries.items():
            if not _is_int(value) or not 0 <= value <= MAX_LABEL:
                raise ValueError(expected("an integer label value in 0..255 (or a list of values for a region)",
                                          key=f"labels[{name!r}]", received=value, where=where))
            labels[int(value)] = name
    ignore = None
    if "ignore" in raw:
        ignore = check_ignore_label(raw["ignore"], labels, key="labels['ignore']", where=where)
    return LabelScheme(labels, ignore, regions, order)


def target_table(num_classes: int, *, ignore_label: int | None = None,
                 regions: Sequence[Region] | None = None) -> np.ndarray:
    """A (256, K) float32 lookup table: row v is the training target of a voxel with label v.

    Without regions, K = ``num_classes`` and row v is the one-hot vector of v (all zero for the
    ignore label and any value >= ``num_classes``). With regions, K = the number of regions, plus
    one ignore-mask channel when ``ignore_label`` is set: row v has a 1 for every region holding v,
    and the ignore label's row is 0 except its mask channel.
    """
    if regions is None:
        table = np.zeros((MAX_LABEL + 1, num_classes), np.float32)
        table[np.arange(num_classes), np.arange(num_classes)] = 1.0
        if ignore_label is not None:
            table[ignore_label] = 0.0
        return table
    extra = 1 if ignore_label is not None else 0
    table = np.zeros((MAX_LABEL + 1, len(regions) + extra), np.float32)
    for r, region in enumerate(regions):
        table[list(region.values), r] = 1.0
    if ignore_label is not None:
        table[ignore_label] = 0.0
        table[ignore_label, -1] = 1.0
    return table


def region_targets(label: np.ndarray, regions: Sequence[Region], *, ignore_label: int | None = None) -> np.ndarray:
    """Region targets (..., R [+ 1 ignore-mask channel]) float32 of an integer label map.

    Examples
    --------
    >>> regions = (Region("whole", (1, 2, 3)), Region("core", (2, 3)), Region("enhancing", (3,)))
    >>> region_targets(np.array([0, 1, 2, 3]), regions).astype(int).tolist()
    [[0, 0, 0], [1, 0, 0], [1, 1, 0], [1, 1, 1]]
    """
    return target_table(0, ignore_label=ignore_label, regions=regions)[np.asarray(label, dtype=np.intp)]


def regions_to_labels(probabilities: np.ndarray, regions_class_order: Sequence[int], *,
                      threshold: float = 0.5) -> np.ndarray:
    """A uint8 label map from region probabilities (..., R), nnU-Net's rule.

    Region i writes ``regions_class_order[i]`` where its probability is above ``threshold``, in
    region order, so later regions overwrite earlier ones; elsewhere 0.

    Examples
    --------
    >>> p = np.array([[0.9, 0.2, 0.1], [0.9, 0.8, 0.7], [0.2, 0.9, 0.1], [0.4, 0.3, 0.2]])
    >>> regions_to_labels(p, [1, 2, 3]).tolist()
    [1, 3, 2, 0]
    """
    probabilities = np.asarray(probabilities)
    if probabilities.shape[-1] != len(regions_class_order):
        raise ValueError(expected(f"one probability channel per region ({len(regions_class_order)})",
                                  key="probabilities.shape", received=probabilities.shape))
    out = np.zeros(probabilities.shape[:-1], np.uint8)
    for i, value in enumerate(regions_class_order):
        out[probabilities[..., i] > threshold] = value
    return out
