"""RUN/progress.png during a real (tiny) training run: written after every epoch, continued on resume."""
from __future__ import annotations

import pytest

from segpipe.reports.progress import progress_figure, read_history
from segpipe.runs.rundir import RunDir


def test_progress_png_after_every_epoch_and_across_a_resume(resumed_tiny_run):
    """``resumed_tiny_run``: crashed right after the first epoch's checkpoint, then resumed (the
    run tests/test_train_e2e.py compares with an uninterrupted one)."""
    seen_after_first_epoch = resumed_tiny_run
    assert seen_after_first_epoch["png"].startswith(b"\x89PNG")  # drawn after epoch 1 already
    assert list(seen_after_first_epoch["epoch_times"]["epoch"]) == [1.0]

    run = RunDir(resumed_tiny_run["run_dir"])
    assert resumed_tiny_run["resume_code"] == 0
    history = read_history(run.history_csv)
    times = read_history(run.epoch_times_csv)
    assert list(history["epoch"]) == [1.0, 2.0]
    assert list(times["epoch"]) == [1.0, 2.0]  # the first epoch's time survived the crash (checkpoint state)
    assert all(s > 0 for s in times["seconds"])
    # poly schedule (power 0.9) from 1e-3 to 0 over 2 epochs x 3 steps: the rate after 3 and 6 steps
    assert list(history["learning_rate"]) == pytest.approx([1e-3 * (1 - 3 / 6) ** 0.9, 0.0], rel=1e-5)
    png = run.progress_png.read_bytes()
    assert png.startswith(b"\x89PNG") and png != seen_after_first_epoch["png"]  # redrawn after the resume
    fig = progress_figure(history, epoch_seconds=times)
    (val_mean,) = [line for line in fig.axes[1].get_lines() if line.get_label() == "foreground mean (val)"]
    assert list(val_mean.get_xdata()) == [1.0, 2.0]  # the resumed picture holds both epochs
