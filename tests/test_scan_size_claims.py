"""A scan's header is checked before memory is allocated for its voxels (segpipe.io.check_scan_size).

A hostile or broken header can claim any shape: nibabel allocates the whole claim on the first data
access, before it finds the file short. These tests build tiny files claiming big volumes and
measure, with tracemalloc (numpy reports its buffers to it), that reading them fails with one error
naming the file, the claim and the file's size, having allocated almost nothing.
"""
import gzip
import tracemalloc

import nibabel as nib
import numpy as np
import pytest

import segpipe.io
from segpipe.io import DEFLATE_MAX_RATIO, MAX_VOXELS, ScanSizeError, read_nifti

MiB = 2**20


def _claim(path, shape, dtype=np.float32, data=b""):
    """A NIfTI file whose header claims ``shape`` of ``dtype`` but holds only ``data`` after it."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header["vox_offset"] = 352
    blob = header.binaryblock + b"\0" * 4 + data
    path.write_bytes(gzip.compress(blob) if path.name.endswith(".gz") else blob)
    return path


def _peak_bytes(fn):
    """(what fn returned, or the exception it raised; peak traced allocation in bytes)."""
    tracemalloc.start()
    try:
        out = fn()
    except Exception as exc:  # noqa: BLE001 - returned to the test
        out = exc
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return out, peak


def test_a_tiny_gzip_file_claiming_381_mib_is_refused_before_anything_is_allocated(tmp_path):
    path = _claim(tmp_path / "claim.nii.gz", (1000, 1000, 100))
    size = path.stat().st_size
    assert size < 100
    error, peak = _peak_bytes(lambda: read_nifti(path))
    assert isinstance(error, ScanSizeError) and isinstance(error, ValueError)
    assert peak < 2 * MiB
    assert str(error) == (
        f"{path}: Expected a gzip file that can hold the voxels its header claims (at most {DEFLATE_MAX_RATIO}x its "
        f"size). Received: header=shape (1000, 1000, 100) float32: 100000000 voxels, 381.5 MiB (400000000 bytes) "
        f"(file: {size} bytes).")


def test_the_measurement_sees_the_allocation_the_check_prevents(tmp_path):
    """Control: nibabel itself, reading such a file (a 16 MiB claim here), allocates the claim first."""
    path = _claim(tmp_path / "claim.nii.gz", (256, 256, 64))
    error, peak = _peak_bytes(lambda: np.asarray(nib.load(str(path)).dataobj))
    assert isinstance(error, Exception) and peak >= 16 * MiB
    error, peak = _peak_bytes(lambda: read_nifti(path))
    assert isinstance(error, ScanSizeError) and peak < 2 * MiB


def test_ten_billion_voxels_is_refused_with_the_size_named(tmp_path):
    path = _claim(tmp_path / "huge.nii.gz", (2000, 2000, 2500), np.int16)
    error, peak = _peak_bytes(lambda: read_nifti(path))
    assert isinstance(error, ScanSizeError) and peak < 2 * MiB
    message = str(error)
    assert message.startswith(f"{path}: Expected at most {MAX_VOXELS} voxels (segpipe.io.MAX_VOXELS; ")
    assert ("Received: header=shape (2000, 2000, 2500) int16: 10000000000 voxels, 18.6 GiB (20000000000 bytes)"
            in message)
    assert "MemoryError" not in message


def test_a_short_uncompressed_file_is_refused_naming_offset_and_data_bytes(tmp_path):
    path = _claim(tmp_path / "short.nii", (100, 100, 100), data=b"\0" * 1000)
    error, peak = _peak_bytes(lambda: read_nifti(path))
    assert isinstance(error, ScanSizeError) and peak < 2 * MiB
    assert str(error) == (
        f"{path}: Expected a file that holds the voxels its header claims (at least data offset 352 + 4000000 data "
        f"bytes). Received: header=shape (100, 100, 100) float32: 1000000 voxels, 3.8 MiB (4000000 bytes) "
        f"(file: 1352 bytes).")


def test_the_cap_is_an_argument_and_a_module_setting(tmp_path, monkeypatch):
    path = tmp_path / "small.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), str(path))
    assert read_nifti(path).array.shape == (4, 4, 4)
    with pytest.raises(ScanSizeError, match=r"Expected at most 63 voxels .* 64 voxels, 256 bytes"):
        read_nifti(path, max_voxels=63)
    monkeypatch.setattr(segpipe.io, "MAX_VOXELS", 10)
    with pytest.raises(ScanSizeError, match="at most 10 voxels"):
        read_nifti(path)
    assert read_nifti(path, max_voxels=64).array.shape == (4, 4, 4)


def test_real_files_pass_even_when_they_compress_extremely_well(tmp_path):
    """All zeros at zlib's best compression come within 0.5 % of deflate's limit: never refused."""
    for name, array in (("zeros.nii", np.zeros((8, 8, 8), np.uint8)),
                        ("noise.nii.gz", np.random.default_rng(0).normal(size=(9, 8, 7)))):
        nib.save(nib.Nifti1Image(array, np.eye(4)), str(tmp_path / name))
        assert read_nifti(tmp_path / name).array.shape == array.shape
    shape = (128, 128, 128)
    path = tmp_path / "zeros.nii.gz"
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.float32)
    header["vox_offset"] = 352
    path.write_bytes(gzip.compress(header.binaryblock + b"\0" * (4 + 4 * 128**3), compresslevel=9))
    ratio = (352 + 4 * 128**3) / path.stat().st_size
    assert 1000 < ratio < DEFLATE_MAX_RATIO
    assert read_nifti(path).array.shape == shape


def test_the_dataset_check_names_a_size_claim_without_reading_voxels(tmp_path):
    from data import make_dataset

    from segpipe.data.checks import check_dataset
    from segpipe.data.layouts import load_dataset

    root = make_dataset(tmp_path / "ds", "msd")
    _claim(root / "imagesTr" / "case_001.nii.gz", (1000, 1000, 100))
    _claim(root / "labelsTr" / "case_002.nii.gz", (2000, 2000, 2500), np.uint8)
    for read_data in (False, True):
        problems, peak = _peak_bytes(lambda read_data=read_data: check_dataset(load_dataset(root), read_data=read_data))
        assert peak < 4 * MiB
        assert [(p.kind, p.path.name) for p in problems] == [("size-claim", "case_001.nii.gz"),
                                                             ("size-claim", "case_002.nii.gz")]
        assert "381.5 MiB (400000000 bytes)" in problems[0].received
        assert "10000000000 voxels" in problems[1].received and "at most" in problems[1].expected
