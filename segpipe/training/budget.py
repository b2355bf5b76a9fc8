"""Stop training when its wall-time allowance (``train.max_train_minutes``) would be overrun.

A planned schedule (epochs × steps) is fitted to a time budget from steps timed before training;
a machine that gets slower during the run (other jobs, thermal limits) would then overrun the budget.
This callback is the safety net: after each epoch it stops the run if the next epoch, at the pace of
the recent ones, would end past the allowance. The learning-rate schedule is not stretched; the run
ends early, with its best and last checkpoints, and says so.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import keras

from segpipe.errors import expected


class WallTimeLimit(keras.callbacks.Callback):
    """Stop after the epoch whose successor would end past ``max_minutes`` of training.

    Args:
        max_minutes: the allowance for training (validation included), in minutes.
        spent_seconds: training time already spent before a resume (the run's recorded epoch times).
        clock: seconds, monotonic (for tests).

    After training, ``stopped_after_epoch`` is the 1-based epoch after which it stopped (None if it
    did not), and ``elapsed_seconds`` the training time counted.
    """

    def __init__(self, max_minutes: float, *, spent_seconds: float = 0.0,
                 clock: Callable[[], float] = time.monotonic):
        super().__init__()
        if not max_minutes > 0:
            raise ValueError(expected("a positive number of minutes", key="train.max_train_minutes", received=max_minutes))
        self.limit_seconds = float(max_minutes) * 60.0
        self.spent_seconds = float(spent_seconds)
        self.clock = clock
        self.stopped_after_epoch: int | None = None
        self.elapsed_seconds = self.spent_seconds
        self._started: float | None = None
        self._epoch_started: float | None = None
        self._epoch_seconds: list[float] = []

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._started = self.clock()

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._epoch_started = self.clock()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        now = self.clock()
        if self._epoch_started is not None:
            self._epoch_seconds.append(now - self._epoch_started)
        self.elapsed_seconds = self.spent_seconds + (now - (self._started if self._started is not None else now))
        # the pace of the last three epochs: a slowdown shows within a few epochs, one slow epoch
        # (a checkpoint of the best model, a burst of load) does not end the run by itself
        next_epoch = statistics.median(self._epoch_seconds[-3:]) if self._epoch_seconds else 0.0
        if self.elapsed_seconds + next_epoch > self.limit_seconds:
            self.stopped_after_epoch = epoch + 1
            self.model.stop_training = True

    def message(self, planned_epochs: int) -> str | None:
        """One line for the log when the limit ended the run, else None."""
        if self.stopped_after_epoch is None:
            return None
        return (f"train.max_train_minutes={self.limit_seconds / 60:g}: stopped after epoch {self.stopped_after_epoch} "
                f"of {planned_epochs} ({self.elapsed_seconds / 60:.1f} min of training; the next epoch would have "
                f"ended past the allowance). The best and last checkpoints are complete; the learning-rate "
                f"schedule did not reach its end.")
