"""Build everything a run needs from its config and train it (:mod:`segpipe.training.loop`, under
``train.distribute``), into its run directory (:class:`segpipe.runs.rundir.RunDir` lists what it holds).
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import keras

from segpipe.config import Config, ConfigError, check_inference_classes, check_patch_size, model_divisor
from segpipe.data.loader import make_datasets, targets_of, train_dataset, train_sampler, with_output_targets
from segpipe.data.pipeline import PreparedData, open_dataset, prepare_data
from segpipe.errors import Received, SettingError, expected
from segpipe.export.run_export import export_run
from segpipe.locks import hold
from segpipe.losses import deep_supervision_losses, get_loss
from segpipe.metrics.streaming import PerClassDice
from segpipe.models.architecture import architecture_from_model_config, build_network
from segpipe.models.precision import model_dtype, resolve_precision, wrap_optimizer
from segpipe.ownership import check_replaceable, has_marker, remove_owned
from segpipe.runs.rundir import RunDir
from segpipe.training import distributed
from segpipe.training.budget import AnytimeDecay, WallTimeLimit, anytime_schedule
from segpipe.training.checkpoints import (
    CheckpointSchedule,
    RunCheckpoint,
    check_free_space,
    check_writable,
    read_state,
    remove_stale_temporaries,
    save_model_atomic,
)
from segpipe.training.distributed import ShardedSampler, ShardSpec, WorkerInfo
from segpipe.training.fine_tune import LinearWarmup
from segpipe.training.init_from import initialise_from
from segpipe.training.interrupts import StopRequest, TrainingInterrupted
from segpipe.training.loop import LoopPosition, TrainingLoop
from segpipe.training.run_info import enable_determinism, write_run_info

if TYPE_CHECKING:
    import tensorflow as tf


def build_model(config: Config, in_channels: int, num_classes: int, *, regions: bool = False) -> keras.Model:
    """The configured network for ``in_channels`` inputs and ``num_classes`` outputs (uncompiled).

    Built from its description (:func:`segpipe.models.architecture.architecture_from_model_config`),
    the same one a bundle records so that its network can be rebuilt without running received code.
    With ``regions`` (``num_classes`` = the number of regions) the head is one sigmoid per region.
    """
    architecture = architecture_from_model_config(config.model, in_channels=in_channels, num_classes=num_classes,
                                                  output=_output(config, regions))
    # the precision is a builder option, not part of the description: a bundle's network is float32
    return build_network(architecture, sync_batch_norm=config.train.sync_batch_norm,
                         dtype=model_dtype(config.train.precision))


def build_optimizer(config: Config) -> keras.optimizers.Optimizer:
    """``train.optimizer`` with ``train.lr_schedule`` over ``epochs x steps_per_epoch`` steps (with
    ``train.max_train_minutes``: the anytime schedule, :class:`segpipe.training.budget.AnytimeDecay`), after a
    linear warm-up of ``train.warmup_epochs`` (:class:`segpipe.training.fine_tune.LinearWarmup`), loss scaling
    added for ``train.precision: mixed_float16``."""
    t = config.train
    total_steps = t.epochs * t.steps_per_epoch
    if t.lr_schedule in ("poly", "cosine") and t.max_train_minutes is not None:
        # the anytime schedule: the same decay, re-fitted to end when the time limit will cut the run
        lr = AnytimeDecay(t.learning_rate, total_steps, t.lr_schedule)
    elif t.lr_schedule == "poly":
        lr = keras.optimizers.schedules.PolynomialDecay(t.learning_rate, total_steps, 0.0, power=0.9)
    elif t.lr_schedule == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(t.learning_rate, total_steps)
    else:
        lr = t.learning_rate
    if t.warmup_epochs:
        lr = LinearWarmup(lr, t.warmup_epochs * t.steps_per_epoch)
    if t.optimizer == "sgd":
        optimizer = keras.optimizers.SGD(lr, momentum=t.momentum, nesterov=True, weight_decay=t.weight_decay or None)
    elif t.optimizer == "adamw":
        optimizer = keras.optimizers.AdamW(lr, weight_decay=t.weight_decay)
    else:
        optimizer = keras.optimizers.Adam(lr, weight_decay=t.weight_decay or None)
    return wrap_optimizer(optimizer, t.precision)


def _output(config: Config, regions: bool) -> str:
    """The head's activation: ``model.output``, or for regions a sigmoid (logits heads: not for regions yet)."""
    if not regions:
        return config.model.output
    if config.model.output == "logits":
        raise ConfigError(expected("model.output: softmax (the default; region datasets get one sigmoid per region)",
                                   key="model.output", received="logits",
                                   hint="A logits head for regions is not supported yet."))
    return "sigmoid"


