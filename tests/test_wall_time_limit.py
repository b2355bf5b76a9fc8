"""train.max_train_minutes: the callback that ends a run before its time allowance is overrun."""
import keras
import pytest
from tiny_runs import tiny_run_overrides

from segpipe.training.budget import WallTimeLimit


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _run(limit: WallTimeLimit, clock: Clock, epoch_seconds: list[float]) -> int:
    """Drive the callback like the loop does; returns the number of epochs run."""
    limit.set_model(keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)]))
    limit.model.stop_training = False
    limit.on_train_begin()
    for epoch, seconds in enumerate(epoch_seconds):
        limit.on_epoch_begin(epoch)
        clock.now += seconds
        limit.on_epoch_end(epoch)
        if limit.model.stop_training:
            return epoch + 1
    return len(epoch_seconds)


def test_stops_before_the_epoch_that_would_overrun():
    clock = Clock()
    limit = WallTimeLimit(1.0, clock=clock)  # 60 s
    # 10 s epochs: after epoch 5 (50 s) the next would end at 60 s, still within; after 6 (60 s) not
    assert _run(limit, clock, [10.0] * 20) == 6
    assert limit.stopped_after_epoch == 6 and limit.elapsed_seconds == pytest.approx(60.0)


def test_a_slowdown_is_seen_through_the_recent_pace():
    clock = Clock()
    limit = WallTimeLimit(2.0, clock=clock)  # 120 s
    # 10 s epochs, then 30 s: after 10+10+30+30 = 80 s the median of (10, 30, 30) = 30 s says the
    # next ends at 110 s (go on); after 110 s, 30 s more would end at 140 s: stop after epoch 5
    assert _run(limit, clock, [10.0, 10.0, 30.0, 30.0, 30.0, 30.0]) == 5
    assert "stopped after epoch 5 of 6" in limit.message(6)


def test_time_spent_before_a_resume_counts():
    clock = Clock()
    limit = WallTimeLimit(1.0, spent_seconds=45.0, clock=clock)
    assert _run(limit, clock, [10.0] * 5) == 1  # 55 s spent, the next would end at 65 s


def test_a_run_within_the_allowance_is_not_stopped():
    clock = Clock()
    limit = WallTimeLimit(10.0, clock=clock)
    assert _run(limit, clock, [10.0] * 5) == 5
    assert limit.stopped_after_epoch is None and limit.message(5) is None


@pytest.mark.parametrize("minutes", [0, -1.0])
def test_the_allowance_must_be_positive(minutes):
    with pytest.raises(ValueError, match=r"train.max_train_minutes"):
        WallTimeLimit(minutes)


def test_a_run_past_its_allowance_ends_early_with_complete_checkpoints(phantom_root, tmp_path, capsys):
    from process_helpers import read_history

    import train
    from segpipe.runs.rundir import RunDir

    overrides = tiny_run_overrides(phantom_root, tmp_path, "train.epochs=5", "train.steps_per_epoch=2",
                                   "train.max_train_minutes=0.0001", "name=limited")
    assert train.main(["--set", *overrides]) == 0
    assert "train.max_train_minutes=0.0001: stopped after epoch 1 of 5" in capsys.readouterr().out
    run = RunDir(tmp_path / "limited")
    assert len(read_history(run.path)) == 1
    assert run.final_model.is_file() and run.best_model.is_file()


# ---------------------------------------------------------------- the anytime schedule

import math  # noqa: E402

import numpy as np  # noqa: E402

from segpipe.training.budget import AnytimeDecay  # noqa: E402


@pytest.mark.parametrize("decay, reference", [
    ("poly", lambda s: keras.optimizers.schedules.PolynomialDecay(1e-2, 120, 0.0, power=0.9)(s)),
    ("cosine", lambda s: keras.optimizers.schedules.CosineDecay(1e-2, 120)(s)),
])
def test_an_anytime_schedule_that_is_not_refitted_is_the_planned_schedule(decay, reference):
    schedule = AnytimeDecay(1e-2, 120, decay)
    for step in (0, 1, 30, 60, 119, 120, 150):
        # Keras computes its schedules in float32: ~1e-7 of the initial rate near the end
        assert float(schedule(step)) == pytest.approx(float(reference(step)), rel=1e-6, abs=1e-9)
    assert float(schedule(120)) == 0.0 and float(schedule(0)) == pytest.approx(1e-2)


def _model_with_steps():
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(), loss="mse")
    model.optimizer.build(model.trainable_variables)
    return model


def _run_anytime(limit: WallTimeLimit, clock: Clock, epoch_seconds: list[float], steps: int, *, first_epoch: int = 0,
                 model=None, stop_after: int | None = None) -> list[float]:
    """Drive the callback like the loop does, ``steps`` optimizer steps per epoch; the learning rate at the end
    of every epoch (what history.csv logs)."""
    model = model or _model_with_steps()
    limit.set_model(model)
    model.stop_training = False
    limit.on_train_begin()
    rates = []
    for epoch in range(first_epoch, len(epoch_seconds)):
        limit.on_epoch_begin(epoch)
        for _ in range(steps):  # the learning rate never jumps within the run: check it step by step
            before = float(model.optimizer.learning_rate)
            model.optimizer.iterations.assign_add(1)
            assert float(model.optimizer.learning_rate) <= before + 1e-12
        clock.now += epoch_seconds[epoch]
        before_fit = float(model.optimizer.learning_rate)
        limit.on_epoch_end(epoch)
        assert float(model.optimizer.learning_rate) == pytest.approx(before_fit, rel=1e-6, abs=1e-12)  # continuous
        rates.append(float(model.optimizer.learning_rate))
        if model.stop_training or (stop_after is not None and epoch + 1 == stop_after):
            break
    return rates


