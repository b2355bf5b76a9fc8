"""tf.distribute strategies for ``train.distribute``, worker roles, batch splitting and data sharding.

``data.batch_size`` is the *global* batch: every training step consumes ``batch_size`` samples in
total, split evenly over all replicas (GPUs, or one CPU per worker), so a config trains the same
model whatever the hardware. A batch the replicas cannot divide evenly is a configuration error.

Samples are a function of ``(seed, sample index)``; step ``k`` of the run uses the indices
``k * B .. k * B + B - 1`` whatever the strategy. Replica ``g`` (of ``R``, numbered across workers)
gets the contiguous slice ``k * B + g * B / R ..`` of them, so each worker draws a disjoint share of
every global batch and no worker computes samples it then discards (:class:`ShardSpec`).

Only the chief writes the run directory; the other workers run the same code (collective
operations need every worker) but write to a temporary folder that is removed at the end, as
TensorFlow recommends for ``MultiWorkerMirroredStrategy``.

A worker that dies, hangs or never joins stops the others within ``train.collective_timeout_seconds``
with one error naming it (:mod:`segpipe.training.cluster`): the timeout bounds joining the cluster
and every collective operation of training; the waits while the chief prepares the data or writes
alone have no timeout (a dead worker is still noticed there, by TensorFlow's heartbeats).
"""
from __future__ import annotations

import contextlib
import faulthandler
import functools
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from segpipe.config import ConfigError
from segpipe.errors import Received, expected
from segpipe.training import cluster

if TYPE_CHECKING:
    import tensorflow as tf

STRATEGIES = ("none", "mirrored", "multi_worker")


# ---------------------------------------------------------------- strategy and roles


@dataclass(frozen=True)
class WorkerInfo:
    """This process's place in the cluster (one worker without ``multi_worker``)."""

    task_type: str | None
    task_id: int
    num_workers: int
    is_chief: bool

    @property
    def name(self) -> str:
        return f"{self.task_type or 'worker'}{self.task_id}"


def read_tf_config(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """The validated ``TF_CONFIG`` of a multi-worker run: ``{"cluster": {...}, "task": {...}}``.

    Raises
    ------
    ConfigError
        ``TF_CONFIG`` is unset, not JSON, or names a task that is not in the cluster.
    """
    raw = (os.environ if environ is None else environ).get("TF_CONFIG")
    # the environment variable is the key; train.distribute=multi_worker is why it is read
    if not raw:
        raise ConfigError(expected(
            "the cluster and this worker's task for train.distribute=multi_worker, e.g. "
            '{"cluster": {"worker": ["host1:12345", "host2:12345"]}, "task": {"type": "worker", "index": 0}} '
            "(README.md, 'Several GPUs, several machines')", key="TF_CONFIG", received=Received("<unset>"),
        ))
    try:
        tf_config = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError(expected("JSON (for train.distribute=multi_worker)", key="TF_CONFIG", received=raw,
                                   hint=f"JSON says: {exc}.")) from exc
    cluster, task = tf_config.get("cluster"), tf_config.get("task")
    if not isinstance(cluster, dict) or not any(cluster.get(k) for k in ("chief", "worker")):
        raise ConfigError(expected("a cluster with 'worker' (and optionally 'chief') addresses",
                                   key="TF_CONFIG.cluster", received=cluster))
    if not isinstance(task, dict) or task.get("type") not in cluster or not isinstance(task.get("index"), int):
        raise ConfigError(expected(f"a task with a 'type' of the cluster {sorted(cluster)} and an integer 'index'",
                                   key="TF_CONFIG.task", received=task))
    if not 0 <= task["index"] < len(cluster[task["type"]]):
        raise ConfigError(expected(f"an index in 0..{len(cluster[task['type']]) - 1} for type {task['type']!r}",
                                   key="TF_CONFIG.task.index", received=task["index"]))
    return tf_config


@functools.cache
def make_strategy(distribute: str, collective_timeout_seconds: float | None = None) -> "tf.distribute.Strategy":
    """The strategy of ``train.distribute``; one per process (a multi-worker one cannot be made twice).

    ``multi_worker`` must be set up before TensorFlow runs anything else, so call this first. With
    ``collective_timeout_seconds`` it first waits at most that long for every other worker to start
    (:func:`segpipe.training.cluster.wait_for_workers`), and every collective operation of the
    strategy then fails after that long without all workers (``CommunicationOptions``).

    Raises
    ------
    WorkerLost
        another worker did not start within the timeout (named).
    """
    import tensorflow as tf

    if distribute == "mirrored":
        return tf.distribute.MirroredStrategy()  # all GPUs of this machine (the CPU if there is none)
    if distribute == "multi_worker":
        tf_config = read_tf_config()  # a clear message instead of TensorFlow's
        options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=collective_timeout_seconds)
        if collective_timeout_seconds is None:
            return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
        cluster.wait_for_workers(tf_config, collective_timeout_seconds)
        # Last resort for a worker that was seen above but died before TensorFlow connected to it:
        # the strategy then waits (holding the GIL) for up to an hour; a C-level timer ends the
        # process with a traceback instead.
        with _exit_after(collective_timeout_seconds + 60):
            return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    if distribute == "none":
        return tf.distribute.get_strategy()
    raise ConfigError(expected(f"one of {list(STRATEGIES)}", key="train.distribute", received=distribute))


