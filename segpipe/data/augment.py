"""Data augmentation on NumPy arrays, each transform with its own probability and range.

Arrays are channels-last: image (X, Y, Z, C) float32, label (X, Y, Z) integer. Every random
choice comes from the ``np.random.Generator`` passed in, so a seeded generator gives the same
result every time, whatever the thread or process that runs it.

Spatial transforms (small rotations, scaling, elastic deformation) are composed into one
coordinate map and applied in one interpolation: spline order ``order`` for the image, nearest
neighbour for the label, from the same coordinates, so the two stay aligned. When sampling
patches, :class:`segpipe.data.sampling.PatchSampler` evaluates this map directly on the cached
volume around the patch centre, so rotated patches have real data in their corners instead of
padding. Defaults follow nnU-Net v2's training transforms, except: elastic deformation and 90°
rotations are off, and spatial transforms interpolate the image linearly (MONAI's ``RandAffine``
default) rather than cubically, about 3x faster for the same training value; set ``order=3`` for
nnU-Net's choice.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from itertools import combinations
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation as _Rotation

from segpipe.data.spatial import warp
from segpipe.errors import SettingError
from segpipe.settings import UnknownKeyError, is_number


def _check_type(value: Any, default: Any, key: str, where: str | None) -> None:
    """A number where the default is a number, a list of numbers where it is a tuple."""
    if isinstance(default, tuple):
        if not isinstance(value, (list, tuple)) or not all(is_number(v) for v in value):
            raise SettingError(key, f"a list of numbers like {list(default)}", value, where=where)
    elif not is_number(value):
        raise SettingError(key, f"a number like {default}", value, where=where)


def _check_p(name: str, key: str, p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise SettingError(f"{name}.{key}", "a probability in [0, 1]", p)


def _check_range(name: str, key: str, value: Sequence[float], *, positive: bool = False) -> tuple[float, float]:
    value = tuple(float(v) for v in value)
    if len(value) != 2 or value[0] > value[1] or (positive and value[0] <= 0):
        need = "0 < low <= high" if positive else "low <= high"
        raise SettingError(f"{name}.{key}", f"[low, high] with {need}", list(value))
    return value


@dataclass(frozen=True)
class Mirror:
    """Flip each of ``axes`` with probability ``p`` (independently)."""

    p: float = 0.5
    axes: tuple[int, ...] = (0, 1, 2)


@dataclass(frozen=True)
class Rot90:
    """With probability ``p``, rotate by k·90° (k in 1..3) in one plane of ``axes`` whose patch sides are equal."""

    p: float = 0.0
    axes: tuple[int, ...] = (0, 1, 2)


@dataclass(frozen=True)
class Rotation:
    """With probability ``p``, rotate about each of ``axes`` by an angle drawn from ``range_deg``."""

    p: float = 0.2
    range_deg: tuple[float, float] = (-30.0, 30.0)
    axes: tuple[int, ...] = (0, 1, 2)


@dataclass(frozen=True)
class Scaling:
    """With probability ``p``, zoom by a factor drawn from ``range`` (>1 enlarges the content)."""

    p: float = 0.2
    range: tuple[float, float] = (0.7, 1.4)


@dataclass(frozen=True)
class Elastic:
    """With probability ``p``, a smooth random displacement field: Gaussian-smoothed noise with
    ``sigma_vox``, scaled so its largest displacement is drawn from ``magnitude_vox`` voxels."""

    p: float = 0.0
    magnitude_vox: tuple[float, float] = (0.0, 4.0)
    sigma_vox: tuple[float, float] = (9.0, 13.0)


@dataclass(frozen=True)
class Gamma:
    """With probability ``p``: rescale to [0, 1], raise to a power from ``range``, restore mean and std.
    Before it, with probability ``invert_p``, the same on the inverted image (nnU-Net does both)."""

    p: float = 0.3
    range: tuple[float, float] = (0.7, 1.5)
    invert_p: float = 0.1


@dataclass(frozen=True)
class Brightness:
    """With probability ``p``, multiply each channel by a factor from ``range``."""

    p: float = 0.15
    range: tuple[float, float] = (0.75, 1.25)


@dataclass(frozen=True)
class Contrast:
    """With probability ``p``, stretch each channel about its mean by a factor from ``range``,
    clipped to the channel's original value range."""

    p: float = 0.15
    range: tuple[float, float] = (0.75, 1.25)


@dataclass(frozen=True)
class Noise:
    """With probability ``p``, add Gaussian noise with a variance drawn from ``variance``."""

    p: float = 0.1
    variance: tuple[float, float] = (0.0, 0.1)


@dataclass(frozen=True)
class Blur:
    """With probability ``p``, Gaussian-blur each channel with a sigma (voxels) from ``sigma_vox``."""

    p: float = 0.2
    sigma_vox: tuple[float, float] = (0.5, 1.0)


