"""Durable writes: every rename that puts a result in place is preceded by an ``fsync`` of what is
renamed (the file, or every file and folder of a folder) and followed by an ``fsync`` of the folder
it lands in, so a power loss leaves the old version or the complete new one (docs/training.md).

The real writers run (cache build, checkpoint, best model, prediction, evaluation, history, the
phantom dataset folder) with ``os.fsync`` and ``os.replace`` wrapped to record, in order, which
file or folder each flush reached (its path, read back from ``/proc/self/fd``, and its inode, which
a rename keeps) and what each rename moved.
"""
import os
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import segpipe.io
from segpipe.io import durable_mkdir, durable_replace, fsync_directory, fsync_file, write_nifti

pytestmark = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd (Linux)")


class Recorder:
    """Records ``("fsync", path, inode)`` and ``("replace", src, dst, [(path, inode) moved])`` events, in order."""

    def __init__(self, monkeypatch):
        self.events: list[tuple] = []
        real_fsync, real_replace = os.fsync, os.replace

        def fsync(fd):
            stat = os.fstat(fd)
            self.events.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}")), (stat.st_dev, stat.st_ino)))
            return real_fsync(fd)

        def replace(src, dst, *args, **kwargs):
            src, dst = Path(src).resolve(), Path(dst).resolve()
            tree = [Path(folder) / name for folder, dirs, files in os.walk(src) for name in [*dirs, *files]]
            moved = [(p, (p.lstat().st_dev, p.lstat().st_ino)) for p in [src, *tree] if not p.is_symlink()]
            self.events.append(("replace", src, dst, moved))
            return real_replace(src, dst, *args, **kwargs)

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)

    def replaces(self) -> list[tuple]:
        return [e for e in self.events if e[0] == "replace"]

    def assert_durable(self, final_paths) -> None:
        """Every rename flushed all it moved before and its destination folder after; and each of
        ``final_paths`` was put in place by such a rename."""
        renamed = {e[2] for e in self.replaces()}
        for path in final_paths:
            assert Path(path).resolve() in renamed, f"{path} was not written by a rename"
        for i, event in enumerate(self.events):
            if event[0] != "replace":
                continue
            _, src, dst, moved = event
            flushed_before = {e[2] for e in self.events[:i] if e[0] == "fsync"}
            missing = [str(p) for p, inode in moved if inode not in flushed_before]
            assert not missing, f"renamed {src.name} -> {dst} without flushing {missing}"
            # the destination folder is flushed after this rename, before the next one
            following = self.events[i + 1:]
            end = next((j for j, e in enumerate(following) if e[0] == "replace"), len(following))
            assert any(e[0] == "fsync" and e[1] == dst.parent for e in following[:end]), \
                f"{dst.parent} not flushed after renaming onto {dst.name}"


@pytest.fixture
def recorder(monkeypatch):
    return Recorder(monkeypatch)


def test_the_recorder_sees_an_unflushed_rename(tmp_path, recorder):
    """The check can fail: a bare os.replace (what atomic writes did before) is caught."""
    (tmp_path / ".a.tmp").write_text("x")
    os.replace(tmp_path / ".a.tmp", tmp_path / "a.txt")
    with pytest.raises(AssertionError, match="without flushing"):
        recorder.assert_durable([tmp_path / "a.txt"])
    fsync_file(tmp_path / "a.txt")
    (tmp_path / ".b.tmp").write_text("x")
    fsync_file(tmp_path / ".b.tmp")
    os.replace(tmp_path / ".b.tmp", tmp_path / "b.txt")
    recorder.events = recorder.events[-2:]
    with pytest.raises(AssertionError, match="not flushed after"):
        recorder.assert_durable([tmp_path / "b.txt"])


