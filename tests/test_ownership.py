"""segpipe deletes or replaces only what it created: ownership markers, train.py --overwrite, predict.py's
output folder. Each refusal leaves the foreign file, exits non-zero and writes nothing."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from segpipe.ownership import MARKER_NAME, check_replaceable, has_marker, remove_owned, write_marker


def snapshot(root: Path) -> dict[Path, bytes | None]:
    """Every path under ``root`` with its bytes (None for folders): what "nothing written" compares."""
    return {p.relative_to(root): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


# ---------------------------------------------------------------- the marker


def test_the_marker_is_small_json_of_its_kind(tmp_path):
    from segpipe import __version__

    write_marker(tmp_path / "run", "run")
    marker = json.loads((tmp_path / "run" / MARKER_NAME).read_text())
    assert marker["kind"] == "run" and marker["segpipe"] == __version__ and marker["created"].startswith("20")
    assert has_marker(tmp_path / "run", "run") and not has_marker(tmp_path / "run", "bundle")
    assert not has_marker(tmp_path / "nothing", "run")
    with pytest.raises(ValueError, match=r"Expected one of \['run', 'bundle', 'ensemble'\]. Received: kind='model'"):
        write_marker(tmp_path / "x", "model")


def test_only_a_marked_folder_of_the_kind_is_replaceable(tmp_path):
    check_replaceable(tmp_path / "missing", "run", key="--overwrite")  # nothing there: fine
    write_marker(tmp_path / "ours", "run")
    check_replaceable(tmp_path / "ours", "run", key="--overwrite")
    with pytest.raises(FileExistsError, match="bundle marker"):
        check_replaceable(tmp_path / "ours", "bundle", key="--overwrite")

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    for name in ["important.txt", *(f"note{i}.md" for i in range(6))]:
        (foreign / name).write_text("mine")
    (foreign / "sub").mkdir()
    with pytest.raises(FileExistsError) as info:
        check_replaceable(foreign, "run", key="--overwrite")
    message = str(info.value)
    assert message.startswith(f"Expected a folder segpipe created (with its run marker {MARKER_NAME})")
    assert (f"Received: --overwrite={foreign} (holds 8 entries: important.txt, note0.md, note1.md, note2.md, "
            "note3.md, ...)") in message
    assert message.endswith("segpipe only deletes folders it created: delete it by hand or choose another name.")

    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="a file, not a folder"):
        check_replaceable(tmp_path / "file", "run", key="--overwrite")
    (tmp_path / "link").symlink_to(tmp_path / "ours")  # a link to a marked folder is not the folder
    with pytest.raises(FileExistsError, match="a symbolic link"):
        check_replaceable(tmp_path / "link", "run", key="--overwrite")


def test_a_marker_that_is_a_link_or_damaged_does_not_count(tmp_path):
    write_marker(tmp_path / "ours", "run")
    other = tmp_path / "other"
    other.mkdir()
    (other / MARKER_NAME).symlink_to(tmp_path / "ours" / MARKER_NAME)
    assert not has_marker(other, "run")
    (tmp_path / "ours" / MARKER_NAME).write_text("{not json")
    assert not has_marker(tmp_path / "ours", "run")


def test_remove_owned_deletes_only_marked_folders(tmp_path):
    write_marker(tmp_path / "ours", "run")
    (tmp_path / "ours" / "history.csv").write_text("epoch\n")
    remove_owned(tmp_path / "ours", "run", key="--overwrite")
    assert not (tmp_path / "ours").exists()
    remove_owned(tmp_path / "ours", "run", key="--overwrite")  # gone already: nothing to do

    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "important.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="important.txt"):
        remove_owned(tmp_path / "foreign", "run", key="--overwrite")
    assert (tmp_path / "foreign" / "important.txt").read_text() == "keep me"


def test_a_run_directory_gets_its_marker_when_created(tmp_path):
    from segpipe.runs.rundir import RunDir

    run = RunDir(tmp_path / "runs" / "x")
    run.create()
    assert has_marker(run.path, "run")
    run.create()  # again (a resumed run): the marker stays
    assert has_marker(run.path, "run")


# ---------------------------------------------------------------- train.py --overwrite


def test_overwrite_refuses_a_folder_segpipe_did_not_create_before_any_work(tmp_path, tiny_overrides, capsys):
    import train

    folder = tmp_path / "runs" / "x"
    folder.mkdir(parents=True)
    (folder / "important.txt").write_text("keep me")
    before = snapshot(tmp_path)
    for args in (["--set", *tiny_overrides, "name=x"], ["--set", *tiny_overrides, "name=x", "--no-plan"]):
        assert train.main([*args, "--overwrite"]) == 1  # with planning (the default here) and without
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"--overwrite={folder} (holds 1 entry: important.txt)" in err
        assert "segpipe only deletes folders it created" in err
        assert snapshot(tmp_path) == before  # not even the plan or the data cache was written


def test_overwrite_refuses_a_fold_folder_of_a_sweep_before_training_any_run(tmp_path, tiny_overrides, capsys):
    import train

    fold = tmp_path / "runs" / "x_fold1"
    fold.mkdir(parents=True)
    (fold / "important.txt").write_text("keep me")
    before = snapshot(tmp_path)
    assert train.main(["--set", *tiny_overrides, "name=x", "--folds", "2", "--no-plan", "--overwrite"]) == 1
    assert "x_fold1 (holds 1 entry: important.txt)" in capsys.readouterr().err
    assert snapshot(tmp_path) == before  # fold 0 was not trained either


def test_the_python_api_refuses_too(tmp_path, tiny_overrides):
    from segpipe.config import load_config
    from segpipe.training.train import train

    folder = tmp_path / "runs" / "x"
    folder.mkdir(parents=True)
    (folder / "important.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="segpipe only deletes folders it created"):
        train(load_config(None, [*tiny_overrides, "name=x"]), overwrite=True)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["x"]
    assert (folder / "important.txt").read_text() == "keep me"


def test_resume_refuses_a_folder_that_is_no_run(tmp_path, tiny_overrides, capsys):
    import train

    folder = tmp_path / "runs" / "x"
    folder.mkdir(parents=True)
    (folder / "important.txt").write_text("keep me")
    before = snapshot(tmp_path)
    assert train.main(["--set", *tiny_overrides, "name=x", "--no-plan", "--resume"]) == 1
    assert "a folder segpipe did not create" in capsys.readouterr().err
    assert snapshot(tmp_path) == before


def test_resume_from_another_folder_finds_the_run_where_it_is(tmp_path, tiny_overrides, monkeypatch, capsys):
    """``output_dir: runs`` (relative): ``--resume RUN_DIR`` from elsewhere trains in RUN_DIR, not in
    ``./runs/<name>`` of the current folder."""
    import train
    from segpipe.config import load_config
    from segpipe.runs.rundir import RunDir

    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    home.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(home)
    config = load_config(None, [*tiny_overrides, "output_dir=runs", "name=r"])
    run = RunDir.of(config)
    run.create()
    run.write_config(config)
    run.write_status("finished")
    monkeypatch.chdir(elsewhere)
    assert train.main(["--resume", str(home / "runs" / "r")]) == 0
    assert f"Run {home / 'runs' / 'r'} has already finished" in capsys.readouterr().out
    assert list(elsewhere.iterdir()) == []  # before: a new run started in elsewhere/runs/r

    from segpipe.training.train import _located

    located = _located(config, RunDir(home / "runs" / "r"))
    assert located.output_dir == str(home / "runs") and config.output_dir == "runs"  # the data cache's home


# ---------------------------------------------------------------- predict.py's output folder


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, phantom_root):
    """A bundle of a tiny untrained model (Keras format only is read before the refusals)."""
    from inference_helpers import make_run_dir, tiny_model

    from segpipe.export.run_export import export_run

    root = tmp_path_factory.mktemp("ownership_bundle")
    run_dir = make_run_dir(root, tiny_model(depth=2), phantom_root, depth=2)
    return export_run(run_dir, root / "bundle", checkpoint="best", verify=False)  # the formats: test_export.py


def _dataset_copy(phantom_root: Path, root: Path, n: int = 2) -> Path:
    """An MSD dataset folder with ``n`` cases (copies), and a folders-layout one beside it."""
    import shutil

    data = json.loads((phantom_root / "dataset.json").read_text())
    data["training"] = data["training"][:n]
    ds = root / "ds"
    for entry in data["training"]:
        for key in ("image", "label"):
            (ds / entry[key]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(phantom_root / entry[key], ds / entry[key])
    (ds / "dataset.json").write_text(json.dumps(data))
    folders = root / "folders"
    shutil.copytree(ds / "imagesTr", folders / "images")
    shutil.copytree(ds / "labelsTr", folders / "labels")
    return ds


def test_predict_refuses_reference_and_input_folders_even_with_overwrite(bundle, tmp_path, phantom_root, capsys):
    import predict

    ds = _dataset_copy(phantom_root, tmp_path)
    before = snapshot(tmp_path)
    cases = [
        (ds / "imagesTr", ds / "labelsTr", "a dataset's label folder"),  # the example (MSD)
        (ds / "imagesTr", tmp_path / "folders" / "labels", "a dataset's label folder"),  # folders layout
        (ds / "imagesTr", ds / "imagesTr", "holds 2 input(s)"),
    ]
    for inputs, output, says in cases:
        for extra in ([], ["--overwrite"]):
            assert predict.main(["--model", str(bundle), "--input", str(inputs), "--output", str(output),
                                 "--quiet", *extra]) == 1
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and says in err and f"--output={output}" in err, err
    assert snapshot(tmp_path) == before  # the reference label maps are untouched


def test_predict_refuses_to_replace_an_output_file_without_overwrite(bundle, tmp_path, phantom_root, capsys):
    import predict
    from segpipe.io import read_nifti

    ds = _dataset_copy(phantom_root, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    case = sorted((ds / "imagesTr").iterdir())[0]
    mine = out / case.name
    mine.write_bytes(b"someone's file")
    args = ["--model", str(bundle), "--input", str(ds / "imagesTr"), "--output", str(out), "--quiet"]
    assert predict.main(args) == 1
    err = capsys.readouterr().err
    assert f"--output={out} (holds 1 of them: {mine})" in err and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == [case.name] and mine.read_bytes() == b"someone's file"

    assert predict.main([*args, "--overwrite"]) == 0
    assert read_nifti(mine).array.dtype == np.uint8 and len(list(out.iterdir())) == 2


def test_predict_files_takes_overwrite_too(bundle, tmp_path, phantom_root):
    from segpipe.inference.segment import predict_files

    ds = _dataset_copy(phantom_root, tmp_path, n=1)
    out = tmp_path / "out"
    out.mkdir()
    scan = next((ds / "imagesTr").iterdir())
    (out / scan.name.replace(".nii.gz", "_probabilities.nii.gz")).write_text("x")
    # the probabilities file is in the way only when probabilities are written
    with pytest.raises(FileExistsError, match="_probabilities.nii.gz"):
        predict_files(bundle, scan, out, save_probabilities=True, progress=False)
    assert predict_files(bundle, scan, out, progress=False) == [out / scan.name]
    with pytest.raises(FileExistsError, match="output files that do not exist yet"):
        predict_files(bundle, scan, out, progress=False)
    assert predict_files(bundle, scan, out, progress=False, overwrite=True) == [out / scan.name]
    assert os.path.getsize(out / scan.name) > 0
