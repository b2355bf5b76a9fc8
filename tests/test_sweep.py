"""Sweeps: train.py with several configs (x folds) into an experiment folder; skip, failure, resume,
k-fold run names and splits, and evaluate.py --compare on the result."""
from __future__ import annotations

import csv
import json
import os
import signal
from pathlib import Path

import pytest
import yaml

import evaluate
import train
from segpipe.config import ConfigError, load_config, to_yaml
from segpipe.runs.rundir import RunDir
from segpipe.training.checkpoints import RunCheckpoint
from segpipe.training.interrupts import TrainingInterrupted
from segpipe.training.sweep import comparability_warning, plan_runs, run_sweep
from segpipe.training.train import check_resumed_config


def write_config(folder: Path, name: str, loss: dict | None = None) -> Path:
    path = folder / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"loss": loss or {"name": "dice", "include_background": False}}))
    return path


def read_rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def status(run_dir: Path) -> str:
    return json.loads((run_dir / "status.json").read_text())["status"]


# ---------------------------------------------------------------- planning and bookkeeping (no training)


def test_plan_expands_folds_into_named_runs_of_the_experiment(tmp_path):
    configs = [load_config(write_config(tmp_path, n), [f"output_dir={tmp_path / 'runs'}", "experiment=exp"])
               for n in ("dice", "iou")]
    runs = plan_runs(configs, folds=3)
    assert [(r.name, r.data.folds, r.data.fold) for r in runs] == [
        ("dice_fold0", 3, 0), ("dice_fold1", 3, 1), ("dice_fold2", 3, 2),
        ("iou_fold0", 3, 0), ("iou_fold1", 3, 1), ("iou_fold2", 3, 2)]
    assert RunDir.of(runs[4]).path == tmp_path / "runs" / "exp" / "iou_fold1"
    assert [r.name for r in plan_runs(configs, folds=3, only_folds=[2])] == ["dice_fold2", "iou_fold2"]
    assert [r.name for r in plan_runs(configs)] == ["dice", "iou"]  # no k-fold: one run per config
    from_config = load_config(write_config(tmp_path, "ce"), ["data.folds=2"])
    assert [r.name for r in plan_runs([from_config])] == ["ce_fold0", "ce_fold1"]  # data.folds in the config
    with pytest.raises(ConfigError, match=r"Expected a fold in 0..2 \(data.folds=3\). Received: data.fold=3"):
        plan_runs(configs, folds=3, only_folds=[3])
    with pytest.raises(ConfigError,
                       match=r"^Expected k-fold training \(--folds K or data\.folds in .*\)\. Received: "
                             r"--fold=\d( \d)* without folds\.$"):
        plan_runs(configs, only_folds=[0])
    with pytest.raises(ConfigError, match=r"^Expected a number of folds >= 2\. Received: --folds=1\.$"):
        plan_runs(configs, folds=1)
    assert comparability_warning(plan_runs(configs, folds=2)) is None
    reseeded = load_config(write_config(tmp_path, "tversky"), ["seed=1"])
    assert "will not share a split" in comparability_warning([configs[0], reseeded])
    twin = load_config(write_config(tmp_path / "other", "dice"), [f"output_dir={tmp_path / 'runs'}", "experiment=exp"])
    with pytest.raises(ConfigError,
                       match=r"^Expected a different run name for every config of a sweep\. Received: name='dice' "
                             r"twice \(both would train into .*\)\. Set `name:` in one of the files\.$"):
        plan_runs([configs[0], twin])


def test_sweep_skips_finished_reports_failures_and_goes_on(tmp_path, capsys):
    runs = [load_config(None, [f"output_dir={tmp_path}", f"name={n}"]) for n in ("done", "broken", "next", "later")]
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "status.json").write_text('{"status": "finished"}')
    trained = []

    def fake_train(config, *, resume, overwrite):
        if config.name == "broken":
            raise RuntimeError("out of memory in layer 3")
        trained.append(config.name)
        return RunDir.of(config).path

    outcomes, code = run_sweep(runs, train_fn=fake_train)
    assert code == 1 and trained == ["done", "next", "later"]  # train() itself skips a finished run
    assert [(o.name, o.status) for o in outcomes] == [("done", "skipped"), ("broken", "failed"), ("next", "finished"),
                                                       ("later", "finished")]
    out, err = capsys.readouterr()
    assert "error: broken: RuntimeError: out of memory in layer 3" in err and "Traceback" in err
    assert "Sweep summary: 2 finished, 1 skipped, 1 failed" in out
    assert "skipped     done" in out and "(already finished)" in out
    assert "failed      broken" in out and "(RuntimeError: out of memory in layer 3)" in out
    assert "add --resume to continue unfinished runs" in out

    def interrupted_train(config, *, resume, overwrite):
        if config.name == "next":
            raise TrainingInterrupted(RunDir.of(config).path, signal.SIGTERM, 1, 2)
        return RunDir.of(config).path

    outcomes, code = run_sweep(runs, train_fn=interrupted_train)
    assert code == 128 + signal.SIGTERM
    assert [o.status for o in outcomes] == ["skipped", "finished", "interrupted", "not started"]
    out = capsys.readouterr().out
    assert "1 interrupted, 1 not started" in out and "run the same command again with --resume" in out


