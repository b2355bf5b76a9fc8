"""Crash-safe training: SIGKILL mid-epoch and SIGINT, then --resume gives the uninterrupted run;
checkpoints are never half-written; an unwritable or full run directory fails early and clearly."""
from __future__ import annotations

import errno
import json
import os
import signal
import time

import pytest
from process_helpers import TRAIN, assert_same_history, checkpoint_state, read_history, running, start, wait_until

import train
from segpipe.runs.rundir import find_last_checkpoint
from segpipe.training.checkpoints import (
    CHECKPOINT_COPIES,
    RunCheckpoint,
    StorageError,
    check_free_space,
    read_state,
    save_checkpoint,
)

TIMEOUT = 240
STEPS, EPOCHS = 6, 4


@pytest.fixture(scope="module")
def overrides(crash_overrides):  # 4 epochs (EPOCHS) of 6 steps (STEPS)
    assert f"train.epochs={EPOCHS}" in crash_overrides and f"train.steps_per_epoch={STEPS}" in crash_overrides
    return crash_overrides


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_run):
    return read_history(uninterrupted_run)


def start_training(overrides, out, log):
    return start([str(TRAIN), "--set", *overrides, f"output_dir={out}", "name=run"], log)


def first_epoch_saved(run_dir):
    return lambda: (checkpoint_state(run_dir) or {}).get("epoch", 0) >= 1


def mid_epoch_saved(run_dir):
    return lambda: (state := checkpoint_state(run_dir) or {}).get("epoch", 0) >= 1 and state.get("step", 0) > 0


def test_sigkill_mid_epoch_resumes_from_the_periodic_mid_epoch_checkpoint(overrides, uninterrupted, tmp_path):
    """train.checkpoint_every_steps=2: killed in epoch 2 after a mid-epoch checkpoint, the resumed run
    continues from that step (not the epoch start) with its metric accumulators and gives the history
    of the uninterrupted run (which had no mid-epoch checkpoints: saving does not change training)."""
    run_dir = tmp_path / "run"
    with running(start_training([*overrides, "train.checkpoint_every_steps=2"], tmp_path, tmp_path / "log")) as (proc,):
        wait_until(mid_epoch_saved(run_dir), TIMEOUT, "a mid-epoch checkpoint in epoch 2", (proc,))
        time.sleep(0.1)  # a step or so on (a step takes ~0.1-0.3 s)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    assert json.loads((run_dir / "status.json").read_text())["status"] == "running"
    state = read_state(find_last_checkpoint(run_dir / "checkpoints" / "last"))
    assert 1 <= state["epoch"] < EPOCHS, "the run should have been killed before its end"
    if state["step"]:  # killed before the epoch ended: a periodic checkpoint, every 2 steps
        assert state["step"] in (2, 4) and set(state["metrics"]) == {"loss", "dice"}
    assert state["rng"]["next_sample_index"] == (state["epoch"] * STEPS + state["step"]) * 2

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


def test_a_failed_save_leaves_the_previous_checkpoint(compiled_model, tmp_path, monkeypatch):
    folder = tmp_path / "checkpoints" / "last"
    save_checkpoint(folder, compiled_model, {"epoch": 1})

    def disk_full(path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(compiled_model, "save", disk_full)
    with pytest.raises(StorageError, match="No space left on device.*--resume"):
        save_checkpoint(folder, compiled_model, {"epoch": 2})
    assert read_state(find_last_checkpoint(folder)) == {"epoch": 1}
    assert not folder.with_name("last.tmp").exists()


def test_a_crash_between_the_renames_falls_back_to_the_old_checkpoint(compiled_model, tmp_path):
    folder = tmp_path / "last"
    save_checkpoint(folder, compiled_model, {"epoch": 3})
    folder.rename(folder.with_name("last.old"))  # "last" renamed away, the new one not yet in place
    assert find_last_checkpoint(folder) == folder.with_name("last.old")


def test_too_little_disk_space_fails_before_training(compiled_model, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 2**20, 2**20))
    with pytest.raises(StorageError,
                       match=r"^Expected at least \d+ MiB of free disk space for the checkpoints "
                             rf"\({CHECKPOINT_COPIES} copies of weights \+ optimizer state\)\. Received: "
                             r"output_dir=.*/run \(1 MiB free on "):
        check_free_space(tmp_path / "run", compiled_model)


# ---------------------------------------------------------------- periodic checkpoints


