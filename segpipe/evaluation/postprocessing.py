"""Choose post-processing on out-of-fold predictions: keep the largest connected component or not.

nnU-Net's procedure (``nnunetv2.postprocessing.determine_postprocessing``), with one change:

1. **All foreground together**: keep only the largest connected component of the union of all
   foreground labels (:func:`segpipe.inference.postprocess.keep_largest_foreground_component`).
   nnU-Net switches it on when the foreground mean Dice rises and no class's mean Dice falls.
2. **Per class** (only with more than one foreground class; with one class step 1 is that class's
   step): on top of step 1's result if it is on, keep only the largest component of that class
   (:func:`segpipe.inference.postprocess.keep_largest_component`). nnU-Net switches it on when the
   class's mean Dice rises. Per-class steps touch only their own class's voxels (they become
   background), so they do not change each other's Dice and can be judged independently.

**The change** — a step is switched on only when the gain is not noise: its mean Dice gain must be
> 0 **and** the paired Wilcoxon signed-rank test of the per-case Dice after vs before
(:func:`segpipe.evaluation.paired_statistics.paired_test`: two-sided, cases the step does not change dropped
as in Wilcoxon's original test, exact for small samples) must give ``p < alpha`` (default
``alpha = 0.05``). Step 1 keeps nnU-Net's extra condition (no class's mean Dice falls); its
per-case value is the mean Dice over the foreground classes. nnU-Net's rule (any mean gain > 0) is
recorded beside ours as ``nnunet_rule`` so the two can be compared. Consequence: a step that
changes fewer than 6 cases can never be switched on (the smallest two-sided p of n changed cases is
2 / 2^n; 2 / 2^5 = 0.0625), so a rare but real gain on a small dataset stays off — the price of not
switching on gains that are luck.

Dice follows :mod:`segpipe.metrics.overlap` (1 when the class is absent from both maps), computed
with its confusion counts (no surface distances: the choice needs Dice only).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from segpipe.errors import Received, expected
from segpipe.evaluation.folders import match_cases
from segpipe.evaluation.paired_statistics import paired_test
from segpipe.inference.postprocess import (
    keep_largest_component,
    keep_largest_foreground_component,
)
from segpipe.io import read_nifti
from segpipe.metrics.overlap import confusion_counts, overlap_metrics
from segpipe.parallel import parallel_map

__all__ = ["DEFAULT_ALPHA", "RULE", "case_dice_variants", "choose_postprocessing", "choose_postprocessing_folders",
           "decide"]

DEFAULT_ALPHA = 0.05
RULE = ("a step is on when its mean Dice gain over the cases is > 0 and the two-sided Wilcoxon signed-rank test "
        "of per-case Dice (after vs before; unchanged cases dropped) gives p < alpha; the all-foreground step "
        "also needs no class's mean Dice to fall (nnU-Net's rule is the gain alone: nnunet_rule)")
# The four label maps a case is scored under: raw; all-foreground step; per-class steps; both.
VARIANTS = ("raw", "foreground", "classes", "foreground_classes")

LabelMapLike = np.ndarray | str | os.PathLike


def case_dice_variants(pred: np.ndarray, ref: np.ndarray, *, labels: Sequence[int],
                       connectivity: int = 3) -> dict[str, list[float]]:
    """Dice of every class of one case under the four post-processing variants.

    Parameters
    ----------
    pred, ref : np.ndarray
        Integer label maps of the same shape (an out-of-fold prediction and its reference).
    labels : sequence of int
        Foreground label values to score, in order.
    connectivity : int, optional
        Neighbourhood of the connected components (1 = faces, 2 = + edges, 3 = + corners; default 3).

    Returns
    -------
    dict of str to list of float
        ``{"raw", "foreground", "classes", "foreground_classes"}``: Dice per label (in ``labels``
        order) of the prediction as is, after the all-foreground step, after the per-class step of
        every class, and after the all-foreground step followed by the per-class steps.

    Examples
    --------
    >>> ref = np.zeros((10, 1, 1), np.uint8); ref[0:3] = 1
    >>> pred = ref.copy(); pred[8] = 1                      # a spurious far voxel
    >>> case_dice_variants(pred, ref, labels=[1])["classes"]
    [1.0]
    """
    labels = [int(v) for v in labels]
    fg = keep_largest_foreground_component(pred, connectivity=connectivity)
    maps = {"raw": pred, "foreground": fg,
            "classes": keep_largest_component(pred, labels, connectivity=connectivity),
            "foreground_classes": keep_largest_component(fg, labels, connectivity=connectivity)}
    out = {}
    for name, labels_map in maps.items():
        counts = confusion_counts(labels_map, ref, labels=labels)
        out[name] = [overlap_metrics(counts[c])["dice"] for c in labels]
    return out


def decide(dice: Mapping[str, Sequence[Sequence[float]] | np.ndarray], *,
           labels: Sequence[int], alpha: float = DEFAULT_ALPHA, connectivity: int = 3) -> dict[str, Any]:
    """The decision record from per-case Dice under the four variants (see :func:`choose_postprocessing`).

    Parameters
    ----------
    dice : dict of str to array
        For each name of ``VARIANTS``, an array (cases, labels) of Dice.
    labels : sequence of int
        The label values of the columns.
    alpha : float, optional
        Significance level of the Wilcoxon test, in (0, 1). Defaults to 0.05.
    connectivity : int, optional
        Recorded in the decision (the connectivity the Dice were computed with).

    Returns
    -------
    dict
        The decision record (keys in :func:`choose_postprocessing`).
    """
    labels = [int(v) for v in labels]
    if not (isinstance(alpha, (int, float)) and 0 < alpha < 1):
        raise ValueError(expected("a significance level in (0, 1)", key="alpha", received=alpha))
    missing = [name for name in VARIANTS if name not in dice]
    if missing:
        raise ValueError(expected(f"per-case Dice under every variant {list(VARIANTS)}", key="dice",
                                  received=Received(f"no {missing}")))
    arrays = {name: np.asarray(dice[name], dtype=np.float64) for name in VARIANTS}
    n_cases = arrays["raw"].shape[0] if arrays["raw"].ndim == 2 else 0
    for name, array in arrays.items():
        if array.size and array.shape != (n_cases, len(labels)):
            raise ValueError(expected(f"an array (cases, {len(labels)} labels) like dice['raw'] {arrays['raw'].shape}",
                                      key=f"dice[{name!r}].shape", received=array.shape))
    if n_cases == 0:
        raise ValueError(expected("at least one out-of-fold case", key="cases", received=Received("none")))

    # Step 1: all foreground together; per case the mean Dice over classes.
    before, after = arrays["raw"], arrays["foreground"]
    fg_step = _step(before.mean(axis=1), after.mean(axis=1), alpha)
    worsened = [c for c, b, a in zip(labels, before.mean(axis=0), after.mean(axis=0)) if a < b]
    fg_step.update(
        class_dice_before={str(c): float(v) for c, v in zip(labels, before.mean(axis=0))},
        class_dice_after={str(c): float(v) for c, v in zip(labels, after.mean(axis=0))},
        worsened_classes=worsened,
    )
    fg_step["nnunet_rule"] = fg_step["nnunet_rule"] and not worsened
    fg_step["enabled"] = fg_step["enabled"] and not worsened
    largest_foreground = fg_step["enabled"]

    # Step 2: each class on its own, on top of step 1 when it is on.
    source = arrays["foreground"] if largest_foreground else arrays["raw"]
    stepped = arrays["foreground_classes"] if largest_foreground else arrays["classes"]
    classes: dict[str, dict[str, Any]] = {}
    final = source.copy()
    if len(labels) > 1:
        for j, c in enumerate(labels):
            step = _step(source[:, j], stepped[:, j], alpha)
            step["after_foreground_step"] = largest_foreground
            classes[str(c)] = step
            if step["enabled"]:
                final[:, j] = stepped[:, j]
    chosen = [c for c in labels if classes.get(str(c), {}).get("enabled")]
    return {
        "method": "largest connected component, chosen on out-of-fold Dice (nnU-Net's steps, with a Wilcoxon test)",
        "rule": RULE,
        "alpha": float(alpha),
        "connectivity": int(connectivity),
        "labels": labels,
        "n_cases": int(n_cases),
        "foreground": fg_step,
        "classes": classes,
        "postprocess_largest_foreground": bool(largest_foreground),
        "postprocess_largest_component": chosen,
        "dice_before": {"foreground_mean": float(arrays["raw"].mean()),
                        **{str(c): float(v) for c, v in zip(labels, arrays["raw"].mean(axis=0))}},
        "dice_after": {"foreground_mean": float(final.mean()),
                       **{str(c): float(v) for c, v in zip(labels, final.mean(axis=0))}},
    }


def choose_postprocessing(
    cases: Mapping[str, tuple[LabelMapLike, LabelMapLike]] | Iterable[tuple[str, LabelMapLike, LabelMapLike]],
    *,
    labels: Sequence[int],
    alpha: float = DEFAULT_ALPHA,
    connectivity: int = 3,
    workers: int | None = 1,
) -> dict[str, Any]:
    """Decide on out-of-fold predictions which largest-component steps to switch on.

    Each case is read and scored once (four label maps, Dice only), so memory holds one case at a
    time; the decision needs only the per-case Dice. The rule is in the module docstring.

    Parameters
    ----------
    cases : dict of str to (pred, ref), or iterable of (case id, pred, ref)
        Out-of-fold predictions and their references: integer arrays, or paths of NIfTI label maps.
    labels : sequence of int
        Foreground label values of the dataset (> 0, distinct); a label absent from a case scores
        Dice 1 there when the prediction lacks it too.
    alpha : float, optional
        Significance level of the Wilcoxon test. Defaults to 0.05.
    connectivity : int, optional
        1 = faces, 2 = + edges, 3 = + corners (the default, as :func:`keep_largest_component`).
        Apply the decision with the same value.
    workers : int or None, optional
        Processes for reading and scoring cases (None: every available core). Defaults to 1.

    Returns
    -------
    dict
        The decision record, JSON-serialisable::

            postprocess_largest_foreground   bool: the all-foreground step is on
            postprocess_largest_component    [label, ...]: classes whose per-class step is on
            foreground     {dice_before, dice_after, gain, n, wins, losses, ties, p, nnunet_rule,
                            enabled, class_dice_before, class_dice_after, worsened_classes}
            classes        {"<label>": {dice_before, dice_after, gain, n, wins, losses, ties, p,
                            nnunet_rule, enabled, after_foreground_step}}  (empty with one class)
            dice_before, dice_after   {"foreground_mean", "<label>": mean Dice} without / with the
                                      chosen steps
            method, rule, alpha, connectivity, labels, n_cases

        ``dice_*`` are means over cases; ``wins``/``losses``/``ties`` count the cases where the step
        raises / lowers / keeps the Dice. Apply it with
        :func:`segpipe.inference.postprocess.apply_largest_component_steps`.

    Raises
    ------
    ValueError
        No cases, bad labels or alpha, or a prediction whose shape differs from its reference's
        (naming the case).

    Examples
    --------
    >>> ref = np.zeros((12, 1, 1), np.uint8); ref[0:4] = 1
    >>> pred = ref.copy(); pred[10] = 1
    >>> record = choose_postprocessing({f"c{i}": (pred, ref) for i in range(3)}, labels=[1])
    >>> record["foreground"]["gain"] > 0, record["foreground"]["p"], record["postprocess_largest_foreground"]
    (True, 0.25, False)
    """
    labels = _check_labels(labels)
    if connectivity not in (1, 2, 3):
        raise ValueError(expected("a connectivity in 1..3", key="connectivity", received=connectivity))
    pairs = ([(case_id, *pair) for case_id, pair in cases.items()] if isinstance(cases, Mapping)
             else [tuple(item) for item in cases])
    jobs = [(str(case_id), pred, ref, labels, connectivity) for case_id, pred, ref in pairs]
    if not jobs:
        raise ValueError(expected("at least one out-of-fold case", key="cases", received=Received("none")))
    results = parallel_map(_score_job, jobs, workers=workers, progress=len(jobs) > 20, desc="Post-processing choice")
    dice = {name: [r[name] for r in results] for name in VARIANTS}
    return decide(dice, labels=labels, alpha=alpha, connectivity=connectivity)


def choose_postprocessing_folders(pred_dir: str | os.PathLike, ref_dir: str | os.PathLike, *, labels: Sequence[int],
                                  alpha: float = DEFAULT_ALPHA, connectivity: int = 3,
                                  workers: int | None = 1) -> dict[str, Any]:
    """:func:`choose_postprocessing` on two folders of NIfTI label maps matched by file name.

    Matched by :func:`segpipe.evaluation.folders.match_cases`: every reference needs its prediction
    (a missing one is an error naming it); predictions without a reference are ignored with a warning.

    Parameters
    ----------
    pred_dir, ref_dir : path
        Out-of-fold predictions and references (``CASE.nii.gz`` or ``CASE.nii``).
    labels, alpha, connectivity, workers
        As in :func:`choose_postprocessing`.

    Returns
    -------
    dict
        The decision record.
    """
    pairs = match_cases(Path(pred_dir), Path(ref_dir))
    return choose_postprocessing(pairs, labels=labels, alpha=alpha,
                                 connectivity=connectivity, workers=workers)


# ---------------------------------------------------------------- helpers


def _step(before: np.ndarray, after: np.ndarray, alpha: float) -> dict[str, Any]:
    """Mean Dice before/after, the paired test, nnU-Net's rule and ours for one step."""
    test = paired_test(before, after)
    gain = float(np.mean(after) - np.mean(before))
    # Float noise from averaging can make an unchanged mean differ by 1e-17; no change is no gain.
    if not np.any(after != before):
        gain = 0.0
    return {"dice_before": float(np.mean(before)), "dice_after": float(np.mean(after)), "gain": gain, **test,
            "nnunet_rule": gain > 0, "enabled": bool(gain > 0 and test["p"] < alpha)}


