"""Crash-safe training: SIGKILL mid-epoch and SIGINT, then --resume gives the uninterrupted run;
checkpoints are never half-written; an unwritable or full run directory fails early and clearly."""
from __future__ import annotations

import errno
import json
import os
import signal
import time

import pytest

import train
from segpipe.runs.rundir import find_last_checkpoint
from segpipe.training.checkpoints import (CHECKPOINT_COPIES, RunCheckpoint, StorageError, check_free_space, read_state,
                                 save_checkpoint)
from process_helpers import (TRAIN, assert_same_history, checkpoint_state, read_history, running, shared_cache_dir,
                             start, wait_until)

TIMEOUT = 240
STEPS, EPOCHS = 6, 4


@pytest.fixture(scope="module")
def overrides(phantom_root, tmp_path_factory):
    cache = shared_cache_dir(tmp_path_factory)
    return [f"data.root={phantom_root}", "data.phantoms=null", "data.patch_size=[16, 16, 16]", "data.batch_size=2",
            "data.val_fraction=0.34", f"data.cache_dir={cache}", "model.depth=2", "model.base_filters=4",
            f"train.epochs={EPOCHS}", f"train.steps_per_epoch={STEPS}"]


@pytest.fixture(scope="module")
def uninterrupted(overrides, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    assert train.main(["--set", *overrides, f"output_dir={out}", "name=straight"]) == 0
    return read_history(out / "straight")


def start_training(overrides, out, log):
    return start([str(TRAIN), "--set", *overrides, f"output_dir={out}", "name=run"], log)


def first_epoch_saved(run_dir):
    return lambda: (checkpoint_state(run_dir) or {}).get("epoch", 0) >= 1


def test_sigkill_mid_epoch_then_resume_continues_from_the_last_checkpoint(overrides, uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    with running(start_training(overrides, tmp_path, tmp_path / "log")) as (proc,):
        wait_until(first_epoch_saved(run_dir), TIMEOUT, "the first checkpoint", (proc,))
        time.sleep(0.3)  # into the next epoch (a step takes ~0.1-0.3 s)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    assert json.loads((run_dir / "status.json").read_text())["status"] == "running"
    killed_at = read_state(find_last_checkpoint(run_dir / "checkpoints" / "last"))["epoch"]
    assert 1 <= killed_at < EPOCHS, "the run should have been killed before its end"

    assert train.main(["--resume", str(run_dir)]) == 0
    resumed = read_history(run_dir)
    assert [r["epoch"] for r in resumed] == [str(e) for e in range(1, EPOCHS + 1)]  # none duplicated or missing
    assert_same_history(uninterrupted, resumed)
    assert not list((run_dir / "checkpoints").glob("last.*"))  # no temporary folders left
    assert len(json.loads((run_dir / "run_info.json").read_text())["resumes"]) == 1


def test_sigint_stops_cleanly_after_a_checkpoint_and_resume_continues(overrides, uninterrupted, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "log"
    with running(start_training(overrides, tmp_path, log)) as (proc,):
        wait_until(first_epoch_saved(run_dir), TIMEOUT, "the first checkpoint", (proc,))
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 128 + signal.SIGINT, log.read_text()[-3000:]
    output = log.read_text()
    assert "SIGINT received" in output and f"--resume {run_dir}" in output
    assert json.loads((run_dir / "status.json").read_text())["status"] == "interrupted"
    state = checkpoint_state(run_dir)
    assert (1, 0) <= (state["epoch"], state["step"]) < (EPOCHS, 0)  # after the step (or epoch) in progress
    if state["step"]:  # stopped mid-epoch: the epoch's metric accumulators travel with the checkpoint
        assert set(state["metrics"]) == {"loss", "dice"}
    assert state["rng"]["next_sample_index"] == (state["epoch"] * STEPS + state["step"]) * 2

    assert train.main(["--resume", str(run_dir)]) == 0
    assert_same_history(uninterrupted, read_history(run_dir))


def test_a_stop_mid_epoch_resumes_with_the_epoch_metrics(overrides, uninterrupted, tmp_path, monkeypatch, capsys):
    def interrupt_in_second_epoch(self, batch, logs=None):  # a deterministic Ctrl-C after step 3 of epoch 2
        if len(self.rows) == 1 and batch == 2:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(RunCheckpoint, "on_train_batch_end", interrupt_in_second_epoch, raising=False)
    assert train.main(["--set", *overrides, f"output_dir={tmp_path}", "name=run"]) == 128 + signal.SIGINT
    assert "stopped after step 3 of epoch 2" in capsys.readouterr().err
    state = checkpoint_state(tmp_path / "run")
    assert (state["epoch"], state["step"]) == (1, 3) and len(state["history"]) == 1
    monkeypatch.undo()

    assert train.main(["--resume", str(tmp_path / "run")]) == 0
    assert_same_history(uninterrupted, read_history(tmp_path / "run"))


def test_unwritable_output_dir_fails_before_any_work(overrides, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")  # works as root too, unlike a chmod-ed folder
    started = time.monotonic()
    assert train.main(["--set", *overrides, f"output_dir={blocker / 'runs'}", "name=x"]) == 1
    err = capsys.readouterr().err
    assert (f"Expected a writable directory for the run. Received: output_dir={blocker / 'runs'}/" in err
            and f"(cannot be created: {blocker} is a file)." in err)
    assert time.monotonic() - started < 30  # before data preparation and model building


# ---------------------------------------------------------------- checkpoint files


@pytest.fixture(scope="module")
def tiny_model():
    from segpipe.models.unet3d import build_unet3d

    model = build_unet3d(1, 2, depth=1, base_filters=2)
    model.compile(optimizer="adam", loss="mse")
    model.optimizer.build(model.trainable_variables)
    return model


def test_a_failed_save_leaves_the_previous_checkpoint(tiny_model, tmp_path, monkeypatch):
    folder = tmp_path / "checkpoints" / "last"
    save_checkpoint(folder, tiny_model, {"epoch": 1})

    def disk_full(path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tiny_model, "save", disk_full)
    with pytest.raises(StorageError, match="No space left on device.*--resume"):
        save_checkpoint(folder, tiny_model, {"epoch": 2})
    assert read_state(find_last_checkpoint(folder)) == {"epoch": 1}
    assert not folder.with_name("last.tmp").exists()


def test_a_crash_between_the_renames_falls_back_to_the_old_checkpoint(tiny_model, tmp_path):
    folder = tmp_path / "last"
    save_checkpoint(folder, tiny_model, {"epoch": 3})
    folder.rename(folder.with_name("last.old"))  # "last" renamed away, the new one not yet in place
    assert find_last_checkpoint(folder) == folder.with_name("last.old")


def test_too_little_disk_space_fails_before_training(tiny_model, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 2**20, 2**20))
    with pytest.raises(StorageError, match=rf"^Expected at least \d+ MiB of free disk space for the checkpoints \({CHECKPOINT_COPIES} copies of weights \+ optimizer state\)\. Received: output_dir=.*/run \(1 MiB free on "):
        check_free_space(tmp_path / "run", tiny_model)