@contextlib.contextmanager
def _exit_after(seconds: float):
    """End the process (exit code 1, tracebacks on stderr) if the block takes longer than ``seconds``;
    a thread of the interpreter's C code, so it fires even while TensorFlow holds the GIL."""
    try:
        faulthandler.dump_traceback_later(seconds, exit=True)
    except (ValueError, OSError, AttributeError):  # stderr without a file descriptor (e.g. a notebook)
        yield
        return
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def worker_info(strategy: "tf.distribute.Strategy") -> WorkerInfo:
    """Task, number of workers and whether this process is the chief (the one that writes)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return WorkerInfo(None, 0, 1, True)
    spec = resolver.cluster_spec().as_dict()
    num_workers = sum(len(spec.get(kind, [])) for kind in ("chief", "worker"))
    is_chief = bool(strategy.extended.should_checkpoint)
    return WorkerInfo(resolver.task_type, int(resolver.task_id), num_workers, is_chief)


def warn_if_tf_config_unused(distribute: str, environ: dict[str, str] | None = None) -> str | None:
    """A warning (printed, and returned) when TF_CONFIG is set but ``train.distribute`` is not multi_worker:
    each process would then train alone, all into the same run directory."""
    if distribute == "multi_worker" or not (os.environ if environ is None else environ).get("TF_CONFIG"):
        return None
    message = (f"warning: TF_CONFIG is set but train.distribute is {distribute!r}: this process trains on its own. "
               "Use train.distribute=multi_worker to train as one cluster.")
    print(message, file=sys.stderr)
    return message


def per_replica_batch(global_batch: int, num_replicas: int) -> int:
    """``data.batch_size`` split evenly over the replicas, or a :class:`ConfigError` naming the key."""
    if global_batch % num_replicas:
        lower = max(num_replicas, global_batch - global_batch % num_replicas)
        raise ConfigError(expected(
            f"a multiple of the {num_replicas} replicas (it is the global batch, split evenly over them)",
            key="data.batch_size", received=global_batch, hint=f"Nearest valid: {lower} or {lower + num_replicas}"))
    return global_batch // num_replicas


def describe(distribute: str, strategy: "tf.distribute.Strategy", worker: WorkerInfo, global_batch: int) -> str:
    """One line for the console: strategy, replicas, workers and the batch split."""
    replicas = strategy.num_replicas_in_sync
    try:
        devices = ", ".join(strategy.extended.worker_devices)
    except RuntimeError:  # the default strategy has no device list
        devices = ""
    return (
        f"Distribution: {distribute}, {replicas} replica(s) on {worker.num_workers} worker(s)"
        f"{f' [{devices}]' if devices else ''}; global batch {global_batch} = "
        f"{global_batch // replicas} per replica"
    )


# ---------------------------------------------------------------- sharding the training samples


@dataclass(frozen=True)
class ShardSpec:
    """Which global sample indices one input pipeline (one worker) draws.

    The pipeline yields per-replica batches; its local replicas take successive ones. Local element
    ``i`` belongs to per-replica batch ``n = i // b`` (``b`` = per-replica batch), which is step
    ``k = n // L`` for local replica ``r = n % L`` (``L`` replicas per pipeline), global replica
    ``g = pipeline_id * L + r``; its global index is ``base + k * B + g * b + i % b``.
    """

    global_batch: int
    num_replicas: int
    num_pipelines: int = 1
    pipeline_id: int = 0
    base: int = 0  # the first sample index of the run (``steps done * global_batch`` on resume)

    def __post_init__(self) -> None:
        per_replica_batch(self.global_batch, self.num_replicas)
        if self.num_replicas % self.num_pipelines:
            raise ValueError(expected(f"a divisor of num_replicas={self.num_replicas}", key="num_pipelines",
                                      received=self.num_pipelines))
        if not 0 <= self.pipeline_id < self.num_pipelines:
            raise ValueError(expected(f"an id in 0..{self.num_pipelines - 1} (num_pipelines={self.num_pipelines})",
                                      key="pipeline_id", received=self.pipeline_id))

    @classmethod
    def from_input_context(cls, context: "tf.distribute.InputContext", global_batch: int, base: int) -> "ShardSpec":
        return cls(global_batch, context.num_replicas_in_sync, context.num_input_pipelines,
                   context.input_pipeline_id, base)

    @property
    def per_replica_batch(self) -> int:
        return self.global_batch // self.num_replicas

    def global_index(self, local_index: int) -> int:
        b, local_replicas = self.per_replica_batch, self.num_replicas // self.num_pipelines
        n, j = divmod(int(local_index), b)
        step, r = divmod(n, local_replicas)
        replica = self.pipeline_id * local_replicas + r
        return self.base + step * self.global_batch + replica * b + j


class ShardedSampler:
    """A training sampler seen through a :class:`ShardSpec`: local index ``i`` is global sample
    ``spec.global_index(i)``, and ``batch_size`` is the per-replica batch the loader batches by.

    The wrapped sampler still sees global indices, so its per-batch rules (``index % batch_size``
    with the global batch) give exactly the samples of a single-process run.
    """

    def __init__(self, sampler: Any, spec: ShardSpec):
        self.sampler = sampler
        self.spec = spec

    @property
    def batch_size(self) -> int:
        return self.spec.per_replica_batch

    def __call__(self, index: int):
        return self.sampler(self.spec.global_index(index))

    def sample(self, index: int):
        return self.sampler.sample(self.spec.global_index(index))

    def __getattr__(self, name: str) -> Any:  # cases, patch_size, ... of the wrapped sampler
        if name == "sampler":  # not set yet (e.g. while copying): no endless recursion
            raise AttributeError(name)
        return getattr(self.sampler, name)


def distribute_train_data(
    strategy: "tf.distribute.Strategy",
    worker: WorkerInfo,
    dataset: "tf.data.Dataset",
    make_worker_dataset: Callable[[ShardSpec], "tf.data.Dataset"],
    *,
    global_batch: int,
    base: int,
):
    """The training input of the strategy.

    One worker: ``dataset`` (global batches from sample ``base`` on), split into contiguous
    per-replica slices by the strategy. Several workers: each builds its own shard with
    ``make_worker_dataset(spec)`` (per-replica batches of its disjoint share of every global batch).
    """
    if worker.num_workers == 1:
        return strategy.experimental_distribute_dataset(dataset)
    return strategy.distribute_datasets_from_function(
        lambda context: make_worker_dataset(ShardSpec.from_input_context(context, global_batch, base))
    )


# ---------------------------------------------------------------- agreeing across workers


def workers_sum(strategy: "tf.distribute.Strategy", worker: WorkerInfo, values: Sequence[float], *,
                timeout_seconds: float | None = None) -> np.ndarray:
    """Sum of ``values`` over the workers (each worker contributes once); a collective operation,
    so every worker must call it at the same point. ``timeout_seconds`` overrides the strategy's
    collective timeout (0: wait as long as it takes)."""
    import tensorflow as tf

    local = tf.constant(np.asarray(values, dtype=np.float64))
    local_replicas = max(1, strategy.num_replicas_in_sync // worker.num_workers)

    def contribute():
        replica = tf.distribute.get_replica_context().replica_id_in_sync_group
        return tf.where(replica % local_replicas == 0, local, tf.zeros_like(local))

    per_replica = strategy.run(contribute)
    if timeout_seconds is None:
        return np.asarray(strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None))
    options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=timeout_seconds)
    total = strategy.extended.reduce_to(tf.distribute.ReduceOp.SUM, per_replica,
                                        destinations=strategy.extended.worker_devices[0], options=options)
    return np.asarray(strategy.experimental_local_results(total)[0])


def barrier(strategy: "tf.distribute.Strategy", worker: WorkerInfo) -> None:
    """Wait until every worker gets here, without a timeout: a worker may be busy alone for long
    (the chief preparing the data); a dead one is noticed by TensorFlow's heartbeats. No-op for one worker."""
    if worker.num_workers > 1:
        workers_sum(strategy, worker, [1.0], timeout_seconds=0)


