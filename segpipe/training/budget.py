"""Stop training when its wall-time allowance (``train.max_train_minutes``) would be overrun, and end
the learning-rate schedule with the run all the same (the anytime schedule).

A planned schedule (epochs × steps) is fitted to a time budget from steps timed before training;
a machine that gets slower during the run (other jobs, thermal limits) would then overrun the budget.
:class:`WallTimeLimit` is the safety net: after each epoch it stops the run if the next epoch, at the
pace of the recent ones, would end past the allowance; the run ends early with its best and last
checkpoints.

With a decaying schedule (``train.lr_schedule: poly | cosine``) the run's learning rate follows
:class:`AnytimeDecay`: the decay is a function of the schedule's *progress* (0 to 1) instead of the
step. Progress grows by the same amount every step, from the first step to the planned last one;
after every epoch :class:`WallTimeLimit` counts the epochs that still fit in the allowance at the
recent pace (the same count that decides when it stops) and, when fewer than planned fit, re-fits
the schedule from the current step: progress then grows faster, reaching 1 (the schedule's end: a
learning rate of 0) at the end of the last epoch that fits. The learning rate is continuous at every
re-fit. A run that is not cut keeps the planned schedule exactly (poly: ``lr0 · (1 − step/T)^0.9``).
The re-fit state is in every checkpoint (``state.json``, ``time_limit``), so a resumed run continues
the same schedule.
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Any, Callable, Sequence

import keras

from segpipe.errors import expected

DECAYS = ("poly", "cosine")


@keras.saving.register_keras_serializable(package="segpipe")
class AnytimeDecay(keras.optimizers.schedules.LearningRateSchedule):
    """A poly or cosine decay over the schedule's progress, which :meth:`refit` can make end sooner.

    ``progress(step) = min(1, anchor_progress + (step − anchor_step) · rate)``; initially anchor 0 and
    ``rate = 1 / total_steps``, i.e. the plain step-based schedule. The anchors are variables, read in
    the traced training step, so a re-fit needs no retracing.

    Parameters
    ----------
    initial_learning_rate : float
        The learning rate at progress 0.
    total_steps : int
        The planned steps (epochs × steps per epoch).
    decay : {"poly", "cosine"}
        ``lr0 · (1 − p)^power`` (nnU-Net's poly, power 0.9) or ``lr0 · (1 + cos(π p)) / 2``.
    power : float
        The poly exponent.

    Examples
    --------
    >>> schedule = AnytimeDecay(1.0, 100)
    >>> round(float(schedule(50)), 4)  # (1 - 0.5) ** 0.9
    0.5359
    >>> schedule.refit(50, 60)  # the run will end after step 60: progress 0.5 -> 1 in 10 steps
    >>> round(float(schedule(50)), 4), round(float(schedule(55)), 4), float(schedule(60))
    (0.5359, 0.2872, 0.0)
    """

    def __init__(self, initial_learning_rate: float, total_steps: int, decay: str = "poly", power: float = 0.9):
        super().__init__()
        if decay not in DECAYS:
            raise ValueError(expected(f"one of {list(DECAYS)}", key="train.lr_schedule", received=decay))
        if int(total_steps) < 1:
            raise ValueError(expected("at least 1 planned step", key="total_steps", received=total_steps))
        self.initial_learning_rate, self.total_steps = float(initial_learning_rate), int(total_steps)
        self.decay, self.power = decay, float(power)
        # float64 anchors: a progress summed over 10^5 steps stays exact to ~1e-11
        self._anchor_step = keras.Variable(0.0, dtype="float64", trainable=False, name="anytime_anchor_step")
        self._anchor_progress = keras.Variable(0.0, dtype="float64", trainable=False, name="anytime_anchor_progress")
        self._rate = keras.Variable(1.0 / self.total_steps, dtype="float64", trainable=False, name="anytime_rate")

    def progress(self, step: Any) -> Any:
        """The schedule's progress (0 to 1) at ``step``."""
        ops = keras.ops
        step = ops.cast(step, "float64")
        return ops.clip(self._anchor_progress + (step - self._anchor_step) * self._rate, 0.0, 1.0)

    def __call__(self, step: Any) -> Any:
        ops = keras.ops
        p = self.progress(step)
        if self.decay == "poly":
            factor = ops.power(1.0 - p, self.power)
        else:
            factor = 0.5 * (1.0 + ops.cos(math.pi * p))
        return ops.cast(self.initial_learning_rate * factor, "float32")

    def refit(self, step: int, final_step: int) -> None:
        """From ``step`` on, progress grows evenly to reach 1 at ``final_step`` (the learning rate at
        ``step`` is unchanged). A ``final_step`` not after ``step`` ends the schedule at ``step``."""
        current = float(keras.ops.convert_to_numpy(self.progress(step)))
        remaining = int(final_step) - int(step)
        self.restore({"anchor_step": float(step), "anchor_progress": current if remaining > 0 else 1.0,
                      "rate": (1.0 - current) / remaining if remaining > 0 else 0.0})

    def state(self) -> dict[str, float]:
        """The re-fit anchors (for a checkpoint's ``state.json``)."""
        return {"anchor_step": float(self._anchor_step.numpy()),
                "anchor_progress": float(self._anchor_progress.numpy()),
                "rate": float(self._rate.numpy())}

    def restore(self, state: dict[str, float]) -> None:
        """Set the anchors of :meth:`state` (a resumed run)."""
        self._anchor_step.assign(float(state["anchor_step"]))
        self._anchor_progress.assign(float(state["anchor_progress"]))
        self._rate.assign(float(state["rate"]))

    def get_config(self) -> dict[str, Any]:
        # the anchors are run state (checkpoint state.json), not configuration
        return {"initial_learning_rate": self.initial_learning_rate, "total_steps": self.total_steps,
                "decay": self.decay, "power": self.power}


def anytime_schedule(optimizer: keras.optimizers.Optimizer) -> AnytimeDecay | None:
    """The :class:`AnytimeDecay` driving ``optimizer`` (through a LossScaleOptimizer too), or None."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    schedule = getattr(inner, "_learning_rate", None)  # Keras keeps the schedule object here
    schedule = getattr(schedule, "schedule", schedule)  # inside a warm-up (segpipe.training.fine_tune.LinearWarmup)
    return schedule if isinstance(schedule, AnytimeDecay) else None


class WallTimeLimit(keras.callbacks.Callback):
    """Stop after the epoch whose successor would end past ``max_minutes`` of training, and re-fit the
    :class:`AnytimeDecay` ``schedule`` to end with the last epoch that fits.

    Parameters
    ----------
    max_minutes
        the allowance for training (validation included), in minutes.
    spent_seconds
        training time already spent before a resume (the run's recorded epoch times),
        when ``state`` does not hold it.
    clock
        seconds, monotonic (for tests).
    schedule
        the optimizer's anytime schedule, or None (a constant learning rate).
    planned_epochs, steps_per_epoch
        the planned run (needed with ``schedule``).
    state
        this callback's :meth:`state` from the checkpoint resumed from (elapsed time, recent epoch
        times, the schedule's anchors), or None.
    agree
        several workers: maps this worker's ``[elapsed seconds, next epoch seconds]`` to values
        every worker shares (their mean), so all stop after the same epoch and re-fit alike.

    Notes
    -----
    After training, ``stopped_after_epoch`` is the 1-based epoch after which it stopped (None if it
    did not), ``elapsed_seconds`` the training time counted, and ``final_epoch`` the epoch the schedule
    ends with.
    """

    def __init__(self, max_minutes: float, *, spent_seconds: float = 0.0,
                 clock: Callable[[], float] = time.monotonic, schedule: AnytimeDecay | None = None,
                 planned_epochs: int | None = None, steps_per_epoch: int | None = None,
                 state: dict[str, Any] | None = None,
                 agree: Callable[[Sequence[float]], Sequence[float]] | None = None):
        super().__init__()
        if not max_minutes > 0:
            raise ValueError(expected("a positive number of minutes", key="train.max_train_minutes",
                                      received=max_minutes))
        if schedule is not None and (planned_epochs is None or steps_per_epoch is None):
            raise ValueError(expected("planned_epochs and steps_per_epoch with an anytime schedule", key="schedule",
                                      received=type(schedule).__name__))
        self.limit_seconds = float(max_minutes) * 60.0
        self.clock = clock
        self.schedule, self.planned_epochs, self.steps_per_epoch = schedule, planned_epochs, steps_per_epoch
        self.agree = agree
        state = state or {}
        self.spent_seconds = float(state.get("elapsed_seconds", spent_seconds))
        self._epoch_seconds: list[float] = [float(v) for v in state.get("epoch_seconds", [])]
        self.final_epoch: int | None = state.get("final_epoch", planned_epochs)
        if schedule is not None and "schedule" in state:
            schedule.restore(state["schedule"])
        self.stopped_after_epoch: int | None = None
        self.elapsed_seconds = self.spent_seconds
        self._started: float | None = None
        self._epoch_started: float | None = None

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._started = self.clock()

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._epoch_started = self.clock()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        now = self.clock()
        if self._epoch_started is not None:
            self._epoch_seconds.append(now - self._epoch_started)
            self._epoch_seconds = self._epoch_seconds[-3:]
        self.elapsed_seconds = self.spent_seconds + (now - (self._started if self._started is not None else now))
        # the pace of the last three epochs: a slowdown shows within a few epochs, one slow epoch
        # (a checkpoint of the best model, a burst of load) does not end the run by itself
        next_epoch = statistics.median(self._epoch_seconds) if self._epoch_seconds else 0.0
        elapsed = self.elapsed_seconds
        if self.agree is not None:
            elapsed, next_epoch = (float(v) for v in self.agree([elapsed, next_epoch]))
        # epochs that still fit at this pace: none means stop now (the next would end past the allowance)
        fit = math.floor((self.limit_seconds - elapsed) / next_epoch) if next_epoch > 0 else math.inf
        if self.schedule is not None:
            self._refit(epoch + 1, fit)
        last_planned = self.planned_epochs is not None and epoch + 1 >= self.planned_epochs
        if elapsed + next_epoch > self.limit_seconds and not last_planned:  # after the last epoch nothing is cut
            self.stopped_after_epoch = epoch + 1
            self.model.stop_training = True

    def _refit(self, done: int, fit: float) -> None:
        """Make the schedule end with epoch ``min(planned, done + fit)`` when that is not its current end."""
        final = int(min(self.planned_epochs, done + max(0, fit)))
        if final == self.final_epoch or final <= done:
            # unchanged; or the run stops now without having been fitted to (a sudden slowdown within the
            # last epoch): the epoch trained at the rates it was given, and the log says so
            return
        step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        self.schedule.refit(step, step + (final - done) * self.steps_per_epoch)
        self.final_epoch = final

    def state(self) -> dict[str, Any]:
        """What a resumed run needs to continue alike: elapsed time, recent epoch times, the schedule's end."""
        state: dict[str, Any] = {"elapsed_seconds": self.elapsed_seconds, "epoch_seconds": list(self._epoch_seconds),
                                 "final_epoch": self.final_epoch}
        if self.schedule is not None:
            state["schedule"] = self.schedule.state()
        return state

    def message(self, planned_epochs: int) -> str | None:
        """One line for the log when the limit ended the run, else None."""
        if self.stopped_after_epoch is None:
            return None
        ending = "the learning-rate schedule did not reach its end"
        if self.schedule is not None:
            step = keras.ops.convert_to_numpy(self.model.optimizer.iterations)
            progress = float(keras.ops.convert_to_numpy(self.schedule.progress(step)))
            ending = ("the learning-rate schedule was re-fitted to end with it" if progress >= 1.0 - 1e-9 else
                      f"the learning-rate schedule stopped at {100 * progress:.0f} % of its progress (the pace "
                      f"changed within the last epoch)")
        return (f"train.max_train_minutes={self.limit_seconds / 60:g}: stopped after epoch {self.stopped_after_epoch} "
                f"of {planned_epochs} ({self.elapsed_seconds / 60:.1f} min of training; the next epoch would have "
                f"ended past the allowance). The best and last checkpoints are complete; {ending}.")