def _anytime_limit(clock, minutes=2.25, planned=6, steps=3, state=None, model=None):
    model = model or _model_with_steps()
    schedule = AnytimeDecay(1.0, planned * steps)
    model.optimizer.learning_rate = schedule  # what build_optimizer does
    return model, schedule, WallTimeLimit(minutes, clock=clock, schedule=schedule, planned_epochs=planned,
                                          steps_per_epoch=steps, state=state)


def test_a_run_cut_by_the_time_limit_still_ends_its_schedule():
    clock = Clock()
    model, schedule, limit = _anytime_limit(clock)  # 135 s for 6 epochs of 30 s: 4 fit
    rates = _run_anytime(limit, clock, [30.0] * 6, 3, model=model)
    assert limit.stopped_after_epoch == 4 and limit.final_epoch == 4
    assert rates[-1] == 0.0  # the schedule's end: poly reaches 0
    # epoch 1 ran on the planned schedule (3 of 18 steps), then 9 more steps took progress to 1
    assert rates[0] == pytest.approx((1 - 3 / 18) ** 0.9)
    assert rates[1] == pytest.approx((1 - (3 / 18 + 3 * (1 - 3 / 18) / 9)) ** 0.9)
    assert "re-fitted to end with it" in limit.message(6)


def test_a_run_whose_last_planned_epoch_ends_near_the_limit_is_not_reported_as_cut():
    clock = Clock()
    # 6 planned epochs of 30 s in 190 s: after epoch 6 (180 s) another would end past the limit, but none is planned
    model, schedule, limit = _anytime_limit(clock, minutes=190 / 60)
    _run_anytime(limit, clock, [30.0] * 6, 3, model=model)
    assert limit.stopped_after_epoch is None and limit.message(6) is None and limit.final_epoch == 6


def test_a_run_within_its_limit_keeps_the_planned_schedule():
    clock = Clock()
    model, schedule, limit = _anytime_limit(clock, minutes=10.0)
    rates = _run_anytime(limit, clock, [30.0] * 6, 3, model=model)
    assert limit.stopped_after_epoch is None and limit.final_epoch == 6
    assert rates == pytest.approx([(1 - 3 * (e + 1) / 18) ** 0.9 for e in range(6)], abs=1e-7)


def test_a_slowdown_refits_again_and_the_schedule_still_ends():
    clock = Clock()
    model, schedule, limit = _anytime_limit(clock, minutes=4.0, planned=10)  # 240 s
    # 20 s epochs (fits the 10 planned after 1: 11 * 20 = 220 s), then 40 s: refitted to fewer epochs
    rates = _run_anytime(limit, clock, [20.0, 20.0, 40.0, 40.0, 40.0, 40.0, 40.0, 40.0, 40.0, 40.0], 3, model=model)
    assert limit.stopped_after_epoch is not None and limit.stopped_after_epoch < 10
    assert rates[-1] == 0.0 and all(np.diff(rates) <= 1e-12)


def test_the_anytime_schedule_resumes_from_its_checkpoint_state_identically():
    straight_clock = Clock()
    model, _, limit = _anytime_limit(straight_clock)
    straight = _run_anytime(limit, straight_clock, [30.0] * 6, 3, model=model)

    clock = Clock()
    model, _, limit = _anytime_limit(clock)
    first = _run_anytime(limit, clock, [30.0] * 6, 3, model=model, stop_after=2)
    state, iterations = limit.state(), int(model.optimizer.iterations)
    resumed_model = _model_with_steps()
    resumed_model.optimizer.iterations.assign(iterations)  # restored with the weights
    resumed_model, _, resumed = _anytime_limit(clock, state=state, model=resumed_model)
    rest = _run_anytime(resumed, clock, [30.0] * 6, 3, first_epoch=2, model=resumed_model)
    assert first + rest == pytest.approx(straight, rel=1e-9, abs=1e-12)
    assert resumed.stopped_after_epoch == len(straight) == 4


def test_a_time_limited_run_ends_its_schedule_and_resumes_identically(phantom_root, tmp_path, monkeypatch):
    from process_helpers import assert_same_history, read_history

    import train
    from segpipe.training import train as training
    from segpipe.training.checkpoints import RunCheckpoint

    class StepClock(WallTimeLimit):
        """Every optimizer step takes 10 s (validation none): a clock that a resumed run continues."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "clock": lambda: 10.0 * int(self.model.optimizer.iterations)})

    monkeypatch.setattr(training, "WallTimeLimit", StepClock)
    overrides = tiny_run_overrides(phantom_root, tmp_path, "train.epochs=6", "train.max_train_minutes=2.25")
    assert train.main(["--set", *overrides, "name=straight"]) == 0
    straight = read_history(tmp_path / "straight")
    assert len(straight) == 4 and float(straight[-1]["learning_rate"]) == 0.0  # cut at 4 of 6, schedule ended
    assert float(straight[0]["learning_rate"]) == pytest.approx(1e-3 * (1 - 3 / 18) ** 0.9, rel=1e-5)

    original = RunCheckpoint.on_epoch_end

    def crash_after_second_epoch(self, epoch, logs=None):
        original(self, epoch, logs)
        if epoch == 1:
            raise KeyboardInterrupt("simulated crash after the second checkpoint")

    with monkeypatch.context() as patch:
        patch.setattr(RunCheckpoint, "on_epoch_end", crash_after_second_epoch)
        with pytest.raises(KeyboardInterrupt):
            train.main(["--set", *overrides, "name=resumed"])
    assert train.main(["--resume", str(tmp_path / "resumed")]) == 0
    assert_same_history(straight, read_history(tmp_path / "resumed"))
    assert math.isclose(float(read_history(tmp_path / "resumed")[-1]["learning_rate"]), 0.0)