def test_durable_replace_flushes_every_file_and_folder_of_a_tree(tmp_path, recorder):
    src = tmp_path / "staging" / "run.tmp"
    (src / "sub").mkdir(parents=True)
    (src / "a.bin").write_bytes(b"a")
    (src / "sub" / "b.bin").write_bytes(b"b")
    os.symlink("/nonexistent", src / "link")  # not followed, not flushed
    durable_replace(src, tmp_path / "run")
    recorder.assert_durable([tmp_path / "run"])
    assert len(recorder.replaces()[0][3]) == 4  # the folder, sub/, a.bin, sub/b.bin
    flushed = [e[1] for e in recorder.events if e[0] == "fsync"]
    # the folder the temporary left is flushed too (before and after), as is the destination's
    assert flushed.count(tmp_path / "staging") == 2 and tmp_path in flushed
    assert (tmp_path / "run" / "sub" / "b.bin").read_bytes() == b"b"


def test_fsync_of_a_folder_ignores_file_systems_that_cannot_and_reports_real_errors(tmp_path, monkeypatch):
    import errno

    def failing(code):
        def fsync(fd):
            raise OSError(code, os.strerror(code))
        return fsync

    monkeypatch.setattr(os, "fsync", failing(errno.EINVAL))
    fsync_directory(tmp_path)  # e.g. a network file system: nothing to do
    monkeypatch.setattr(os, "fsync", failing(errno.EIO))
    with pytest.raises(OSError, match="Input/output error"):
        fsync_directory(tmp_path)
    (tmp_path / "f").write_text("x")
    with pytest.raises(OSError, match="Input/output error"):
        fsync_file(tmp_path / "f")


def test_new_folders_are_recorded_in_their_parents(tmp_path, recorder):
    """A file flushed into a folder that is itself not on disk would vanish with it."""
    write_nifti(tmp_path / "a" / "b" / "c.nii.gz", np.ones((2, 2, 2), np.uint8), np.eye(4))
    flushed = [e[1] for e in recorder.events if e[0] == "fsync"]
    assert flushed[:2] == [tmp_path, tmp_path / "a"]  # each new folder's parent, outermost first
    recorder.events.clear()
    durable_mkdir(tmp_path / "a" / "b")  # nothing new: nothing flushed
    assert recorder.events == []


def test_a_folder_this_process_cannot_open_is_not_an_error_after_the_write(tmp_path, monkeypatch):
    real_open = os.open

    def no_read(path, flags, *args, **kwargs):
        if flags & getattr(os, "O_DIRECTORY", 0):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", no_read)
    write_nifti(tmp_path / "c.nii.gz", np.ones((2, 2, 2), np.uint8), np.eye(4))
    assert nib.load(tmp_path / "c.nii.gz").shape == (2, 2, 2)


def test_a_failed_flush_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    import errno

    write_nifti(tmp_path / "a.nii.gz", np.zeros((2, 2, 2), np.uint8), np.eye(4))

    def eio(fd):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", eio)
    with pytest.raises(OSError):
        write_nifti(tmp_path / "a.nii.gz", np.ones((2, 2, 2), np.uint8), np.eye(4))
    assert np.asarray(nib.load(tmp_path / "a.nii.gz").dataobj).max() == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.nii.gz"]


def test_a_prediction_written_with_nibabel_is_flushed_before_and_its_folder_after_the_rename(tmp_path, recorder):
    path = tmp_path / "preds" / "case_0.nii.gz"
    write_nifti(path, np.ones((3, 3, 3), np.uint8), np.eye(4))
    recorder.assert_durable([path])
    assert len(recorder.replaces()) == 1


def test_a_cache_entry_is_durable(tmp_path, monkeypatch):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_io import _dataset

    from segpipe.data.cache import build_cache
    from segpipe.data.preprocess import PreprocessSettings

    dataset = _dataset(tmp_path / "ds")
    recorder = Recorder(monkeypatch)
    build_cache(dataset, tmp_path / "cache", PreprocessSettings(target_spacing_mm=None), progress=False)
    case = tmp_path / "cache" / dataset.cases[0].case_id
    recorder.assert_durable([case / "image.npy", case / "label.npy", case / "locations.npy", case / "meta.json"])