def build_loss(config: Config, num_classes: int, *, regions: bool = False):
    """The configured loss of one output, checked against the dataset's classes (before any data is loaded).

    With ``model.output: logits`` every term gets ``from_logits: true``; a loss config that sets
    ``from_logits`` against ``model.output`` is refused (a second softmax, or none at all). With
    ``regions`` (``num_classes`` = the regions) every term gets ``sigmoid: true`` and
    ``include_background: true`` (no background channel), and per-class options have one entry per region.
    """
    try:
        loss = get_loss(config.loss, num_classes=None if regions else num_classes)
        if regions:  # one sigmoid per region: binary CE, no background channel to drop
            loss = loss.with_options(sigmoid=True, include_background=True)
            loss.check_num_classes(num_classes)
    except SettingError as exc:  # keyed by the loss option: add the section's path once
        raise ConfigError(str(exc.with_prefix("loss."))) from exc
    except ValueError as exc:
        raise ConfigError(f"loss: {exc}") from exc
    logits = config.model.output == "logits"
    explicit = _explicit_from_logits(config.loss)
    if any(value != logits for value in explicit):
        raise ConfigError(expected(f"from_logits: {str(logits).lower()} (or no from_logits) with model.output: "
                                   f"{config.model.output}", key="loss.from_logits", received=not logits))
    return loss.with_options(from_logits=True) if logits else loss


def _explicit_from_logits(spec: Any) -> list[bool]:
    """The ``from_logits`` values written in a loss config (every compound term)."""
    if isinstance(spec, dict):
        found = [spec["from_logits"]] if "from_logits" in spec else []
        return found + [v for term in spec.get("terms", []) or [] for v in _explicit_from_logits(term)]
    return []


def num_outputs(config: Config) -> int:
    """The model's outputs: one, or with deep supervision one per decoder level except the lowest."""
    return max(1, config.model.depth - 1) if config.model.deep_supervision else 1


def compile_model(model, config: Config, class_names: list[str], *, regions: bool = False) -> None:
    """Compile with the configured loss; with deep supervision the same loss on every output and
    nnU-Net's ``loss_weights`` (a plain multi-output compile: targets come per output from the loader).
    With ``regions`` ``class_names`` names the regions (sigmoid outputs, region Dice)."""

    dice = PerClassDice(class_names, name="dice", regions=regions)
    loss = build_loss(config, len(class_names), regions=regions)
    n = num_outputs(config)
    if len(model.outputs) != n:
        raise ValueError(expected(f"a model with {n} output(s) for model.deep_supervision: "
                                  f"{str(config.model.deep_supervision).lower()}", key="len(model.outputs)",
                                  received=len(model.outputs)))
    if n == 1:
        model.compile(optimizer=build_optimizer(config), loss=loss, metrics=[dice])
        return
    losses, weights = deep_supervision_losses(loss, n)
    # the Dice metric watches the full-resolution output only
    model.compile(optimizer=build_optimizer(config), loss=losses, loss_weights=weights,
                  metrics=[[dice]] + [[] for _ in range(n - 1)])


