"""Shared fixtures: small generated datasets and tiny configs, so tests never need real data."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
from tiny_runs import tiny_run_overrides

if os.environ.get("PYTEST_XDIST_WORKER"):
    # one worker process per core (-n auto): one TensorFlow thread each (their subprocesses inherit it), so the
    # two workers do not fight over both cores with two thread pools each (inter-op threads stay: collectives need them)
    for _variable in ("TF_NUM_INTRAOP_THREADS", "OMP_NUM_THREADS"):
        os.environ.setdefault(_variable, "1")

import segpipe  # noqa: E402, F401  (sets TensorFlow's environment before any test imports it)
from segpipe.data.phantoms import PhantomSettings, write_phantom_dataset

TINY_PHANTOMS = PhantomSettings(num_cases=6, shape=(24, 24, 16), spacing_mm=(1.0, 1.0, 1.5), seed=3)

# The files that train or export end to end (15-180 s a file on 2 busy cores), collected first, longest first:
# pytest-xdist hands files to its workers in collection order (with --no-loadscope-reorder, in pyproject's
# addopts; by default it would start with the files with the most tests), so the long ones start early, the
# short ones fill in at the end and both workers finish together
LONG_FILES = ("test_distributed.py", "test_ensemble.py", "test_precision.py", "test_training_losses.py",
              "test_fold_ensemble.py", "test_export.py", "test_fault_injection.py", "test_region_training.py",
              "test_init_from.py", "test_wall_time_limit.py", "test_losses.py", "test_crash_safety.py",
              "test_plan_e2e.py", "test_planned_models.py", "test_train_e2e.py", "test_timing.py", "test_predict.py",
              "test_reproducibility.py", "test_locks.py", "test_sweep.py")


def pytest_collection_modifyitems(items):
    """Collect :data:`LONG_FILES` first, in that order; the other tests keep their order."""
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))  # stable: order within a file kept


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory):
    """A tiny phantom dataset in MSD layout, shared by the whole session (read-only)."""
    return write_phantom_dataset(tmp_path_factory.mktemp("phantoms") / "ds", TINY_PHANTOMS)


def _tiny(phantom_root: Path, output_dir: Path) -> list[str]:
    """The overrides of ``tiny_overrides`` with the runs in ``output_dir`` (:mod:`tiny_runs`)."""
    return tiny_run_overrides(phantom_root, output_dir)


@pytest.fixture
def tiny_overrides(phantom_root, tmp_path):
    """Dotted overrides that make any config a seconds-long run on the tiny phantoms (into
    ``tmp_path / "runs"``, no bundle, preprocessing in this process)."""
    return _tiny(phantom_root, tmp_path / "runs")


@pytest.fixture
def fit_skipped(monkeypatch):
    """``train.py`` without its epochs: ``TrainingLoop.fit`` returns at once, so a run does everything else
    (data check, cache, split, splits.json, preprocessing.json, model built and saved untrained as
    model.keras, status ``finished``) in a fraction of a tiny run's time. For tests of what a run
    decides and writes around training, not of training itself.

    Returns the names of the run directories whose fit was skipped, in the order train.py reached them.
    """
    from segpipe.training.loop import TrainingLoop

    fitted: list[str] = []

    def skip(self, train_data, val_data, *, epochs, steps_per_epoch, start, callbacks, checkpoint):
        fitted.append(checkpoint.run.path.name)
        return None  # "done": what the loop returns when no stop request ended training

    monkeypatch.setattr(TrainingLoop, "fit", skip)
    return fitted


def _history(run_dir: Path) -> list[dict]:
    with open(run_dir / "history.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="session")
def tiny_run(phantom_root, tmp_path_factory):
    """One finished tiny run (``tiny_overrides``, bundle exported), trained once per session:
    ``(run_dir, overrides)``. Tests may add files (evaluation, predictions) but not change the
    training's own files."""
    import train

    runs = tmp_path_factory.mktemp("tiny_run") / "runs"
    overrides = [*_tiny(phantom_root, runs), "train.export_bundle=true", "name=e2e"]
    assert train.main(["--set", *overrides]) == 0
    return runs / "e2e", overrides


@pytest.fixture(scope="session")
def resumed_tiny_run(phantom_root, tmp_path_factory):
    """The ``tiny_run`` config (no bundle) crashed by a KeyboardInterrupt right after its first
    checkpoint, then resumed with ``train.py --resume``; trained once per session.

    Returns a dict: ``run_dir``; what the run directory held at the crash: ``status`` (status.json),
    ``history`` (history.csv rows), ``png`` (progress.png bytes), ``epoch_times`` (epoch_times.csv as
    read by :func:`segpipe.reports.progress.read_history`); ``resume_code`` (train.py's exit code).
    """
    import train
    from segpipe.reports.progress import read_history
    from segpipe.runs.rundir import RunDir
    from segpipe.training.checkpoints import RunCheckpoint

    out = tmp_path_factory.mktemp("resumed_tiny_run") / "runs"
    original = RunCheckpoint.on_epoch_end
    seen: dict = {}

    def crash_after_first_epoch(self, epoch, logs=None):
        original(self, epoch, logs)
        if epoch == 0:
            run = RunDir(self.run.path)
            seen["png"] = run.progress_png.read_bytes()
            seen["epoch_times"] = read_history(run.epoch_times_csv)
            raise KeyboardInterrupt("simulated crash after the first checkpoint")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(RunCheckpoint, "on_epoch_end", crash_after_first_epoch)
        with pytest.raises(KeyboardInterrupt):
            train.main(["--set", *_tiny(phantom_root, out), "name=crashed"])
    run_dir = out / "crashed"
    seen["status"] = json.loads((run_dir / "status.json").read_text())["status"]
    seen["history"] = _history(run_dir)
    seen["resume_code"] = train.main(["--resume", str(run_dir)])
    seen["run_dir"] = run_dir
    return seen


@pytest.fixture(scope="session")
def crash_overrides(phantom_root, tmp_path_factory):
    """The run of the crash-safety and fault-injection tests: 4 epochs of 6 steps on the tiny phantoms,
    with the session's shared data cache, no bundle (13 s of a 20 s run here; the fault-injection chain
    adds it back for its export kill point)."""
    from process_helpers import shared_cache_dir

    return [f"data.root={phantom_root}", "data.phantoms=null", "data.patch_size=[16, 16, 16]", "data.batch_size=2",
            "data.val_fraction=0.34", f"data.cache_dir={shared_cache_dir(tmp_path_factory)}", "model.depth=2",
            "model.base_filters=4", "train.epochs=4", "train.steps_per_epoch=6", "train.export_bundle=false"]


@pytest.fixture(scope="session")
def uninterrupted_run(crash_overrides, tmp_path_factory):
    """That run trained once without interruption (in this process): its run directory."""
    import train

    out = tmp_path_factory.mktemp("uninterrupted")
    assert train.main(["--set", *crash_overrides, f"output_dir={out}", "name=straight"]) == 0
    return out / "straight"


@pytest.fixture(scope="module")
def compiled_model():
    """:func:`inference_helpers.tiny_model` compiled, with a built optimizer: what checkpoint writers save."""
    from inference_helpers import tiny_model

    model = tiny_model(depth=2, deep_supervision=False)
    model.compile(optimizer="adam", loss="mse")
    model.optimizer.build(model.trainable_variables)
    return model
