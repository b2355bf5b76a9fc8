"""Optimisers and schedules from the config, and the stop request's second-signal abort."""
import math
import os
import signal

import numpy as np
import pytest

from segpipe.config import load_config
from segpipe.training.interrupts import StopRequest
from segpipe.training.train import build_optimizer


def _optimizer(*overrides):
    return build_optimizer(load_config(None, ["train.epochs=2", "train.steps_per_epoch=50", *overrides]))


@pytest.mark.parametrize("schedule, half_way", [
    ("poly", 1e-3 * 0.5 ** 0.9),           # (1 - t/T)^0.9, nnU-Net's poly schedule
    ("cosine", 1e-3 * 0.5 * (1 + math.cos(math.pi / 2))),  # 0.5 (1 + cos(pi t/T))
    ("constant", 1e-3),
])
def test_learning_rate_schedules_by_hand(schedule, half_way):
    optimizer = _optimizer(f"train.lr_schedule={schedule}", "train.learning_rate=0.001")
    learning_rate = optimizer._learning_rate
    at = ((lambda step: float(learning_rate(step))) if callable(learning_rate)
          else (lambda step: float(optimizer.learning_rate)))
    assert at(0) == pytest.approx(1e-3)
    assert at(50) == pytest.approx(half_way, rel=1e-5)  # 100 steps in all
    assert at(100) == pytest.approx(0.0 if schedule != "constant" else 1e-3, abs=1e-9)


def test_optimizer_kinds_and_weight_decay():
    import keras

    adamw = _optimizer("train.optimizer=adamw", "train.weight_decay=0.01")
    assert isinstance(adamw, keras.optimizers.AdamW) and adamw.weight_decay == pytest.approx(0.01)
    adam = _optimizer("train.optimizer=adam")
    assert type(adam) is keras.optimizers.Adam and adam.weight_decay is None
    sgd = _optimizer("train.optimizer=sgd", "train.momentum=0.9", "train.weight_decay=0.001")
    assert isinstance(sgd, keras.optimizers.SGD) and sgd.nesterov and sgd.momentum == pytest.approx(0.9)
    assert sgd.weight_decay == pytest.approx(0.001)


def test_adamw_decays_weights_that_get_no_gradient():
    """Decoupled weight decay: a step with a zero gradient still shrinks w by lr * wd * w."""
    import keras

    optimizer = _optimizer("train.optimizer=adamw", "train.weight_decay=0.1", "train.lr_schedule=constant",
                           "train.learning_rate=0.01")
    w = keras.Variable(np.ones(3, "float32"))
    optimizer.apply_gradients([(keras.ops.zeros(3), w)])
    np.testing.assert_allclose(w.numpy(), 1 - 0.01 * 0.1, rtol=1e-6)


def test_a_second_signal_aborts_at_once():
    # Python's own handler first: a process started in the background (nohup, `&`) inherits SIGINT ignored
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with StopRequest() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.requested and stop.signal_number == signal.SIGINT
            with pytest.raises(KeyboardInterrupt, match="SIGINT received twice"):
                os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the previous handler is back
    finally:
        signal.signal(signal.SIGINT, inherited)