def train(config: Config, *, resume: bool = False, overwrite: bool = False, verbose: int | None = None,
          run_dir: str | os.PathLike | None = None) -> Path:
    """Train the run described by ``config``; returns its run directory.

    A finished run is left alone (unless ``overwrite``); an unfinished one needs ``resume`` (continue
    from its last checkpoint, with the config it was started with) or ``overwrite`` (start again;
    only a folder with segpipe's run marker is deleted, checked before any work). ``run_dir``: the
    run directory (default ``RunDir.of(config)``; ``train.py --resume RUN_DIR`` passes the folder
    itself, so a relative ``output_dir`` does not depend on the current folder).

    One process trains a run: the chief holds the run's lock (:mod:`segpipe.locks`) for the whole
    training, so a second ``train.py`` or ``--resume`` of it stops at once naming the holder.
    Under ``train.distribute: multi_worker`` every worker calls this; only the chief writes the run
    directory. With ``train.export_bundle`` the chief writes ``RUN_DIR/bundle`` after the final
    model, before the run is marked finished (a failed export leaves the run resumable).

    Raises
    ------
    TrainingInterrupted
        SIGINT/SIGTERM stopped training after a checkpoint was saved.
    StorageError
        the run directory cannot be written (checked before any work).
    FileExistsError
        ``overwrite`` of a folder without segpipe's run marker, or an unfinished run
        without ``resume`` (before any work).
    LockHeldError
        another process is training this run (names it).
    WorkerLost
        multi_worker: another worker died, hung or never joined (train.collective_timeout_seconds).
    """

    run = RunDir(run_dir) if run_dir is not None else RunDir.of(config)
    if overwrite:  # before any work, so a refused command has written nothing
        check_replaceable(run.path, "run", key="--overwrite")
    # multi_worker: the strategy must be set up before TensorFlow runs anything else
    distributed.warn_if_tf_config_unused(config.train.distribute)
    strategy = distributed.make_strategy(config.train.distribute, config.train.collective_timeout_seconds)
    worker = distributed.worker_info(strategy)
    if worker.is_chief:  # the others write to a temporary folder
        check_writable(run.path)  # before the lock beside it is written
    # only the chief writes the run directory, so only it holds the run's lock
    lock = hold(run.path, what="run directory") if worker.is_chief else contextlib.nullcontext()
    with distributed.lost_workers_reported(worker, config.train.collective_timeout_seconds, run.path), lock:
        return _train(config, run, strategy, worker, resume=resume, overwrite=overwrite, verbose=verbose)


def _train(config: Config, run: RunDir, strategy: "tf.distribute.Strategy", worker: WorkerInfo, *, resume: bool,
           overwrite: bool, verbose: int | None) -> Path:
    distributed.per_replica_batch(config.data.batch_size, strategy.num_replicas_in_sync)
    enable_determinism(config.train.deterministic)

    run_dir = run.path
    if not _may_train(run, config, resume=resume, overwrite=overwrite, is_chief=worker.is_chief):
        print(f"Run {run_dir} has already finished; nothing to do (use --overwrite to train it again).")
        return run_dir
    if worker.is_chief:
        remove_stale_temporaries(run_dir)  # of writes a crash interrupted (the lock keeps out live writers)
    data_config = _located(config, run)  # the default data cache sits under the run's own output_dir
    distributed.barrier(strategy, worker)  # every worker has looked at the run directory before it changes
    checkpoint = run.last_checkpoint() if resume else None
    state: dict[str, Any] = read_state(checkpoint) if checkpoint else {}
    distributed.check_same_on_all_workers(
        strategy, worker, [state.get("epoch", 0), state.get("step", 0)], "checkpoint (epoch, step)")

    dataset = distributed.chief_first(strategy, worker, lambda: open_dataset(config.data))  # may generate phantoms
    _check_before_data(config, dataset.num_classes)
    if dataset.regions:
        build_loss(config, dataset.num_outputs, regions=True)
        _output(config, True)
    # Check, fingerprint, cache, split; a resumed run keeps its own split and preprocessing.
    # With several workers the chief fills the cache first and the others reuse it.
    prepared = distributed.chief_first(strategy, worker, lambda: prepare_data(
        data_config, dataset=dataset, split=run.split(), settings=run.preprocessing()))
    out_dir = distributed.write_dir(run_dir, worker)
    out = RunDir(out_dir)
    try:
        if worker.is_chief:
            out.create()  # with segpipe's run marker: a later --overwrite may delete it
        else:
            out_dir.mkdir(parents=True, exist_ok=True)
        out.write_config(config)
        out.write_split(prepared.split)
        out.write_preprocessing(prepared.settings)
        out.write_status("running")
        _train_model(config, prepared, strategy, worker, run_dir, out, checkpoint, state, verbose)
        if config.train.export_bundle and worker.is_chief:  # region runs too: the bundle carries the regions
            export_bundle(run_dir, onnx=config.train.export_onnx)
        out.write_status("finished")
    finally:
        distributed.remove_worker_dir(out_dir, worker)
    return run_dir