def _score_job(job: tuple) -> dict[str, list[float]]:
    """Worker: read (if paths) and score one case; errors name the case."""
    case_id, pred, ref, labels, connectivity = job
    try:
        pred, ref = _label_map(pred, "pred"), _label_map(ref, "ref")
        if pred.shape != ref.shape:
            raise ValueError(expected(f"a prediction of the reference's shape {ref.shape}", key="pred.shape",
                                      received=pred.shape))
        return case_dice_variants(pred, ref, labels=labels, connectivity=connectivity)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        # Exceptions cross the process boundary without their traceback: name the case here.
        wrapped = type(exc)(f"Case {case_id!r}: {exc}")
        raise wrapped from exc


def _label_map(value: LabelMapLike, name: str) -> np.ndarray:
    array = read_nifti(value).array if isinstance(value, (str, os.PathLike)) else np.asarray(value)
    if array.dtype == bool:
        return array.view(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        rounded = np.rint(array)
        if not np.array_equal(rounded, array) or (rounded.size and rounded.min() < 0):
            raise ValueError(expected("whole non-negative label values", key=f"{name}.dtype",
                                      received=Received(f"{array.dtype} with fractional or negative values")))
        return rounded.astype(np.int32)
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(expected("an integer label map", key=f"{name}.dtype", received=Received(str(array.dtype))))
    return array


def _check_labels(labels: Sequence[int]) -> list[int]:
    values = [int(v) for v in labels]
    if not values or any(v <= 0 for v in values) or len(set(values)) != len(values):
        raise ValueError(expected("distinct foreground label values (> 0)", key="labels", received=list(labels)))
    return values


