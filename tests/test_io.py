"""segpipe.io: atomic writes; a full disk or a read-only folder while writing the cache or a checkpoint.

Each failure is simulated where it happens on a real disk: the write has started (half a file is on
disk) when the OS says ENOSPC, or the temporary file cannot be created (EROFS). The error must name
the file, and the previous complete file (or cache entry, or checkpoint) must still be there.
Predictions: tests/test_bad_inputs.py (it has the bundle).
"""
import errno
import json
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
from process_helpers import REPO

import segpipe.io
from segpipe.errors import StorageError
from segpipe.io import atomic_path, explain_write_errors, remove_orphaned_temporaries, save_npy, write_nifti, write_text

NO_SPACE = "No space left on device"
READ_ONLY = "Read-only file system"


def test_atomic_writes_get_the_mode_of_an_ordinary_write(tmp_path):
    write_text(tmp_path / "a.txt", "x")
    (tmp_path / "b.txt").write_text("x")
    assert os.stat(tmp_path / "a.txt").st_mode == os.stat(tmp_path / "b.txt").st_mode


def test_an_interrupted_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "a.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def _killed_writes(folder, names):
    """Temporary files of writes whose process died before the rename (os._exit: no clean-up runs)."""
    script = ("import os, sys; from segpipe.io import atomic_path\n"
              "writes = [atomic_path(os.path.join(sys.argv[1], name)) for name in sys.argv[2:]]\n"
              "for write in writes: write.__enter__().write_text('half')\n"
              "os._exit(0)")  # the writes stay referenced: a collected one would clean up after itself
    subprocess.run([sys.executable, "-c", script, str(folder), *names], check=True, timeout=60,
                   env={**os.environ, "PYTHONPATH": str(REPO)})
    return sorted(p.name for p in folder.rglob(".*.tmp*"))


def test_temporaries_of_killed_writes_are_removed_and_those_of_running_writers_kept(tmp_path):
    (tmp_path / "overlays").mkdir()
    (tmp_path / "case.1.nii.gz").write_text("complete")
    orphans = _killed_writes(tmp_path, ["case.1.nii.gz", "per_case.csv", "overlays/case.png"])
    assert len(orphans) == 3 and any(name.startswith(".case.1.nii.") for name in orphans)
    foreign = tmp_path / ".notes.tmp.txt"  # not one of segpipe's names: left alone
    foreign.write_text("someone else's")
    with atomic_path(tmp_path / "summary.json") as running:
        running.write_text("{}")
        removed = remove_orphaned_temporaries(tmp_path)
        assert sorted(p.name for p in removed) == [n for n in orphans if not n.endswith(".png")]
        assert running.is_file()  # this process still writes it
        assert [p.name for p in remove_orphaned_temporaries(tmp_path, recursive=True)] == [
            n for n in orphans if n.endswith(".png")]
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == [
        ".notes.tmp.txt", "case.1.nii.gz", "summary.json"]
    assert remove_orphaned_temporaries(tmp_path / "missing") == []


def _disk_full_after_half(real):
    """A writer that puts half a file on disk, then fails as a full disk does."""
    def write(array_or_image, path, *args, **kwargs):
        if isinstance(array_or_image, (str, os.PathLike)):  # np.save(path, array)
            array_or_image, path = path, array_or_image
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise OSError(errno.ENOSPC, NO_SPACE)
    return write


def _read_only(*args, **kwargs):
    raise OSError(errno.EROFS, READ_ONLY)


def test_a_full_disk_while_writing_nifti_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    target = tmp_path / "pred" / "case.nii.gz"
    write_nifti(target, np.ones((4, 4, 4), np.uint8), np.eye(4))
    before = target.read_bytes()
    monkeypatch.setattr(segpipe.io.nifti.nib, "save", _disk_full_after_half(nib.save))
    with pytest.raises(StorageError) as info:
        write_nifti(target, np.zeros((4, 4, 4), np.uint8), np.eye(4))
    assert str(info.value) == (f"Expected free space and a writable folder for this file. Received: path={target} "
                               f"({NO_SPACE}). Nothing was half-written: an earlier version of the "
                               "file, if any, is unchanged.")
    assert target.read_bytes() == before
    assert [p.name for p in target.parent.iterdir()] == ["case.nii.gz"]  # the half-written temporary is gone


def test_a_read_only_folder_names_the_file_and_other_errors_pass_unchanged(tmp_path, monkeypatch):
    monkeypatch.setattr(segpipe.io.durable, "tempfile", SimpleNamespace(mkstemp=_read_only))  # io.durable only
    with pytest.raises(StorageError, match=re.escape(f"Received: path={tmp_path / 'a.npy'} ({READ_ONLY}).")):
        save_npy(tmp_path / "a.npy", np.zeros(3))
    assert not list(tmp_path.iterdir())
    with pytest.raises(OSError) as info, explain_write_errors(tmp_path / "b"):
        raise OSError(errno.EIO, "Input/output error")  # a failing disk, not a full one: not reworded
    assert type(info.value) is OSError


# ---------------------------------------------------------------- the preprocessing cache