def _may_train(run: RunDir, config: Config, *, resume: bool, overwrite: bool, is_chief: bool) -> bool:
    """Whether to train into ``run``: False for a finished run (kept); an unfinished one needs
    ``resume`` (with the config it was started with) or ``overwrite`` (the chief deletes it, if it
    holds segpipe's run marker)."""
    if run.path.exists() and overwrite:
        if is_chief:
            remove_owned(run.path, "run", key="--overwrite")
        return True
    if run.status() == "finished":
        return False
    if run.path.exists() and any(run.path.iterdir()) and not resume:
        raise FileExistsError(expected(
            "a new or finished run directory", key="run_dir",
            received=Received(f"{run.path} (holds an unfinished run)"),
            hint="Use --resume to continue it, --overwrite to start again, or --set name=... for a new run.",
        ))
    if resume:
        if run.path.exists() and any(run.path.iterdir()) and not (run.is_run() or has_marker(run.path, "run")):
            raise FileExistsError(expected(
                "a run directory to resume (config.yaml or segpipe's run marker)", key="run_dir",
                received=Received(f"{run.path} (a folder segpipe did not create)"),
                hint="Choose another name (--set name=...) or move the folder away.",
            ))
        check_resumed_config(run.path, config)
    return True


def _located(config: Config, run: RunDir) -> Config:
    """``config`` with ``output_dir`` where ``run`` is, when the two disagree (``--resume RUN_DIR`` from
    another folder, with a relative ``output_dir``), so the default dataset cache under it is found."""
    if RunDir.of(config).path.absolute() == run.path.absolute():
        return config
    located = copy.deepcopy(config)
    located.output_dir = str(run.path.parent.parent if config.experiment else run.path.parent)
    return located


def _check_before_data(config: Config, num_classes: int) -> None:
    """What can fail from the config and the class count alone fails here, before any data is read."""
    check_patch_size(config.data.patch_size, config.model.depth, config.model.strides)
    build_loss(config, num_classes)  # a bad loss option fails here, not mid-training
    check_inference_classes(config.inference, num_classes)  # used by the bundle at the end
    checkpoint_schedule(config)
    if config.train.init_from and not Path(config.train.init_from).exists():
        raise ConfigError(expected("a segpipe bundle folder, a run directory or a .keras file", key="train.init_from",
                                   received=Received(f"{config.train.init_from} (no such file or folder)")))
    if config.train.export_onnx and importlib.util.find_spec("tf2onnx") is None:
        raise ConfigError(expected('tf2onnx installed (pip install "segpipe[onnx]")', key="train.export_onnx",
                                   received=True, hint="tf2onnx is not importable."))


def checkpoint_schedule(config: Config) -> CheckpointSchedule | None:
    """The mid-epoch checkpoints of ``train.checkpoint_every_steps`` / ``train.checkpoint_every_minutes``, or None."""
    t = config.train
    if t.checkpoint_every_steps is None and t.checkpoint_every_minutes is None:
        return None
    try:
        return CheckpointSchedule(t.checkpoint_every_steps, t.checkpoint_every_minutes)
    except SettingError as exc:  # keyed "every_steps" / "every_minutes"
        raise ConfigError(str(exc.with_prefix("train.checkpoint_"))) from None


