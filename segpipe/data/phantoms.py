"""Synthetic phantom datasets in Medical Segmentation Decathlon layout.

Each case is a noisy 3D "MRI" volume with a smooth multiplicative bias field and two touching
foreground structures of different sizes: a lumpy ellipsoid ``organ`` (label 1) and a smaller
``lesion`` (label 2) centred on the organ's surface. Shapes, orientations and positions are random
per case but fully determined by ``(seed, case index)``, so the same settings always give the same
dataset. Geometry is built in millimetres, so anisotropic spacing gives the same anatomy sampled
differently.

:func:`write_lesion_phantom_dataset` writes a second kind, for region-based training: two input
channels and a lesion of three nested classes (BraTS-like: 1 edema ⊃ 2 core ⊃ 3 enhancing, declared
as the regions whole ⊃ core ⊃ enhancing in an nnU-Net v2 ``dataset.json``), optionally sparsely
annotated (only every n-th axial slice, the others the ignore label).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from segpipe.io import durable_replace, write_json, write_nifti
from segpipe.errors import Received, expected

CLASS_NAMES = {0: "background", 1: "organ", 2: "lesion"}


@dataclass(frozen=True)
class PhantomSettings:
    """What a phantom dataset looks like; every field changes the generated data."""

    num_cases: int = 24
    shape: tuple[int, int, int] = (48, 48, 48)
    spacing_mm: tuple[float, float, float] = (1.0, 1.0, 1.0)
    seed: int = 0
    noise_std: float = 0.25  # relative to the organ/background contrast of 1.0


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma_vox: np.ndarray) -> np.ndarray:
    """Zero-mean, unit-std random field that varies on a scale of ``sigma_vox`` voxels."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=sigma_vox, mode="wrap")
    return (field - field.mean()) / (field.std() + 1e-12)


def make_phantom_case(index: int, settings: PhantomSettings) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(image float32, label uint8)`` of case ``index``, both of shape ``settings.shape``."""
    rng = np.random.default_rng([settings.seed, index])
    shape = tuple(settings.shape)
    spacing = np.asarray(settings.spacing_mm, dtype=np.float64)
    extent_mm = np.asarray(shape) * spacing
    coords = np.stack(np.meshgrid(*[(np.arange(n) + 0.5) * s for n, s in zip(shape, spacing)], indexing="ij"), -1)

    # Organ: a randomly rotated ellipsoid, lumpy through a smooth radial perturbation.
    # Radii as fractions of the field of view put the foreground at roughly 3-10% of the voxels.
    radii = extent_mm.min() * rng.uniform(0.20, 0.26, size=3)
    centre = extent_mm * rng.uniform(0.38, 0.62, size=3)
    rotation = Rotation.random(random_state=rng).as_matrix()
    local = (coords - centre) @ rotation
    radial = np.sqrt(((local / radii) ** 2).sum(-1))
    lumps = 0.12 * _smooth_noise(rng, shape, sigma_vox=6.0 / spacing)
    organ = radial < 1.0 + lumps

    # Lesion: a smaller sphere centred on a random point of the organ's surface, so the two touch.
    surface = organ & ~ndimage.binary_erosion(organ)
    surface_points = np.argwhere(surface)
    lesion_centre = (surface_points[rng.integers(len(surface_points))] + 0.5) * spacing
    lesion_radius = extent_mm.min() * rng.uniform(0.09, 0.13)
    lesion = np.sqrt(((coords - lesion_centre) ** 2).sum(-1)) < lesion_radius

    label = np.zeros(shape, dtype=np.uint8)
    label[organ] = 1
    label[lesion] = 2

    # Intensities: background 0, organ 1, lesion 1.6 with a texture, noise and a smooth bias field.
    image = np.choose(label, [0.0, 1.0, 1.6]).astype(np.float64)
    image += 0.15 * _smooth_noise(rng, shape, sigma_vox=2.0 / spacing)
    image += settings.noise_std * rng.standard_normal(shape)
    bias = np.exp(0.2 * _smooth_noise(rng, shape, sigma_vox=extent_mm / 3.0 / spacing))
    image = 100.0 + 200.0 * image * bias  # an MRI-like intensity range, not z-scored
    return image.astype(np.float32), label


def write_phantom_dataset(root: str | os.PathLike, settings: PhantomSettings = PhantomSettings()) -> Path:
    """Generate a phantom dataset in MSD layout at ``root`` and return ``root``.

    The dataset is written into a temporary folder beside ``root`` and renamed into place at the
    end, so an interrupted generation never leaves a partial dataset behind.
    """
    from tqdm import tqdm

    root = Path(root)
    tmp = _new_dataset_folder(root)
    try:
        affine = np.diag([*settings.spacing_mm, 1.0])
        training = []
        for i in tqdm(range(settings.num_cases), desc="Generating phantoms", unit="case"):
            image, label = make_phantom_case(i, settings)
            name = f"phantom_{i:03d}.nii.gz"
            write_nifti(tmp / "imagesTr" / name, image, affine)
            write_nifti(tmp / "labelsTr" / name, label, affine)
            training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        write_json(
            tmp / "dataset.json",
            {
                "name": "segpipe-phantoms",
                "description": "Synthetic phantoms generated by segpipe (data_prep/make_phantoms.py)",
                "tensorImageSize": "3D",
                "licence": "CC0",
                "modality": {"0": "MRI"},
                "labels": {str(k): v for k, v in CLASS_NAMES.items()},
                "numTraining": settings.num_cases,
                "numTest": 0,
                "training": training,
                "test": [],
                "segpipe_phantom_settings": {
                    "num_cases": settings.num_cases,
                    "shape": list(settings.shape),
                    "spacing_mm": list(settings.spacing_mm),
                    "seed": settings.seed,
                    "noise_std": settings.noise_std,
                },
            },
        )
        durable_replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


LESION_REGIONS = {"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enhancing": 3}
"""The regions of the lesion phantom, in nnU-Net v2's ``dataset.json`` syntax (regions_class_order [1, 2, 3])."""
LESION_IGNORE = 4
"""The ignore label of a sparsely annotated lesion phantom."""