@dataclass(frozen=True)
class AugmentSettings:
    """All augmentations with their probabilities and ranges; ``order`` is the image's spline order
    for spatial transforms (labels always use nearest neighbour). Defaults to 1 (linear)."""

    mirror: Mirror = field(default_factory=Mirror)
    rot90: Rot90 = field(default_factory=Rot90)
    rotation: Rotation = field(default_factory=Rotation)
    scaling: Scaling = field(default_factory=Scaling)
    elastic: Elastic = field(default_factory=Elastic)
    gamma: Gamma = field(default_factory=Gamma)
    brightness: Brightness = field(default_factory=Brightness)
    contrast: Contrast = field(default_factory=Contrast)
    noise: Noise = field(default_factory=Noise)
    blur: Blur = field(default_factory=Blur)
    order: int = 1

    def __post_init__(self) -> None:
        for f in fields(self):
            spec = getattr(self, f.name)
            if f.name == "order":
                if spec not in range(6):
                    raise SettingError("order", "an integer spline order in 0..5", spec)
                continue
            _check_p(f.name, "p", spec.p)
            for g in fields(spec):
                value = getattr(spec, g.name)
                if g.name == "invert_p":
                    _check_p(f.name, g.name, value)
                elif g.name == "axes":
                    axes = tuple(int(a) for a in value)
                    if any(a not in (0, 1, 2) for a in axes):
                        raise SettingError(f"{f.name}.axes", "spatial axes among (0, 1, 2)", list(value))
                    object.__setattr__(spec, "axes", axes)
                elif g.name != "p":
                    positive = f.name in ("scaling", "gamma", "brightness") or g.name == "sigma_vox"
                    object.__setattr__(spec, g.name, _check_range(f.name, g.name, value, positive=positive))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, *, where: str | None = None,
                  prefix: str = "") -> "AugmentSettings":
        """Build from a mapping like ``{"rotation": {"p": 0.2, "range_deg": [-15, 15]}, "order": 1}``;
        missing entries keep their defaults (``None``: all defaults).

        The one check of augmentation settings (the config's ``data.augment`` is checked here too):
        unknown transforms and keys name the closest valid one, a number must be a number and a range a
        list of numbers, then each transform's own checks run.

        Parameters
        ----------
        data : mapping or None
            Transform name -> its settings, and ``order``.
        where : str, optional
            The file the settings came from (named first in an error).
        prefix : str
            The settings' key path (``"data.augment."`` in a config), put in front of the key an error names.

        Raises
        ------
        SettingError
            Naming ``prefix`` + the key (``data.augment.rotation.p``).
        """
        kinds = {f.name: f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for name, spec in dict(data or {}).items():
            if name not in kinds:
                raise UnknownKeyError(prefix, str(name), list(kinds), spec, where=where, section=None if prefix else "augment settings")
            key = f"{prefix}{name}"
            if name == "order":
                if isinstance(spec, bool) or not isinstance(spec, int):
                    raise SettingError(key, "an integer spline order in 0..5", spec, where=where)
                kwargs[name] = spec
                continue
            if not isinstance(spec, Mapping):
                raise SettingError(key, "a mapping like {p: 0.2, ...}", spec, where=where)
            defaults = kinds[name].default_factory()
            allowed = [g.name for g in fields(defaults)]
            for sub, value in spec.items():
                if sub not in allowed:
                    raise UnknownKeyError(f"{key}.", str(sub), allowed, value, where=where)
                _check_type(value, getattr(defaults, sub), f"{key}.{sub}", where)
            kwargs[name] = type(defaults)(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()})
        try:
            return cls(**kwargs)
        except SettingError as exc:  # keyed by "rotation.p": add the path once
            raise exc.with_prefix(prefix, where=where) from None

    @classmethod
    def disabled(cls) -> "AugmentSettings":
        """Every augmentation off (p = 0)."""
        off = {f.name: type(getattr(cls(), f.name))(p=0.0) for f in fields(cls) if f.name != "order"}
        off["gamma"] = Gamma(p=0.0, invert_p=0.0)
        return cls(**off)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Augmenter:
    """Applies :class:`AugmentSettings` to one sample; all randomness from the generator passed in."""

    def __init__(self, settings: AugmentSettings | None = None):
        self.settings = settings if settings is not None else AugmentSettings()

    def __call__(self, image: np.ndarray, label: np.ndarray | None, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
        """Augment a whole sample; the output has the input's shape (rotations may bring in zeros at corners)."""
        shape = image.shape[:3]
        coords = self.spatial_coords(shape, rng)
        if coords is not None:
            centre = (np.asarray(shape, float) - 1) / 2
            image, label = warp(image, label, coords + centre[:, None, None, None], order=self.settings.order)
        return self.augment_patch(image, label, rng)

    def spatial_coords(self, patch_size: Sequence[int], rng: np.random.Generator) -> np.ndarray | None:
        """Draw the spatial transform for a patch: source offsets from the patch centre, shape (3, X, Y, Z).

        Returns ``None`` when no spatial transform was drawn (then plain slicing is exact and fastest).
        The same number of draws is taken from ``rng`` whatever fires (the elastic field has its own
        stream), so later transforms see the same random numbers with or without a spatial transform.
        """
        s = self.settings
        do_rot, do_scale, do_elastic = (rng.random() < s.rotation.p, rng.random() < s.scaling.p, rng.random() < s.elastic.p)
        angles = np.deg2rad(rng.uniform(*s.rotation.range_deg, size=3))
        zoom = rng.uniform(*s.scaling.range)
        magnitude = rng.uniform(*s.elastic.magnitude_vox)
        sigma = rng.uniform(*s.elastic.sigma_vox)
        elastic_rng = np.random.default_rng(rng.integers(2**63))  # its own stream: see docstring
        if not (do_rot or do_scale or do_elastic):
            return None
        size = np.asarray(patch_size)
        grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) - (n - 1) / 2 for n in size], indexing="ij"))
        if do_elastic:
            # Smoothing in place of a per-voxel random field: displacements vary over ~sigma voxels.
            fields_ = [ndimage.gaussian_filter(elastic_rng.uniform(-1, 1, size).astype(np.float32), sigma, mode="constant") for _ in range(3)]
            peak = max(float(np.abs(f).max()) for f in fields_) or 1.0
            grid = grid + np.stack(fields_) * (magnitude / peak)
        matrix = np.eye(3)
        if do_rot:
            rotvec = np.zeros(3)
            for axis in s.rotation.axes:  # Euler angle i rotates about array axis i
                rotvec[axis] = 1.0
            matrix = _Rotation.from_euler("xyz", angles * rotvec).as_matrix()
        if do_scale:
            matrix = matrix / zoom  # sampling a smaller region enlarges the content
        return np.einsum("ij,j...->i...", matrix.astype(np.float32), grid)

    def augment_patch(self, image: np.ndarray, label: np.ndarray | None, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
        """Intensity transforms on the image, then mirroring and 90° rotations on both."""
        s = self.settings
        image = np.array(image, dtype=np.float32, copy=True)
        channels = image.shape[-1]
        if rng.random() < s.noise.p:
            std = math.sqrt(rng.uniform(*s.noise.variance))
            image += rng.normal(0.0, std, size=image.shape).astype(np.float32)
        if rng.random() < s.blur.p:
            sigma = rng.uniform(*s.blur.sigma_vox)
            for c in range(channels):
                image[..., c] = ndimage.gaussian_filter(image[..., c], sigma)
        if rng.random() < s.brightness.p:
            image *= rng.uniform(*s.brightness.range, size=channels).astype(np.float32)
        if rng.random() < s.contrast.p:
            factors = rng.uniform(*s.contrast.range, size=channels)
            for c in range(channels):
                x = image[..., c]
                lo, hi, mean = x.min(), x.max(), x.mean()
                image[..., c] = np.clip((x - mean) * factors[c] + mean, lo, hi)
        if rng.random() < s.gamma.invert_p:
            image = -_gamma(-image, rng.uniform(*s.gamma.range, size=channels))
        if rng.random() < s.gamma.p:
            image = _gamma(image, rng.uniform(*s.gamma.range, size=channels))
        for axis in s.mirror.axes:
            if rng.random() < s.mirror.p:
                image = np.flip(image, axis)
                label = np.flip(label, axis) if label is not None else None
        if rng.random() < s.rot90.p:
            planes = [(a, b) for a, b in combinations(s.rot90.axes, 2) if image.shape[a] == image.shape[b]]
            k = int(rng.integers(1, 4))
            if planes:
                plane = planes[int(rng.integers(len(planes)))]
                image = np.rot90(image, k, axes=plane)
                label = np.rot90(label, k, axes=plane) if label is not None else None
        image = np.ascontiguousarray(image, dtype=np.float32)
        label = np.ascontiguousarray(label) if label is not None else None
        return image, label


def _gamma(image: np.ndarray, gammas: np.ndarray) -> np.ndarray:
    """Per channel: rescale to [0, 1], apply x**gamma, rescale back and restore mean and std."""
    out = np.empty_like(image)
    for c in range(image.shape[-1]):
        x = image[..., c]
        mean, std, lo, hi = x.mean(), x.std(), x.min(), x.max()
        span = max(float(hi - lo), 1e-7)
        y = np.power((x - lo) / span, gammas[c]) * span + lo
        y_std = y.std()
        out[..., c] = (y - y.mean()) / max(float(y_std), 1e-7) * std + mean
    return out
