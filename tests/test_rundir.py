"""RunDir: the one owner of a run directory's paths, its checkpoint resolver and its file readers."""
from __future__ import annotations

import pytest

from segpipe.config import load_config
from segpipe.data.preprocess import PreprocessSettings
from segpipe.runs.rundir import RunDir, find_last_checkpoint


def _checkpoint(folder):
    folder.mkdir(parents=True)
    (folder / "model.keras").write_text("weights")
    (folder / "state.json").write_text('{"epoch": 1}')
    return folder


def test_of_config_nests_experiments(tmp_path):
    config = load_config(None, [f"output_dir={tmp_path}", "name=a"])
    assert RunDir.of(config).path == tmp_path / "a"
    config = load_config(None, [f"output_dir={tmp_path}", "name=a", "experiment=exp"])
    assert RunDir.of(config).path == tmp_path / "exp" / "a"


def test_model_file_prefers_best_then_final_and_resolves_each_name(tmp_path):
    run = RunDir(tmp_path / "run")
    run.checkpoints_dir.mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="checkpoints/best.keras or model.keras"):
        run.model_file()
    run.final_model.write_text("final")
    assert run.model_file() == ("final", run.final_model)
    with pytest.raises(FileNotFoundError, match=r"Received: model='best' \(no such file\)"):
        run.model_file("best")
    run.best_model.write_text("best")
    assert run.model_file() == ("best", run.best_model)
    assert run.model_file("final") == ("final", run.final_model)
    with pytest.raises(FileNotFoundError, match="'last' model"):
        run.model_file("last")
    _checkpoint(run.last_checkpoint_dir)
    assert run.model_file("last") == ("last", run.last_checkpoint_dir / "model.keras")
    other = tmp_path / "elsewhere.keras"
    other.write_text("x")
    assert run.model_file(str(other)) == ("file", other)
    with pytest.raises(ValueError,
                       match=r"Expected one of \['best', 'last', 'final'\] or a .keras file. Received: model='latest'"):
        run.model_file("latest")


def test_last_checkpoint_falls_back_to_the_old_folder_of_an_interrupted_swap(tmp_path):
    run = RunDir(tmp_path)
    assert run.last_checkpoint() is None
    old = _checkpoint(tmp_path / "checkpoints" / "last.old")
    assert run.last_checkpoint() == old == find_last_checkpoint(run.last_checkpoint_dir)
    (run.last_checkpoint_dir).mkdir()
    (run.last_checkpoint_dir / "model.keras").write_text("half written, no state.json")
    assert run.last_checkpoint() == old  # an incomplete folder is never used


def test_files_round_trip_through_the_writers_and_readers(tmp_path):
    run = RunDir(tmp_path / "run")
    assert (run.status(), run.split(), run.preprocessing(), run.history()) == (None, None, None, [])
    assert not run.is_run()
    config = load_config(None, [f"output_dir={tmp_path}"])
    run.write_config(config)
    run.write_split({"train": ["a"], "val": ["b"]})
    settings = PreprocessSettings(target_spacing_mm=(1.0, 1.0, 2.5), normalization="zscore_nonzero")
    run.write_preprocessing(settings)
    run.write_status("running")
    assert run.is_run() and run.config().to_dict() == config.to_dict()
    assert run.split() == {"train": ["a"], "val": ["b"]}
    assert run.preprocessing() == settings
    assert run.status() == "running"
    with pytest.raises(ValueError, match="Received: status='done'"):
        run.write_status("done")


def test_a_bad_preprocessing_file_names_the_file_and_the_key(tmp_path):
    run = RunDir(tmp_path)
    run.preprocessing_json.write_text('{"target_spacing": [1, 1, 1]}')
    with pytest.raises(ValueError,
                       match=r"preprocessing.json: Expected a key of preprocessing settings \(target_spacing_mm, "
                             r".*\)\. Received: target_spacing=\[1, 1, 1\]\. Did you mean 'target_spacing_mm'\?$"):
        run.preprocessing()


def test_config_of_a_folder_that_is_no_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="Expected a run directory with config.yaml"):
        RunDir(tmp_path).config()