def make_lesion_phantom_case(index: int, settings: PhantomSettings) -> tuple[np.ndarray, np.ndarray]:
    """``(image (X, Y, Z, 2) float32, label uint8)`` of lesion phantom case ``index``.

    Three nested lumpy spheres: edema (1) around a core (2) around an enhancing centre (3). Channel 0
    ("FLAIR"-like) shows the whole lesion, brighter in the core; channel 1 ("T1c"-like) shows only
    the enhancing part clearly, so telling core from enhancing needs both channels.
    """
    rng = np.random.default_rng([settings.seed, 7_919, index])
    shape = tuple(settings.shape)
    spacing = np.asarray(settings.spacing_mm, dtype=np.float64)
    extent_mm = np.asarray(shape) * spacing
    coords = np.stack(np.meshgrid(*[(np.arange(n) + 0.5) * s for n, s in zip(shape, spacing)], indexing="ij"), -1)
    centre = extent_mm * rng.uniform(0.4, 0.6, size=3)
    distance = np.sqrt(((coords - centre) ** 2).sum(-1)) / extent_mm.min()
    lumps = 0.03 * _smooth_noise(rng, shape, sigma_vox=4.0 / spacing)
    radii = np.sort(rng.uniform([0.26, 0.16, 0.07], [0.32, 0.21, 0.11]))[::-1]  # edema > core > enhancing
    label = np.zeros(shape, dtype=np.uint8)
    for value, radius in zip((1, 2, 3), radii):
        label[distance + lumps < radius] = value
    flair = np.choose(label, [0.0, 1.0, 1.4, 1.4])
    t1c = np.choose(label, [0.0, 0.1, 0.2, 1.5])
    image = np.stack([flair, t1c], axis=-1)
    image += 0.1 * np.stack([_smooth_noise(rng, shape, sigma_vox=2.0 / spacing) for _ in range(2)], -1)
    image += settings.noise_std * rng.standard_normal(image.shape)
    return (100.0 + 200.0 * image).astype(np.float32), label


def write_lesion_phantom_dataset(root: str | os.PathLike, settings: PhantomSettings = PhantomSettings(), *,
                                 annotate_every: int = 1) -> Path:
    """Generate the 2-channel lesion phantom in nnU-Net v2 layout with regions at ``root``; return ``root``.

    Parameters
    ----------
    root : path-like
        A new folder (written beside it and renamed into place, as :func:`write_phantom_dataset`).
    settings : PhantomSettings
        Cases, shape, spacing, seed and noise.
    annotate_every : int, optional
        1 (default): every voxel annotated. n > 1: only every n-th axial slice is annotated; the
        others hold the ignore label ``LESION_IGNORE`` (declared as ``"ignore"`` in dataset.json).

    Returns
    -------
    Path
        ``root``.
    """
    if isinstance(annotate_every, bool) or not isinstance(annotate_every, int) or annotate_every < 1:
        raise ValueError(expected("an integer >= 1", key="annotate_every", received=annotate_every))
    root = Path(root)
    tmp = _new_dataset_folder(root)
    try:
        affine = np.diag([*settings.spacing_mm, 1.0])
        for i in range(settings.num_cases):
            image, label = make_lesion_phantom_case(i, settings)
            if annotate_every > 1:
                unannotated = np.ones(label.shape[2], bool)
                unannotated[::annotate_every] = False
                label[:, :, unannotated] = LESION_IGNORE
            for c in range(image.shape[-1]):
                write_nifti(tmp / "imagesTr" / f"lesion_{i:03d}_{c:04d}.nii.gz", image[..., c], affine)
            write_nifti(tmp / "labelsTr" / f"lesion_{i:03d}.nii.gz", label, affine)
        labels = dict(LESION_REGIONS, **({"ignore": LESION_IGNORE} if annotate_every > 1 else {}))
        write_json(tmp / "dataset.json", {
            "name": "segpipe-lesion-phantoms",
            "description": "Synthetic 2-channel lesion phantoms with nested regions, generated by segpipe",
            "channel_names": {"0": "FLAIR", "1": "T1c"},
            "labels": labels,
            "regions_class_order": [1, 2, 3],
            "numTraining": settings.num_cases,
            "file_ending": ".nii.gz",
        })
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def _new_dataset_folder(root: Path) -> Path:
    """A temporary folder beside ``root`` to write a phantom dataset into (renamed onto ``root`` at the end);
    ``root`` must not exist."""
    if root.exists():
        raise FileExistsError(expected("a new folder for the phantom dataset", key="root",
                                       received=Received(f"{root} (exists)")))
    root.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