def test_a_checkpoint_and_the_best_model_are_durable(compiled_model, tmp_path, recorder):
    from segpipe.training.checkpoints import save_checkpoint, save_model_atomic

    last = tmp_path / "checkpoints" / "last"
    save_checkpoint(last, compiled_model, {"epoch": 1})
    save_checkpoint(last, compiled_model, {"epoch": 2})  # the swap: last -> last.old, last.tmp -> last
    save_model_atomic(compiled_model, tmp_path / "best.keras")
    recorder.assert_durable([last, last.with_name("last.old"), last.with_name("last.tmp") / "state.json",
                             tmp_path / "best.keras"])
    # each checkpoint's folder swap moved a folder holding model.keras, each flushed beforehand
    folder_renames = [e for e in recorder.replaces() if e[2] == last]
    assert len(folder_renames) == 2 and all(any(p.name == "model.keras" for p, _ in e[3]) for e in folder_renames)


def test_history_and_evaluation_files_are_durable(tmp_path, recorder):
    from segpipe.evaluation.folders import evaluate_folders
    from segpipe.training.checkpoints import write_history_csv

    write_history_csv(tmp_path / "run" / "history.csv", [{"epoch": 1, "loss": 0.5}])
    label = np.zeros((6, 6, 6), np.uint8)
    label[1:4, 1:4, 1:4] = 1
    for folder in ("pred", "ref"):
        (tmp_path / folder).mkdir()
        nib.save(nib.Nifti1Image(label, np.eye(4)), str(tmp_path / folder / "c.nii.gz"))
    evaluate_folders(tmp_path / "pred", tmp_path / "ref", tmp_path / "eval", workers=1, report=False)
    recorder.assert_durable([tmp_path / "run" / "history.csv", tmp_path / "eval" / "per_case.csv",
                             tmp_path / "eval" / "summary.json"])


def test_the_phantom_dataset_folder_is_durable(tmp_path, recorder):
    from segpipe.data.phantoms import PhantomSettings, write_phantom_dataset

    root = write_phantom_dataset(tmp_path / "phantoms", PhantomSettings(num_cases=2, shape=(12, 12, 12)))
    recorder.assert_durable([root])
    # the folder rename moved (and first flushed) every scan written into it
    folder_rename = next(e for e in recorder.replaces() if e[2] == root.resolve())
    assert sum(p.name.endswith(".nii.gz") for p, _ in folder_rename[3]) == 4


def test_atomic_path_flushes_after_the_writer_closed_the_file(tmp_path, recorder, monkeypatch):
    """The flush comes after the third-party writer returned (the file is closed and complete)."""
    sizes = []
    real_fsync = os.fsync

    def fsync(fd):
        sizes.append(os.fstat(fd).st_size)
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    segpipe.io.save_npy(tmp_path / "a.npy", np.arange(1000, dtype=np.int64))
    assert sizes[0] == (tmp_path / "a.npy").stat().st_size > 8000


def test_a_bundle_and_every_file_in_it_are_durable(tmp_path, recorder):
    """The bundle folder is renamed into place (and an old one aside) only after every file in it was flushed."""
    from inference_helpers import PATCH, PREPROCESSING, tiny_architecture, tiny_model

    from segpipe.export.bundle import write_bundle

    model = tiny_model(depth=2, deep_supervision=False)
    for overwrite in (False, True):  # the second export swaps the first one aside
        out = write_bundle(model, tmp_path / "bundle", class_names=["bg", "a", "b"], preprocessing=PREPROCESSING,
                           patch_size=PATCH, architecture=tiny_architecture(depth=2, deep_supervision=False),
                           verify=False, openvino=False, segment=False, overwrite=overwrite)
    recorder.assert_durable([out])
    swaps = [e for e in recorder.replaces() if e[2] == out.resolve()]
    assert len(swaps) == 2 and any(p.name == "model.weights.h5" for p, _ in swaps[-1][3])