def test_a_run_resumes_only_with_the_config_it_was_started_with(tmp_path):
    config = load_config(None, [f"output_dir={tmp_path}", "name=r", "train.epochs=3"])
    check_resumed_config(tmp_path / "r", config)  # nothing saved yet: nothing to compare
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.yaml").write_text(to_yaml(config))
    check_resumed_config(tmp_path / "r", config)
    edited = load_config(None, [f"output_dir={tmp_path}", "name=r", "train.epochs=5", "loss.name=iou"])
    with pytest.raises(ConfigError,
                       match=r"/r: Expected the config the run was started with \(.*/r/config\.yaml\), to resume it\. "
                             r"Received: config=changes "
                       r"loss.name: 'dice' -> 'iou'; train.epochs: 3 -> 5\. Undo them, or use --overwrite"):
        check_resumed_config(tmp_path / "r", edited)


# ---------------------------------------------------------------- train.py on the tiny phantoms


def test_interrupted_and_failed_runs_in_a_sweep(tiny_overrides, tmp_path, monkeypatch, capsys):
    configs = [str(write_config(tmp_path / "configs", "first")),
               str(write_config(tmp_path / "configs", "bad", {"name": "dice", "class_weights": [1, 2, 3, 4, 5]})),
               str(write_config(tmp_path / "configs", "second"))]
    command = ["--config", *configs, "--set", *tiny_overrides, "train.export_bundle=false", "--experiment", "exp"]
    exp = tmp_path / "runs" / "exp"

    def ctrl_c_in_first(self, batch, logs=None):  # Ctrl-C in the second epoch of run "first"
        if self.run.path.name == "first" and len(self.rows) == 1 and batch == 0:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(RunCheckpoint, "on_train_batch_end", ctrl_c_in_first, raising=False)
    assert train.main(command) == 128 + signal.SIGINT
    monkeypatch.undo()
    assert status(exp / "first") == "interrupted" and not (exp / "second").exists()
    assert "1 interrupted, 2 not started" in capsys.readouterr().out

    # again without --resume: the interrupted run is left alone (reported), the bad config fails, the next trains
    assert train.main(command) == 1
    out, err = capsys.readouterr()
    assert ("error: first: Expected a new or finished run directory. Received: run_dir=" in err
            and "first (holds an unfinished run). Use --resume" in err)
    assert "error: bad: " in err and "loss.class_weights" in err
    assert status(exp / "first") == "interrupted" and status(exp / "second") == "finished"
    assert "Sweep summary: 1 finished, 2 failed" in out

    # with --resume: the interrupted run continues from its checkpoint, the finished one is skipped
    assert train.main([*command, "--resume"]) == 1
    out, err = capsys.readouterr()
    assert "Resuming" in out and status(exp / "first") == "finished"
    assert [r["epoch"] for r in read_rows(exp / "first" / "history.csv")] == ["1", "2"]
    assert "Sweep summary: 1 finished, 1 skipped, 1 failed" in out
    assert "error: bad: " in err and "loss.class_weights" in err


def test_folds_sweep_then_compare_the_experiment(tiny_overrides, tmp_path, phantom_root, capsys, fit_skipped):
    configs = [str(write_config(tmp_path / "configs", "dice")),
               str(write_config(tmp_path / "configs", "iou", {"name": "iou", "include_background": False}))]
    # no epochs (fit_skipped): what is checked is the runs' names, order and splits, and that the experiment
    # folder they make can be compared; each run still prepares its data, writes its split and saves its
    # (untrained) model, which evaluate.py --compare predicts with. Training itself: test_train_e2e.py.
    assert train.main(["--config", *configs, "--set", *tiny_overrides, "train.export_bundle=false",
                       "inference.mirror_axes=[]", "--experiment", "exp", "--folds", "2"]) == 0
    exp = tmp_path / "runs" / "exp"
    assert sorted(p.name for p in exp.iterdir()) == ["dice_fold0", "dice_fold1", "iou_fold0", "iou_fold1"]
    assert fit_skipped == ["dice_fold0", "dice_fold1", "iou_fold0", "iou_fold1"]  # config by config, folds in order
    assert all(status(exp / name) == "finished" for name in fit_skipped)
    cases = {p.name.split(".")[0] for p in (phantom_root / "imagesTr").iterdir()}
    for name in ("dice", "iou"):
        splits = [json.loads((exp / f"{name}_fold{k}" / "splits.json").read_text()) for k in (0, 1)]
        assert [s["fold"] for s in splits] == [0, 1]
        assert not set(splits[0]["val"]) & set(splits[1]["val"])  # disjoint validation sets
        assert set(splits[0]["val"]) | set(splits[1]["val"]) == cases  # every case validated once
        assert set(splits[0]["val"]) == set(splits[1]["train"])
    assert "Sweep summary: 4 finished" in capsys.readouterr().out

    assert evaluate.main(["--compare", str(exp), "--workers", "1"]) == 0
    result = json.loads((exp / "comparison" / "comparison.json").read_text())
    assert result["configs"] == ["dice", "iou"] and result["reference"] == "dice"
    assert {t["n"] for t in result["tests"]} == {len(cases)}  # pooled over folds: every case, out of fold
    rows = read_rows(exp / "comparison" / "comparison.csv")
    assert {r["run"] for r in rows} == {"dice_fold0", "dice_fold1", "iou_fold0", "iou_fold1"}
    assert (exp / "comparison" / "report.md").is_file()
    recommendation = json.loads((exp / "comparison" / "recommendation.json").read_text())
    assert (recommendation["n_cases"] == len(cases)
            and {recommendation["best"], recommendation["runner_up"]} == {"dice", "iou"})