def _train_model(config: Config, prepared: "PreparedData", strategy: "tf.distribute.Strategy", worker: "WorkerInfo",
                 run_dir: Path, out: RunDir, checkpoint: Path | None, state: dict[str, Any],
                 verbose: int | None) -> None:
    """Build (or restore) the model under the strategy, train it with the project's loop, save it."""

    t = config.train
    model, init_record = _build_or_restore_model(config, prepared, strategy, checkpoint)
    position = LoopPosition(int(state.get("epoch", 0)), int(state.get("step", 0)), state.get("metrics"))
    if checkpoint is not None:
        print(f"Resuming {run_dir} after epoch {position.epoch}" + (f", step {position.step}" if position.step else ""))
    check_free_space(out.path, model)
    print(distributed.describe(t.distribute, strategy, worker, config.data.batch_size))
    if worker.is_chief:
        auto = " (train.precision: auto, not planned with a time budget)" if t.precision == "auto" else ""
        print(f"Precision: {resolve_precision(t.precision)}{auto}")
    write_run_info(out.run_info_json, config, prepared.split, _distribution(config, strategy, worker),
                   resumed_from=(position.epoch, position.step) if checkpoint is not None else None,
                   init_from=init_record)
    train_input, val_ds = _inputs(config, prepared, strategy, worker, position)

    time_limit = _time_limit(config, model, strategy, worker, state)
    run_checkpoint = RunCheckpoint(out.path, t.monitor, state, seed=config.seed,
                                   samples_per_step=config.data.batch_size,
                                   steps_per_epoch=t.steps_per_epoch, progress_plot=worker.is_chief,
                                   schedule=checkpoint_schedule(config),
                                   extra_state={"time_limit": time_limit.state} if time_limit is not None else None)
    # the time limit first: its re-fit of the schedule after an epoch goes into that epoch's checkpoint
    callbacks = [*([time_limit] if time_limit is not None else []), run_checkpoint,
                 keras.callbacks.TensorBoard(log_dir=str(out.tensorboard_dir), write_graph=False)]
    verbose = ((1 if sys.stdout.isatty() else 2) if verbose is None else verbose) if worker.is_chief else 0
    with StopRequest() as stop:
        loop = TrainingLoop(model, strategy, worker, prepared.dataset.output_names, verbose=verbose, stop=stop,
                            regions=bool(prepared.dataset.regions), freeze_encoder_epochs=t.freeze_encoder_epochs)
        stopped = loop.fit(train_input, val_ds, epochs=t.epochs, steps_per_epoch=t.steps_per_epoch,
                           start=position, callbacks=callbacks, checkpoint=run_checkpoint)
    if stopped is not None:
        out.write_status("interrupted")
        raise TrainingInterrupted(run_dir, stop.signal_number, stopped.epoch, stopped.step)
    stopped_early = time_limit.message(t.epochs) if time_limit is not None else None
    if stopped_early and worker.is_chief:
        print(stopped_early)
    save_model_atomic(model, out.final_model)


def _time_limit(config: Config, model: keras.Model, strategy: "tf.distribute.Strategy", worker: WorkerInfo,
                state: dict[str, Any]) -> WallTimeLimit | None:
    """``train.max_train_minutes``'s callback (None without it), driving the optimizer's anytime schedule and
    restored from the checkpoint's ``time_limit`` state; several workers agree on the time through their mean."""
    t = config.train
    if t.max_train_minutes is None:
        return None
    spent = sum(row["seconds"] for row in state.get("epoch_times", []))  # before a resume (older checkpoints)
    agree = None
    if worker.num_workers > 1:
        def agree(values):
            return [v / worker.num_workers for v in distributed.workers_sum(strategy, worker, values)]
    return WallTimeLimit(t.max_train_minutes, spent_seconds=spent, schedule=anytime_schedule(model.optimizer),
                         planned_epochs=t.epochs, steps_per_epoch=t.steps_per_epoch, state=state.get("time_limit"),
                         agree=agree)


def export_bundle(run_dir: Path, *, onnx: bool = False) -> Path:
    """Write the run's deployable bundle into ``RUN_DIR/bundle`` (replacing an older one), from the model
    ``evaluate.py RUN_DIR`` uses (:meth:`RunDir.model_file`: the best checkpoint, else model.keras)."""
    run = RunDir(run_dir)
    bundle = export_run(run.path, run.bundle_dir, checkpoint=run.model_file()[0], onnx=onnx, overwrite=True)
    print(f"Wrote bundle {bundle}")
    return bundle


