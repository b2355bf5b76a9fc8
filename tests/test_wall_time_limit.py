"""train.max_train_minutes: the callback that ends a run before its time allowance is overrun."""
import keras
import pytest

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
    import train
    from process_helpers import read_history
    from segpipe.runs.rundir import RunDir

    overrides = [f"data.root={phantom_root}", "data.phantoms=null", "data.patch_size=[16, 16, 16]", "data.batch_size=2",
                 "data.val_fraction=0.34", "model.depth=2", "model.base_filters=4", "train.epochs=5",
                 "train.steps_per_epoch=2", "train.export_bundle=false",
                 "train.max_train_minutes=0.0001", f"output_dir={tmp_path}", "name=limited"]
    assert train.main(["--set", *overrides]) == 0
    assert "train.max_train_minutes=0.0001: stopped after epoch 1 of 5" in capsys.readouterr().out
    run = RunDir(tmp_path / "limited")
    assert len(read_history(run.path)) == 1
    assert run.final_model.is_file() and run.best_model.is_file()
