"""The training loop: ``strategy.run`` on a train step, validation, Keras callbacks, stop requests.

Why not ``model.fit`` (measured with Keras 3.15.1, TensorFlow 2.21, issue 15): under
``MirroredStrategy`` (two logical CPUs) ``fit`` now trains exactly like one process: segpipe's
losses return one value per sample, so Keras's reduction divides each replica's mean by the
replicas, and one step of the U-Net gives the one-process weights to ~1e-6 for dice, dice + CE,
Tversky, CE, batch Dice and deep supervision (tests/test_training_losses.py; the earlier
"fit doubles the loss" came from the losses' scalar ``call``, reproduced there as a control).
Under ``MultiWorkerMirroredStrategy`` (two local workers, TF_CONFIG) ``fit`` still fails before
the first step, with Keras's own ``CategoricalCrossentropy`` as well: "Attempt to convert a value
(PerReplica:{...}) with an unsupported type ... to a Tensor" (tests/multiworker_fit_driver.py).
So ``fit`` cannot be the one path for every strategy, and this loop stays: it runs the same
compiled loss as ``fit`` (``model.compute_loss``), logs the same history as ``fit`` on one process
(tests/test_distributed.py), and adds what ``fit`` lacks here: stop requests agreed between
workers every step and mid-epoch checkpoints with the metric accumulators (on a stop request, and
every ``train.checkpoint_every_steps`` / ``_minutes``).

A step, in each replica: forward pass with ``training=True``, ``model.compute_loss`` (the compiled
loss: one loss per output with ``loss_weights`` for deep supervision, already divided by the
number of replicas by Keras's reduction because the optimizer *sums* the replicas' gradients),
then ``optimizer.apply_gradients``; the loss (times the replicas, as ``fit`` logs it) and the
per-class Dice metric are accumulated in replica-local metric variables that TensorFlow sums when
they are read.

Validation runs on every worker over all validation cases, outside ``strategy.run``: whole
volumes of different sizes need no splitting, and every worker then logs the same values.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import keras
import numpy as np
import tensorflow as tf

from segpipe.metrics.streaming import PerClassDice
from segpipe.training.checkpoints import RunCheckpoint
from segpipe.training.distributed import WorkerInfo, any_worker
from segpipe.training.fine_tune import set_encoder_frozen
from segpipe.training.interrupts import StopRequest


@dataclass
class LoopPosition:
    """Where training stands: finished epochs, finished steps of the next epoch, and that epoch's
    metric accumulators (``{metric name: [variable values]}``) when it is partly done."""

    epoch: int = 0
    step: int = 0
    metrics: dict[str, list] | None = None


class TrainingLoop:
    """Train ``model`` (compiled, built in ``strategy.scope()``) under ``strategy``.

    Parameters
    ----------
    model
        the compiled model; its optimizer must already be built (``optimizer.build``), because
        optimizer variables cannot be created inside ``strategy.run``.
    strategy
        the run's strategy (the default strategy for ``train.distribute: none``).
    worker
        this process's role; several workers agree on stop requests every step.
    class_names
        one per output channel, background first (keys of the Dice logs); the regions'
        names with ``regions`` (sigmoid outputs, region Dice).
    verbose
        0 silent, 1 progress bar, 2 one line per epoch (as ``fit``).
    stop
        a :class:`StopRequest` checked after every step, or None.
    """

    def __init__(self, model: keras.Model, strategy: tf.distribute.Strategy, worker: WorkerInfo,
                 class_names: list[str], *, verbose: int = 2, stop: StopRequest | None = None,
                 regions: bool = False, freeze_encoder_epochs: int = 0):
        self.model, self.strategy, self.worker = model, strategy, worker
        self.freeze_encoder_epochs, self._frozen = freeze_encoder_epochs, None
        if freeze_encoder_epochs and not model.optimizer.built:
            with strategy.scope():  # slots for every variable, the encoder's too, before a step trains a subset
                model.optimizer.build(model.trainable_variables)
        self.verbose, self.stop = verbose, stop
        with strategy.scope():  # replica-local accumulators, summed on read
            self.train_metrics = _loss_and_dice(class_names, regions)
        self.val_metrics = _loss_and_dice(class_names, regions)  # plain variables: validation is not distributed
        self._train_step = tf.function(self._distributed_step)
        self._eval_step = tf.function(self._eval_batch, reduce_retracing=True)

    # ------------------------------------------------------------ steps

    def _distributed_step(self, batch: tuple) -> None:
        self.strategy.run(self._replica_step, args=tuple(batch))

    def _replica_step(self, x: tf.Tensor, y: tf.Tensor) -> None:
        model = self.model
        replicas = tf.distribute.get_replica_context().num_replicas_in_sync
        with tf.GradientTape() as tape:
            y_pred = model(x, training=True)
            # Keras's reduction already divided this replica's mean by the replicas (apply_gradients sums
            # them), as in fit's train_step; the logged value is the unscaled mean, as fit logs it.
            loss = model.compute_loss(x=x, y=y, y_pred=y_pred, training=True)
            scaled = model.optimizer.scale_loss(loss)
        gradients = tape.gradient(scaled, model.trainable_variables)
        model.optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        loss_metric, dice = self.train_metrics
        loss_metric.update_state(loss * replicas, sample_weight=tf.shape(x)[0])
        dice.update_state(y, y_pred)

    def _eval_batch(self, x: tf.Tensor, y: tf.Tensor) -> None:
        y_pred = self.model(x, training=False)
        loss = self.model.compute_loss(x=x, y=y, y_pred=y_pred, training=False)
        loss_metric, dice = self.val_metrics
        loss_metric.update_state(loss, sample_weight=tf.shape(x)[0])
        dice.update_state(y, y_pred)

    # ------------------------------------------------------------ epochs

    def fit(self, train_data: Iterable, val_data: Iterable, *, epochs: int, steps_per_epoch: int,
            start: LoopPosition, callbacks: list[keras.callbacks.Callback],
            checkpoint: RunCheckpoint) -> LoopPosition | None:
        """Train from ``start`` to ``epochs``; returns None when done, or the position where a stop
        request ended training (after ``checkpoint`` saved it)."""
        callback_list = keras.callbacks.CallbackList(
            callbacks, add_progbar=self.verbose > 0, model=self.model,
            verbose=self.verbose, epochs=epochs, steps=steps_per_epoch,
        )
        iterator = iter(train_data)
        self.model.stop_training = False
        callback_list.on_train_begin()
        logs: dict[str, float] = {}
        for epoch in range(start.epoch, epochs):
            first_step = start.step if epoch == start.epoch else 0
            stopped_after = self._train_epoch(epoch, first_step, steps_per_epoch, iterator, callback_list, checkpoint,
                                              start.metrics if first_step else None)
            if stopped_after is not None:
                callback_list.on_train_end(logs)  # closes the TensorBoard writers
                return LoopPosition(epoch, stopped_after)
            logs = self._epoch_logs(val_data, callback_list)
            callback_list.on_epoch_end(epoch, logs)  # RunCheckpoint saves the epoch here
            if self._stop_requested() and epoch + 1 < epochs:
                callback_list.on_train_end(logs)
                return LoopPosition(epoch + 1, 0)
            if any_worker(self.strategy, self.worker, bool(self.model.stop_training)):
                break  # every worker stops after the same epoch (a callback may decide on one only)
        if self.freeze_encoder_epochs:
            self._freeze_encoder(False)  # the saved model and the bundle: every layer trainable
        callback_list.on_train_end(logs)
        return None

    def _train_epoch(self, epoch: int, first_step: int, steps: int, iterator: Iterator,
                     callback_list: keras.callbacks.CallbackList, checkpoint: RunCheckpoint,
                     metrics: dict[str, list] | None) -> int | None:
        """Steps ``first_step..steps-1`` of ``epoch`` (its metrics restored from ``metrics`` when resuming
        mid-epoch); the number of finished steps if a stop request ended it early (checkpoint saved)."""
        self._reset_or_restore(metrics)
        if self.freeze_encoder_epochs:
            self._freeze_encoder(epoch < self.freeze_encoder_epochs)
        callback_list.on_epoch_begin(epoch)
        for step in range(first_step, steps):
            callback_list.on_train_batch_begin(step)
            self._train_step(next(iterator))
            callback_list.on_train_batch_end(step, self._batch_logs())
            stop = self._stop_requested()
            # the last step of an epoch is saved at its end, after validation
            if stop or (step + 1 < steps and self._checkpoint_due(checkpoint, epoch * steps + step + 1)):
                checkpoint.save_partial(epoch, step + 1, self.metric_state())
            if stop:
                return step + 1
        return None

    def _freeze_encoder(self, frozen: bool) -> None:
        """``train.freeze_encoder_epochs``: (un)freeze the encoder and trace the step again for its new variables."""
        if frozen == self._frozen:
            return
        set_encoder_frozen(self.model, frozen)
        self._train_step = tf.function(self._distributed_step)
        self._frozen = frozen
        if self.worker.is_chief and self.verbose:
            print(f"train.freeze_encoder_epochs={self.freeze_encoder_epochs}: the encoder is "
                  f"{'frozen' if frozen else 'training again'}")

    def _checkpoint_due(self, checkpoint: RunCheckpoint, global_step: int) -> bool:
        """A periodic mid-epoch checkpoint (``checkpoint.schedule``). Every worker must save at the same
        step (reading the metric accumulators is collective), so a clock-based one is agreed on."""
        schedule = checkpoint.schedule
        if schedule is None:
            return False
        due = schedule.due(global_step)
        return any_worker(self.strategy, self.worker, due) if schedule.timed else due

    def evaluate(self, val_data: Iterable) -> dict[str, float]:
        """Loss and Dice over all of ``val_data`` (unprefixed keys)."""
        for metric in self.val_metrics:
            metric.reset_state()
        for x, y in val_data:
            self._eval_step(x, y)
        return _results(self.val_metrics)

    def _epoch_logs(self, val_data: Iterable, callback_list: keras.callbacks.CallbackList) -> dict[str, float]:
        logs = _results(self.train_metrics)
        callback_list.on_test_begin()
        val_logs = self.evaluate(val_data)
        callback_list.on_test_end(val_logs)
        return {**logs, **{f"val_{k}": v for k, v in val_logs.items()}}

    def _batch_logs(self) -> dict[str, float] | None:
        # Reading the metrics is a collective operation with several workers, and their verbosity may
        # differ, so only a single worker with a progress bar reads them every step.
        if self.verbose == 1 and self.worker.num_workers == 1:
            return _results(self.train_metrics)
        return None

    def _stop_requested(self) -> bool:
        local = self.stop is not None and self.stop.requested
        return any_worker(self.strategy, self.worker, local)

    # ------------------------------------------------------------ metric state

    def metric_state(self) -> dict[str, list]:
        """The training metrics' accumulators (summed over replicas), for a mid-epoch checkpoint."""
        return {m.name: [np.asarray(v.numpy()).tolist() for v in m.variables] for m in self.train_metrics}

    def _reset_or_restore(self, state: dict[str, list] | None) -> None:
        for metric in self.train_metrics:
            if state is None:
                metric.reset_state()
                continue
            # Assigning a replica-local (SUM) variable outside a replica splits the value over the replicas.
            for variable, value in zip(metric.variables, state[metric.name]):
                variable.assign(np.asarray(value, dtype=variable.dtype))


def _loss_and_dice(class_names: list[str], regions: bool = False) -> list[keras.metrics.Metric]:
    return [keras.metrics.Mean(name="loss"), PerClassDice(class_names, name="dice", regions=regions)]


def _results(metrics: list[keras.metrics.Metric]) -> dict[str, float]:
    """Flat float logs in ``fit``'s order and names: ``loss``, then ``dice_<class>``, ``dice_fg_mean``."""
    logs: dict[str, Any] = {}
    for metric in metrics:
        result = metric.result()
        logs.update(result if isinstance(result, dict) else {metric.name: result})
    return {k: float(v) for k, v in logs.items()}