def _build_or_restore_model(config: Config, prepared: "PreparedData", strategy: "tf.distribute.Strategy",
                            checkpoint: Path | None) -> tuple[keras.Model, dict[str, Any] | None]:
    """The compiled model with a built optimizer, variables made by ``strategy``, restored from ``checkpoint``
    (else, with ``train.init_from``, started from that network's weights: the record of what was copied)."""
    init_record = None
    with strategy.scope():
        keras.utils.set_random_seed(config.seed)
        regions = bool(prepared.dataset.regions)
        model = build_model(config, prepared.num_channels, prepared.dataset.num_outputs, regions=regions)
        if checkpoint is None and config.train.init_from:
            init_record = initialise_from(model, config.train.init_from)
            print(f"Started from {init_record['source']['path']}: {len(init_record['loaded'])} weights loaded, "
                  f"{len(init_record['adapted'])} adapted, {len(init_record['new'])} new")
        compile_model(model, config, prepared.dataset.output_names, regions=regions)
        model.optimizer.build(model.trainable_variables)  # optimizer variables cannot be made in strategy.run
        if checkpoint is not None:
            model.load_weights(checkpoint / "model.keras")  # weights and optimizer state (step -> LR schedule)
    return model, init_record


def _inputs(config: Config, prepared: "PreparedData", strategy: "tf.distribute.Strategy", worker: "WorkerInfo",
            position: "LoopPosition"):
    """The distributed training input from ``position`` on (samples already seen: the data RNG position), and the
    validation dataset."""

    batch = config.data.batch_size
    start = (position.epoch * config.train.steps_per_epoch + position.step) * batch
    train_ds, val_ds = make_datasets(prepared, config.data, seed=config.seed,
                                     divisor=max(model_divisor(config.model.depth, config.model.strides)),
                                     start_index=start,
                                     num_outputs=num_outputs(config))
    train_input = distributed.distribute_train_data(
        strategy, worker, train_ds, lambda spec: _worker_train_dataset(prepared, config, spec),
        global_batch=batch, base=start)
    return train_input, val_ds


def _distribution(config: Config, strategy: "tf.distribute.Strategy", worker: "WorkerInfo") -> dict[str, Any]:
    """How the run is spread over devices and workers (for run_info.json)."""
    replicas = strategy.num_replicas_in_sync
    return {"strategy": config.train.distribute, "num_replicas": replicas, "num_workers": worker.num_workers,
            "global_batch": config.data.batch_size, "per_replica_batch": config.data.batch_size // replicas,
            "sync_batch_norm": config.train.sync_batch_norm, "precision": resolve_precision(config.train.precision)}


def _worker_train_dataset(prepared: "PreparedData", config: Config, spec: "ShardSpec") -> "tf.data.Dataset":
    """multi_worker: this worker's training batches, its disjoint share of every global batch (the run's
    training sampler seen through :class:`segpipe.training.distributed.ShardedSampler`)."""

    sampler = ShardedSampler(train_sampler(prepared, config.data, seed=config.seed), spec)
    ds = train_dataset(sampler, targets_of(prepared.dataset), num_workers=config.data.num_workers)
    return with_output_targets(ds, num_outputs(config))


def check_resumed_config(run_dir: Path, config: Config) -> None:
    """A run is resumed only with the config it was started with (a sweep re-run with an edited file
    would otherwise continue old weights under new settings)."""
    run = RunDir(run_dir)
    if not run.is_run():
        return  # not started yet, or stopped before writing its config: nothing to continue
    saved = run.config().to_dict()
    changes = [f"{key}: {old!r} -> {new!r}" for key, old, new in _differences(saved, config.to_dict())]
    if changes:
        raise ConfigError(expected(
            f"the config the run was started with ({run.config_yaml}), to resume it", key="config",
            received=Received(f"changes {'; '.join(changes)}"), where=str(run_dir),
            hint="Undo them, or use --overwrite to train it again with the new config.",
        ))


def _differences(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, old, new) of every leaf that differs between two config dicts."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = list(old) + [k for k in new if k not in old]
        return [d for k in keys for d in _differences(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [(prefix.rstrip("."), old, new)]
