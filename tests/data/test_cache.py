import os

import numpy as np
import pytest

from segpipe.data import cache as cache_module
from segpipe.data.cache import build_cache, load_cached_case
from segpipe.data.layouts import load_dataset
from segpipe.data.preprocess import PreprocessSettings, preprocess_case

from . import make_case, make_dataset, save

SETTINGS = PreprocessSettings(target_spacing_mm=(1.0, 1.0, 1.5))


@pytest.fixture
def dataset(tmp_path):
    return load_dataset(make_dataset(tmp_path / "raw", "msd", num_cases=3))


def test_cache_writes_arrays_meta_and_locations(dataset, tmp_path, count_preprocessing):
    cached = build_cache(dataset, tmp_path / "cache", SETTINGS, progress=False)
    assert [c.case_id for c in cached] == ["case_000", "case_001", "case_002"]
    case = cached[0]
    image, label = case.load_image(), case.load_label()
    assert isinstance(image, np.memmap) and image.dtype == np.float32 and image.ndim == 4
    assert label.dtype == np.uint8 and label.shape == image.shape[:3]
    expected = preprocess_case(dataset.cases[0], SETTINGS)
    np.testing.assert_array_equal(image, expected.image)
    for key in ("original_shape", "original_affine", "original_spacing_mm", "original_orientation", "crop_box",
                "target_spacing_mm", "spacing_mm", "affine", "key"):
        assert key in case.meta
    for cls, voxels in case.locations.items():
        assert cls in (1, 2) and len(voxels) == np.count_nonzero(label == cls)
        assert np.all(label[tuple(voxels.T)] == cls)


def test_unchanged_cache_is_reused(dataset, tmp_path, count_preprocessing):
    build_cache(dataset, tmp_path / "cache", SETTINGS, progress=False)
    before = os.stat(tmp_path / "cache" / "case_000" / "image.npy").st_mtime_ns
    assert len(count_preprocessing) == 3
    build_cache(dataset, tmp_path / "cache", SETTINGS, progress=False)
    assert len(count_preprocessing) == 3
    assert os.stat(tmp_path / "cache" / "case_000" / "image.npy").st_mtime_ns == before


def test_changed_setting_rebuilds_every_case(dataset, tmp_path, count_preprocessing):
    build_cache(dataset, tmp_path / "cache", SETTINGS, progress=False)
    cached = build_cache(dataset, tmp_path / "cache", PreprocessSettings(target_spacing_mm=(1.0, 1.0, 1.0)), progress=False)
    assert len(count_preprocessing) == 6
    assert cached[0].meta["target_spacing_mm"] == [1.0, 1.0, 1.0]


def test_changed_file_rebuilds_that_case(dataset, tmp_path, count_preprocessing):
    build_cache(dataset, tmp_path / "cache", SETTINGS, progress=False)
    image, _ = make_case(seed=42)
    path = save(dataset.cases[1].image_paths[0], image[..., 0] * 2)
    os.utime(path, ns=(1, 1))  # a different mtime even on coarse-timestamp filesystems
    cached = build_cache(dataset, tmp_path / "cache", SETTINGS, progress=False)
    assert count_preprocessing[3:] == ["case_001"]
    np.testing.assert_array_equal(cached[1].load_image(), preprocess_case(dataset.cases[1], SETTINGS).image)


def test_content_hash_ignores_touch_but_sees_edits(dataset, tmp_path, count_preprocessing):
    build_cache(dataset, tmp_path / "cache", SETTINGS, progress=False, hash_contents=True)
    os.utime(dataset.cases[0].image_paths[0], ns=(5, 5))
    build_cache(dataset, tmp_path / "cache", SETTINGS, progress=False, hash_contents=True)
    assert len(count_preprocessing) == 3


def test_interrupted_write_is_redone_and_not_trusted(dataset, tmp_path, count_preprocessing):
    cache_dir = tmp_path / "cache"
    build_cache(dataset, cache_dir, SETTINGS, progress=False)
    # case_000: killed after writing a new image, before its meta (meta deleted first by design).
    (cache_dir / "case_000" / "meta.json").unlink()
    (cache_dir / "case_000" / "image.npy").write_bytes(b"\x93NUMPY half")
    # case_001: a half-written temporary file left by a killed writer (999999999: no such process), and
    # one of a writer that still runs (another training building the case), which a rebuild keeps
    stale = cache_dir / "case_001" / ".image.999999999.abc123_x.tmp.npy"
    stale.write_bytes(b"\x93NUMPY")
    live = cache_dir / "case_001" / f".image.{os.getppid()}.abc123_x.tmp.npy"
    live.write_bytes(b"\x93NUMPY")
    # case_002: an array truncated behind an intact meta (disk trouble): the header check catches it.
    with open(cache_dir / "case_002" / "label.npy", "r+b") as f:
        f.truncate(100)
    assert load_cached_case(cache_dir / "case_000") is None
    assert load_cached_case(cache_dir / "case_002") is None
    assert load_cached_case(cache_dir / "case_001") is not None  # temp files are not the case's files
    cached = build_cache(dataset, cache_dir, SETTINGS, progress=False)
    assert sorted(count_preprocessing[3:]) == ["case_000", "case_002"]
    for case, source in zip(cached, dataset.cases):
        np.testing.assert_array_equal(case.load_label(), preprocess_case(source, SETTINGS).label)
    # A rebuild clears temporary leftovers in the case folder it rebuilds.
    (cache_dir / "case_001" / "meta.json").unlink()
    build_cache(dataset, cache_dir, SETTINGS, progress=False)
    assert not stale.exists() and live.exists()


def test_old_meta_is_removed_before_rebuilding(dataset, tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    build_cache(dataset, cache_dir, SETTINGS, progress=False)

    def crash(case, settings):
        raise KeyboardInterrupt  # the run dies in the middle of case_000

    monkeypatch.setattr(cache_module, "preprocess_case", crash)
    with pytest.raises(KeyboardInterrupt):
        build_cache(dataset, cache_dir, PreprocessSettings(), progress=False)
    assert not (cache_dir / "case_000" / "meta.json").exists()


def test_failures_are_listed_together(dataset, tmp_path):
    for case in dataset.cases[:2]:
        case.image_paths[0].write_bytes(b"not a nifti")
    with pytest.raises(ValueError, match=r"^Expected every case to preprocess\. Received: cases=2 failed\.\n  case_000: .*\n  case_001: "):
        build_cache(dataset, tmp_path / "cache", SETTINGS, progress=False)


def test_parallel_build_matches_serial(dataset, tmp_path):
    serial = build_cache(dataset, tmp_path / "a", SETTINGS, progress=False)
    parallel = build_cache(dataset, tmp_path / "b", SETTINGS, workers=2, progress=False)
    for a, b in zip(serial, parallel):
        np.testing.assert_array_equal(a.load_image(), b.load_image())
        np.testing.assert_array_equal(a.load_label(), b.load_label())
        assert a.meta["key"] == b.meta["key"]
