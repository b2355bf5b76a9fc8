"""How a volume is predicted: the one :class:`InferenceSettings`, validated here and nowhere else.

The config's ``inference:`` section *is* an :class:`InferenceSettings` (``evaluate.py RUN_DIR`` uses
it, and the run's bundle stores it as its defaults); ``predict.py`` overrides single fields per call.
No TensorFlow here: the config loader imports this module.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

from segpipe.errors import SettingError
from segpipe.settings import Settings, is_number

MAX_OVERLAP = 0.95  # beyond this the window count explodes (1 / (1 - overlap) per axis) for no gain


def check_mirror_axes(axes: Sequence[int], *, key: str = "mirror_axes") -> tuple[int, ...]:
    """``axes`` as a sorted tuple of distinct spatial axes out of (0, 1, 2); () = no mirroring."""
    values = tuple(axes)
    if len(set(values)) != len(values) or any(isinstance(a, bool) or a not in (0, 1, 2) for a in values):
        raise SettingError(key, "distinct spatial axes out of [0, 1, 2] ([] = no mirroring)", list(values))
    return tuple(sorted(int(a) for a in values))


def check_label_values(values: Sequence[int], num_classes: int, *, key: str) -> None:
    """Every value in ``values`` is a foreground label of a model with ``num_classes`` classes."""
    bad = [v for v in values if not 1 <= v < num_classes]
    if bad:
        raise SettingError(key, f"foreground label values of the model's classes (1..{num_classes - 1})", list(values))


@dataclass(frozen=True)
class InferenceSettings(Settings):
    """Sliding-window prediction of one volume.

    Read from a mapping (the config's ``inference:``, ``bundle.json``'s ``inference``) with
    ``InferenceSettings.from_dict(values, where=..., prefix=...)`` (:mod:`segpipe.settings`).

    Attributes
    ----------
    overlap
        fraction of a window shared with its neighbour along each axis, in [0, 0.95].
    mirror_axes
        spatial axes mirrored for test-time augmentation (every subset is averaged,
        ``2 ** len(mirror_axes)`` passes); ``()`` switches mirroring off.
    batch_size
        windows per network call (2 is 10-30 % faster than 1 on 2 CPU cores).
    sigma_scale
        σ of the Gaussian window weighting as a fraction of the window side (nnU-Net: 1/8).
    postprocess_largest_component
        label values for which only the largest connected component
        is kept (``()`` = none).
    postprocess_largest_foreground
        first keep only the largest connected component of all
        foreground together (nnU-Net's first post-processing step; chosen on data by
        :func:`segpipe.evaluation.postprocessing.choose_postprocessing`).

    Raises
    ------
    SettingError
        a field is out of range; the message names the field.
    """

    SECTION = "inference settings"  # names them in an unknown key's message when read without a key path

    # the ranges are checked in __post_init__ alone (no field metadata), so a setting read from the
    # config, from bundle.json or given in Python gets the same message
    overlap: float = 0.5
    mirror_axes: tuple[int, ...] = (0, 1, 2)
    batch_size: int = 2
    sigma_scale: float = 0.125
    postprocess_largest_component: tuple[int, ...] = ()
    postprocess_largest_foreground: bool = False

    def __post_init__(self) -> None:
        if not is_number(self.overlap) or not 0 <= self.overlap <= MAX_OVERLAP:
            raise SettingError("overlap", f"a number in [0, {MAX_OVERLAP}]", self.overlap)
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise SettingError("batch_size", "an integer >= 1", self.batch_size)
        if not is_number(self.sigma_scale) or self.sigma_scale <= 0:
            raise SettingError("sigma_scale", "a number > 0", self.sigma_scale)
        classes = tuple(self.postprocess_largest_component)
        if len(set(classes)) != len(classes) or any(
                isinstance(c, bool) or not isinstance(c, int) or not 1 <= c <= 255 for c in classes):
            raise SettingError("postprocess_largest_component", "distinct label values in 1..255", list(classes))
        if not isinstance(self.postprocess_largest_foreground, bool):
            raise SettingError("postprocess_largest_foreground", "true or false", self.postprocess_largest_foreground)
        object.__setattr__(self, "overlap", float(self.overlap))
        object.__setattr__(self, "mirror_axes", check_mirror_axes(self.mirror_axes))
        object.__setattr__(self, "sigma_scale", float(self.sigma_scale))
        object.__setattr__(self, "postprocess_largest_component", tuple(sorted(classes)))

    def replace(self, **changes: Any) -> "InferenceSettings":
        """A copy with the given fields changed; ``None`` values keep the current one (CLI overrides)."""
        changes = {k: tuple(v) if isinstance(v, list) else v for k, v in changes.items() if v is not None}
        return dataclasses.replace(self, **changes)

    def check_classes(self, num_classes: int) -> None:
        """Post-processed labels must be foreground classes of the model (checked before training
        and when a bundle is written or used)."""
        check_label_values(self.postprocess_largest_component, num_classes, key="postprocess_largest_component")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