@pytest.mark.parametrize("override, message", [
    ("train.checkpoint_every_steps=0", "Expected >= 1. Received: train.checkpoint_every_steps=0."),
    ("train.checkpoint_every_steps=2.5", "Expected an integer. Received: train.checkpoint_every_steps=2.5."),
    ("train.checkpoint_every_minutes=0", "Expected > 0. Received: train.checkpoint_every_minutes=0.0."),
    ("train.checkpoint_every_minutes=soon", "Expected a number. Received: train.checkpoint_every_minutes='soon'."),
])
def test_checkpoint_interval_errors_name_the_key(override, message):
    from segpipe.config import ConfigError, load_config

    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert str(info.value) == message


def test_a_nan_interval_is_refused_before_any_data_is_read():
    from segpipe.config import ConfigError, load_config
    from segpipe.training.train import checkpoint_schedule

    assert checkpoint_schedule(load_config(None, [])) is None
    with pytest.raises(ConfigError,
                       match=r"^Expected a number > 0 or None\. Received: train\.checkpoint_every_minutes=nan\.$"):
        checkpoint_schedule(load_config(None, ["train.checkpoint_every_minutes=.nan"]))


def test_the_schedule_saves_every_n_steps_of_the_run_or_after_m_minutes():
    from segpipe.training.checkpoints import CheckpointSchedule

    by_steps = CheckpointSchedule(every_steps=4)
    assert [s for s in range(1, 19) if by_steps.due(s)] == [4, 8, 12, 16]  # across epoch ends, as after a resume
    now = [0.0]
    timed = CheckpointSchedule(every_minutes=0.5, clock=lambda: now[0])
    now[0] = 29.0
    assert timed.timed and not timed.due(1)
    now[0] = 31.0
    assert timed.due(2)
    timed.saved()  # any save (epoch end included) restarts the interval
    now[0] = 60.0
    assert not timed.due(3)
    both = CheckpointSchedule(every_steps=3, every_minutes=10.0, clock=lambda: now[0])
    assert both.due(3) and not both.due(4)


def test_a_resume_rewrites_the_history_of_the_checkpoint(tmp_path):
    """A kill after the last epoch's checkpoint but before history.csv: nothing is left to train, and the
    resumed run still ends with every epoch in history.csv."""
    rows = [{"epoch": 1, "loss": 0.5, "learning_rate": 0.001}, {"epoch": 2, "loss": 0.25, "learning_rate": 0.0005}]
    (tmp_path / "history.csv").write_text("epoch,loss,learning_rate\n1,0.5,0.001\n")  # one epoch behind
    callback = RunCheckpoint(tmp_path, "loss", {"history": rows, "epoch_times": [{"epoch": 1, "seconds": 1.0}]})
    callback.on_train_begin()
    assert (tmp_path / "history.csv").read_text() == "epoch,loss,learning_rate\n1,0.5,0.001\n2,0.25,0.0005\n"
    assert (tmp_path / "epoch_times.csv").read_text() == "epoch,seconds\n1,1\n"


def test_stale_temporaries_of_killed_writes_are_removed(tmp_path):
    from segpipe.training.checkpoints import remove_stale_temporaries

    (tmp_path / "checkpoints").mkdir()
    # atomic_path's names: ".<stem>.<pid>.<8 characters>.tmp<suffix>"; 999999999: no such process
    stale = [tmp_path / ".history.999999999.k2j3ab_x.tmp.csv",
             tmp_path / "checkpoints" / ".best.999999999.x7aaaaaa.tmp.keras"]
    live = tmp_path / f".history.{os.getpid()}.k2j3ab_x.tmp.csv"  # a writer that still runs (an export, an evaluation)
    for path in [*stale, live]:
        path.write_text("half")
    dead_bundle = tmp_path / ".bundle.tmp-999999999"  # no such process
    live_bundle = tmp_path / f".bundle.tmp-{os.getpid()}"  # an export in progress
    for folder in (dead_bundle, live_bundle):
        folder.mkdir()
    last, old = tmp_path / "checkpoints" / "last", tmp_path / "checkpoints" / "last.old"
    old.mkdir()
    for name in ("model.keras", "state.json"):
        (old / name).write_text("{}")
    kept = [tmp_path / "history.csv", old, live_bundle, live]  # last.old: the only complete checkpoint
    kept[0].write_text("epoch\n")
    assert sorted(remove_stale_temporaries(tmp_path)) == sorted([*stale, dead_bundle])
    assert all(p.exists() for p in kept) and not any(p.exists() for p in [*stale, dead_bundle])

    last.mkdir()  # a complete last/ (a kill after the swap, before last.old/ was removed)
    for name in ("model.keras", "state.json"):
        (last / name).write_text("{}")
    assert remove_stale_temporaries(tmp_path) == [old] and not old.exists() and last.exists()