def chief_first(strategy: "tf.distribute.Strategy", worker: WorkerInfo, fn: Callable[[], Any]) -> Any:
    """``fn()`` on the chief, then on the other workers (e.g. filling a shared cache once, then reading
    it); all leave together, so the collective timeout of what follows does not count ``fn``'s time."""
    if worker.is_chief:
        result = fn()
        barrier(strategy, worker)
    else:
        barrier(strategy, worker)
        result = fn()
    barrier(strategy, worker)
    return result


def any_worker(strategy: "tf.distribute.Strategy", worker: WorkerInfo, flag: bool) -> bool:
    """True on every worker if ``flag`` is true on any of them (a stop request on one worker stops all)."""
    if worker.num_workers == 1:
        return bool(flag)
    return bool(workers_sum(strategy, worker, [float(flag)])[0] > 0)


def check_same_on_all_workers(
    strategy: "tf.distribute.Strategy", worker: WorkerInfo, values: Sequence[float], what: str
) -> None:
    """Raise on every worker unless all workers hold the same ``values`` (e.g. the resumed epoch)."""
    if worker.num_workers == 1:
        return
    values = np.asarray(values, dtype=np.float64)
    sums = workers_sum(strategy, worker, np.concatenate([values, values**2]))
    mean, mean_sq = sums[: len(values)] / worker.num_workers, sums[len(values):] / worker.num_workers
    if not np.allclose(mean_sq, mean**2, rtol=0, atol=1e-9) or not np.allclose(mean, values, rtol=0, atol=1e-9):
        raise ConfigError(expected(
            f"every worker of train.distribute=multi_worker to start from the same {what}", key=worker.name,
            received=Received(f"{values.tolist()}, a different value elsewhere"),
            hint="On resume every worker reads the chief's run directory: put output_dir on a "
                 "file system they all share.",
        ))


def lost_workers_reported(worker: WorkerInfo, timeout_seconds: float | None, run_dir: Path):
    """A context in which a TensorFlow error meaning another worker failed becomes
    :class:`segpipe.training.cluster.WorkerLost`, naming it (nothing changes for one worker)."""
    if worker.num_workers == 1:
        return contextlib.nullcontext()
    return cluster.lost_workers_reported(read_tf_config(), timeout_seconds, run_dir)


# ---------------------------------------------------------------- where a worker writes


def write_dir(run_dir: Path, worker: WorkerInfo) -> Path:
    """The chief writes the run directory; another worker a fresh temporary folder (see :func:`remove_worker_dir`)."""
    if worker.is_chief:
        return Path(run_dir)
    return Path(tempfile.mkdtemp(prefix=f"segpipe-{worker.name}-"))


def remove_worker_dir(path: Path, worker: WorkerInfo) -> None:
    """Delete what a non-chief worker wrote (its checkpoints only exist because saving is collective)."""
    if not worker.is_chief:
        shutil.rmtree(path, ignore_errors=True)
