"""What prediction writes: the files of a case (label map, probabilities), the probabilities' formats,
and the check that an output folder may be written before any scan is segmented."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from segpipe.data.layouts import Case, is_reference_label_folder
from segpipe.errors import Received, expected
from segpipe.io import atomic_path, explain_write_errors, write_nifti

PROBABILITY_FORMATS = ("nifti", "npz")
PROBABILITY_DTYPES = ("float16", "float32")


def write_probabilities(path: Path, probabilities: np.ndarray, affine: np.ndarray, *, class_names: Sequence[str],
                        dtype: str = "float16") -> Path:
    """Write per-class probabilities (X, Y, Z, C) on the scan's grid, atomically; the format by the suffix.

    ``.nii.gz``: a 4-D image with the scan's affine, channel c = class c; NIfTI-1 has no float16, so
    ``dtype="float16"`` stores 16-bit unsigned integers with the header's scale factor (about
    1/65535: finer than float16, read back as floating point).
    ``.npz`` (compressed): ``probabilities`` (X, Y, Z, C) in ``dtype``, ``affine`` (4×4 float64) and
    ``class_names``. float16 halves the size; its resolution is ~5e-4 near 1, so the argmax of stored
    probabilities can differ from the label map only where two classes are within that.
    """
    if not path.name.endswith(".npz"):
        write_nifti(path, np.asarray(probabilities, np.float32), affine,
                    dtype=np.uint16 if dtype == "float16" else None)
        return path
    array = np.asarray(probabilities).astype(dtype, copy=False)
    with explain_write_errors(path), atomic_path(path) as tmp:
        np.savez_compressed(tmp, probabilities=array, affine=np.asarray(affine, np.float64),
                            class_names=np.asarray(list(class_names)))
    return path


def checked_probability_format(save: bool | str, dtype: str) -> str | None:
    """The probability file format asked for (``None``: none), with ``dtype`` checked."""
    if dtype not in PROBABILITY_DTYPES:
        raise ValueError(expected(f"one of {PROBABILITY_DTYPES}", key="probabilities_dtype", received=dtype))
    if save is False or save is None:
        return None
    if save is True:
        return "nifti"
    if save not in PROBABILITY_FORMATS:
        raise ValueError(expected(f"one of {PROBABILITY_FORMATS}", key="--save-probabilities", received=save))
    return save


def output_files(case: Case, output_dir: Path, *, save_probabilities: str | None = None) -> list[Path]:
    """The files :func:`segpipe.inference.segment.predict_files` writes for ``case``: ``CASE.nii.gz`` (and
    ``CASE_probabilities.nii.gz`` or ``.npz`` for ``save_probabilities`` ``"nifti"`` / ``"npz"``)."""
    suffix = {"nifti": ".nii.gz", "npz": ".npz"}.get(save_probabilities or "")
    return [output_dir / f"{case.case_id}.nii.gz",
            *([output_dir / f"{case.case_id}_probabilities{suffix}"] if suffix else [])]


def check_output(cases: Sequence[Case], output_dir: str | os.PathLike, *, overwrite: bool = False,
                 save_probabilities: str | None = None) -> None:
    """Refuse an output folder prediction must not write into, before any scan is segmented.

    Parameters
    ----------
    cases : sequence of Case
        The scans to segment (:func:`segpipe.inference.segment.find_cases`).
    output_dir : path
        Where the label maps would go.
    overwrite : bool
        Whether existing label maps of these cases may be replaced.
    save_probabilities : str or None
        Whether probability maps are written too (their files are checked as well).

    Raises
    ------
    ValueError
        ``output_dir`` holds an input scan, or is a dataset's reference label folder
        (:func:`segpipe.data.layouts.is_reference_label_folder`); ``overwrite`` does not change this.
    FileExistsError
        Without ``overwrite``: an output file exists (the first few named, and their count).
    """
    output_dir = Path(output_dir)
    inputs = {p.resolve() for c in cases for p in c.image_paths}
    held = sorted(str(p) for p in inputs if p.parent == output_dir.resolve())
    if held:
        raise ValueError(expected(
            "an output folder other than an input folder (outputs would replace inputs)",
            key="--output", received=Received(f"{output_dir} (holds {len(held)} input(s): {', '.join(held[:3])}"
                                              f"{', ...' if len(held) > 3 else ''})")))
    if is_reference_label_folder(output_dir):
        raise ValueError(expected(
            "an output folder other than a dataset's reference label maps", key="--output",
            received=Received(f"{output_dir} (a dataset's label folder)"),
            hint="Predictions would replace the reference label maps of the same name: choose another folder.",
        ))
    if overwrite:
        return
    existing = [str(p) for c in cases for p in output_files(c, output_dir, save_probabilities=save_probabilities)
                if p.exists() or p.is_symlink()]
    if existing:
        shown = ", ".join(existing[:3]) + (", ..." if len(existing) > 3 else "")
        raise FileExistsError(expected(
            "output files that do not exist yet", key="--output",
            received=Received(f"{output_dir} (holds {len(existing)} of them: {shown})"),
            hint="Nothing was written. Pass --overwrite (overwrite=True) to replace them, or choose another folder.",
        ))
