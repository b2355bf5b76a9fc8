"""What fine-tuning a trained network needs (``train.init_from``): a learning-rate warm-up and an encoder
frozen for the first epochs.

Both protect what the source network learnt from the first, large updates of a new run: the output
head is new (other classes) and its early gradients are noise, so the copied encoder either trains
with a learning rate that ramps up from almost zero (``train.warmup_epochs``) or not at all for a few
epochs while the decoder and head adapt (``train.freeze_encoder_epochs``).
"""
from __future__ import annotations

from typing import Any

import keras

from segpipe.errors import expected

ENCODER_PREFIX = "enc"  # the encoder stages' layer names in both builders (enc0_conv0, enc2_b1_conv0, ...)


@keras.saving.register_keras_serializable(package="segpipe")
class LinearWarmup(keras.optimizers.schedules.LearningRateSchedule):
    """``schedule(step) · min(1, (step + 1) / warmup_steps)``: a linear ramp over the first steps.

    The ramp multiplies the schedule it wraps (a decay keeps its own clock), so after ``warmup_steps``
    the learning rate is exactly the wrapped schedule's. A function of the step only: a resumed run
    continues the same ramp.

    Parameters
    ----------
    schedule : float or LearningRateSchedule
        The learning rate (or schedule) after the warm-up.
    warmup_steps : int
        Steps of the ramp (``train.warmup_epochs × train.steps_per_epoch``), at least 1.

    Examples
    --------
    >>> ramp = LinearWarmup(0.01, 4)
    >>> [round(float(ramp(s)), 4) for s in range(5)]
    [0.0025, 0.005, 0.0075, 0.01, 0.01]
    """

    def __init__(self, schedule: float | keras.optimizers.schedules.LearningRateSchedule, warmup_steps: int):
        super().__init__()
        if int(warmup_steps) < 1:
            raise ValueError(expected("at least 1 warm-up step", key="warmup_steps", received=warmup_steps))
        self.schedule, self.warmup_steps = schedule, int(warmup_steps)

    def __call__(self, step: Any) -> Any:
        ops = keras.ops
        ramp = ops.minimum(1.0, (ops.cast(step, "float32") + 1.0) / float(self.warmup_steps))
        value = self.schedule(step) if callable(self.schedule) else self.schedule
        return ops.cast(value, "float32") * ramp

    def get_config(self) -> dict[str, Any]:
        schedule = (keras.optimizers.schedules.serialize(self.schedule)
                    if isinstance(self.schedule, keras.optimizers.schedules.LearningRateSchedule) else self.schedule)
        return {"schedule": schedule, "warmup_steps": self.warmup_steps}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "LinearWarmup":
        schedule = config["schedule"]
        if isinstance(schedule, dict):
            schedule = keras.optimizers.schedules.deserialize(schedule)
        return cls(schedule, config["warmup_steps"])


def encoder_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The layers of ``model``'s encoder (stages ``enc<k>``) that hold weights.

    Raises
    ------
    ValueError
        ``model`` has no such layers (not built by segpipe's builders).
    """
    layers = [layer for layer in model.layers if layer.name.startswith(ENCODER_PREFIX) and layer.weights]
    if not layers:
        raise ValueError(expected(f"a network whose encoder layers are named '{ENCODER_PREFIX}<stage>_…' (segpipe's "
                                  "builders)", key="train.freeze_encoder_epochs",
                                  received=f"a model with layers {[layer.name for layer in model.layers][:8]}"))
    return layers


def set_encoder_frozen(model: keras.Model, frozen: bool) -> int:
    """Make the encoder's layers (not) trainable; returns how many layers changed. A training step traced
    before must be traced again (its variables were fixed when it was traced)."""
    changed = 0
    for layer in encoder_layers(model):
        if layer.trainable == frozen:
            layer.trainable = not frozen
            changed += 1
    return changed