def _dataset(root):
    """An MSD dataset of two 10×9×8 cases."""
    from segpipe.data.layouts import load_dataset

    entries = []
    for i in range(2):
        label = np.zeros((10, 9, 8), np.uint8)
        label[2:6, 2:6, 2:6] = 1
        image = (label * 10 + np.random.default_rng(i).normal(50, 5, label.shape)).astype(np.float32)
        for folder, array in (("imagesTr", image), ("labelsTr", label)):
            (root / folder).mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(array, np.eye(4)), str(root / folder / f"case_{i}.nii.gz"))
        entries.append({"image": f"imagesTr/case_{i}.nii.gz", "label": f"labelsTr/case_{i}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "organ"}, "training": entries}))
    return load_dataset(root)


def test_a_full_disk_while_caching_names_the_file_and_keeps_the_complete_cases(tmp_path, monkeypatch):
    from segpipe.data.cache import build_cache, case_key, load_cached_case
    from segpipe.data.preprocess import PreprocessSettings

    dataset = _dataset(tmp_path / "ds")
    settings, cache = PreprocessSettings(), tmp_path / "cache"
    build_cache(dataset, cache, settings, progress=False)
    key = {c.case_id: case_key(c, settings, extra={"max_locations_per_class": 10_000}) for c in dataset.cases}
    os.utime(dataset.cases[1].image_paths[0], ns=(1, 1))  # case_1 changed: it is rebuilt, case_0 reused
    changed = case_key(dataset.cases[1], settings, extra={"max_locations_per_class": 10_000})

    real_save = np.save
    def full_on_labels(path, array, *args, **kwargs):
        return (_disk_full_after_half(real_save) if "label" in str(path) else real_save)(path, array, *args, **kwargs)

    monkeypatch.setattr(segpipe.io.files.np, "save", full_on_labels)
    with pytest.raises(StorageError) as info:
        build_cache(dataset, cache, settings, progress=False)
    assert f"Received: path={cache / 'case_1' / 'label.npy'} ({NO_SPACE})." in str(info.value)
    assert load_cached_case(cache / "case_0", key=key["case_0"]) is not None  # complete before: still trusted
    assert load_cached_case(cache / "case_1", key=changed) is None  # never trusted half-built
    assert not [p for p in cache.rglob("*") if ".tmp" in p.name]
    assert json.loads((cache / "settings.json").read_text())["cache_version"] >= 1

    monkeypatch.setattr(segpipe.io.files.np, "save", real_save)  # space again: the same call completes the cache
    cases = build_cache(dataset, cache, settings, progress=False)
    assert [c.case_id for c in cases] == ["case_0", "case_1"] and cases[1].meta["key"] == changed


def test_a_read_only_cache_folder_is_one_error_naming_it(tmp_path, monkeypatch):
    from segpipe.data.cache import build_cache
    from segpipe.data.preprocess import PreprocessSettings

    dataset = _dataset(tmp_path / "ds")
    monkeypatch.setattr(segpipe.io.durable, "tempfile", SimpleNamespace(mkstemp=_read_only))  # io.durable only
    message = (f"Expected free space and a writable folder for this file. "
               f"Received: path={tmp_path / 'cache' / 'settings.json'} ({READ_ONLY}).")
    with pytest.raises(StorageError, match="^" + re.escape(message)):
        build_cache(dataset, tmp_path / "cache", PreprocessSettings(), progress=False)


# ---------------------------------------------------------------- checkpoints (segpipe.training.checkpoints)


def test_a_read_only_folder_while_saving_the_best_model_keeps_the_previous_one(compiled_model, tmp_path, monkeypatch):
    from segpipe.training.checkpoints import save_model_atomic

    best = tmp_path / "checkpoints" / "best.keras"
    save_model_atomic(compiled_model, best)
    before = best.read_bytes()

    def read_only_midway(path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"half a model")
        raise OSError(errno.EROFS, READ_ONLY)

    monkeypatch.setattr(compiled_model, "save", read_only_midway)
    with pytest.raises(StorageError, match=re.escape(f"Received: output_dir={best} ({READ_ONLY}).") + ".*--resume"):
        save_model_atomic(compiled_model, best)
    assert best.read_bytes() == before
    assert [p.name for p in best.parent.iterdir()] == ["best.keras"]


def test_a_full_disk_while_writing_the_checkpoint_state_keeps_the_previous_checkpoint(compiled_model, tmp_path,
                                                                                      monkeypatch):
    from pathlib import Path

    from segpipe.runs.rundir import find_last_checkpoint
    from segpipe.training.checkpoints import read_state, save_checkpoint

    folder = tmp_path / "checkpoints" / "last"
    save_checkpoint(folder, compiled_model, {"epoch": 1})
    real_write_text = Path.write_text

    def full_on_state(self, text, *args, **kwargs):
        if self.name.startswith(".state."):  # the temporary state.json inside last.tmp/
            real_write_text(self, text[: len(text) // 2])
            raise OSError(errno.ENOSPC, NO_SPACE)
        return real_write_text(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_on_state)
    with pytest.raises(StorageError, match=rf"{NO_SPACE}.*--resume"):
        save_checkpoint(folder, compiled_model, {"epoch": 2})
    monkeypatch.undo()
    assert read_state(find_last_checkpoint(folder)) == {"epoch": 1}
    assert sorted(p.name for p in folder.parent.iterdir()) == ["last"]
