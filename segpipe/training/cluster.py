"""Several workers: joining the cluster in bounded time, and a worker that dies, hangs or never joins
reported as one error that names it (``train.collective_timeout_seconds``).

What TensorFlow 2.21 does on its own (read in its source, docs/training.md#when-a-worker-fails):

- ``MultiWorkerMirroredStrategy()`` starts this worker's gRPC server, then waits for every worker to
  register with the coordination service: up to an hour, with no public option to shorten it, and
  holding the GIL, so no Python thread can interrupt it. :func:`wait_for_workers` is a rendezvous of
  segpipe's own before it: every worker listens on its TF_CONFIG port and waits, at most the
  timeout, until every other worker's port answers. A worker that never starts is named, and no
  TensorFlow call is left waiting for it.
- A *dead* worker breaks the gRPC connections of a collective operation in progress (seen when the
  chief died: ``UnavailableError`` within 2 s), and the coordination service (run by the chief)
  notices its missing heartbeats (30 s measured; not configurable through a public API) and aborts
  the other workers' collective operations with an ``UnavailableError``.
- ``CommunicationOptions(timeout_seconds=...)`` (given to the strategy by
  :func:`segpipe.training.distributed.make_strategy`) makes every collective operation raise
  ``DeadlineExceededError`` when some worker has not joined it within the timeout: this also catches
  a worker that is alive but stuck.

:func:`lost_workers_reported` turns those TensorFlow errors into one :class:`WorkerLost` that names
the workers that did not answer (their TF_CONFIG task and address, probed), says what happened and
how to resume.
"""
from __future__ import annotations

import contextlib
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from segpipe.config import ConfigError
from segpipe.errors import Received, expected
from segpipe.io import read_json
from segpipe.runs.rundir import RunDir

COORDINATED = ("chief", "worker")  # the task types that take part in collective operations
STILL_RUNNING = "still running, but it did not join the collective operation in time"
_TASK_IN_MESSAGE = re.compile(r"/job:(\w+)/replica:\d+/task:(\d+)")
# the op and function names TensorFlow wraps an error in: "{{function_node ...}}", "[Op:CollectiveReduceV2] name:"
_NOISE = re.compile(r"\{\{function_node [^}]*\}\}|\[Op:[^\]]*\](\s*name:\s*\S*)?")


class WorkerLost(RuntimeError):
    """Another worker of ``train.distribute: multi_worker`` died, hangs, or never joined: this worker
    stops instead of waiting. ``workers`` names the tasks that did not answer (e.g. ``["worker1"]``)."""

    def __init__(self, message: str, workers: list[str]):
        super().__init__(message)
        self.workers = list(workers)


@dataclass(frozen=True)
class Task:
    """One task of TF_CONFIG's cluster: ``type`` and ``index`` as in TF_CONFIG, ``address`` HOST:PORT."""

    type: str
    index: int
    address: str

    @property
    def name(self) -> str:
        return f"{self.type}{self.index}"

    @property
    def key(self) -> str:
        return f"TF_CONFIG.cluster.{self.type}[{self.index}]"

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.address.rpartition(":")
        return host.strip("[]") or "localhost", int(port)


def cluster_tasks(tf_config: dict[str, Any]) -> list[Task]:
    """The tasks of TF_CONFIG that take part in collective operations, chief first.

    Raises
    ------
    ConfigError
        an address is not HOST:PORT.
    """
    tasks = [Task(kind, i, address) for kind in COORDINATED
             for i, address in enumerate(tf_config["cluster"].get(kind) or [])]
    for task in tasks:
        host, _, port = str(task.address).rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(expected("HOST:PORT with a port in 1..65535", key=task.key, received=task.address))
    return tasks


def own_task(tf_config: dict[str, Any]) -> Task:
    """This process's task (``TF_CONFIG.task``), already validated by ``read_tf_config``."""
    kind, index = tf_config["task"]["type"], tf_config["task"]["index"]
    return Task(kind, index, tf_config["cluster"][kind][index])


def probe(task: Task, timeout: float = 1.0) -> str | None:
    """None if something accepts TCP connections at ``task``'s address, else why not (a short phrase)."""
    try:
        with socket.create_connection(task.host_port, timeout=timeout):
            return None
    except ConnectionRefusedError:
        return "nothing listens there"
    except socket.timeout:
        return f"no answer within {timeout:g} s"
    except OSError as exc:
        return exc.strerror or type(exc).__name__


# ---------------------------------------------------------------- joining


def wait_for_workers(tf_config: dict[str, Any], timeout: float, *, poll: float = 0.1,
                     clock: Callable[[], float] = time.monotonic) -> float:
    """Wait until every other worker's TF_CONFIG address answers, at most ``timeout`` seconds;
    returns the seconds waited.

    Meanwhile this worker listens on its own port (accepting and closing connections), so the
    others see it before TensorFlow's server takes the port over. A worker seen here that dies
    before TensorFlow connects is left to TensorFlow (see :func:`segpipe.training.distributed.make_strategy`).

    Raises
    ------
    WorkerLost
        some worker did not answer within ``timeout``; names each one and why.
    ConfigError
        this worker's own port cannot be listened on, or an address is not HOST:PORT.
    """
    me = own_task(tf_config)
    pending = [task for task in cluster_tasks(tf_config) if task != me]
    start = clock()
    if not pending:
        return 0.0
    listener = _listen(me)
    try:
        while True:
            _accept_all(listener)
            reasons = {task: probe(task, timeout=min(1.0, timeout)) for task in pending}
            pending = [task for task in pending if reasons[task] is not None]
            if not pending:
                return clock() - start
            if clock() - start >= timeout:
                break
            time.sleep(poll)
    finally:
        listener.close()
    lost = [(task, f"{reasons[task]}: not started, or not reachable from here") for task in pending]
    key, received = _received(lost)
    raise WorkerLost(expected(
        f"every worker of train.distribute=multi_worker to start within train.collective_timeout_seconds="
        f"{timeout:g} s (this is {me.name} at {me.address})", key=key, received=received,
        hint="Start every worker with the same TF_CONFIG cluster and its own task (README.md, 'Several GPUs, "
             "several machines'), check that these addresses are reachable from this machine, or raise "
             "train.collective_timeout_seconds. Nothing was trained; the run directory is untouched.",
    ), [task.name for task, _ in lost])


def _listen(task: Task) -> socket.socket:
    port = task.host_port[1]
    dual = socket.has_dualstack_ipv6()
    try:
        listener = socket.create_server(("", port), family=socket.AF_INET6 if dual else socket.AF_INET,
                                        dualstack_ipv6=dual, backlog=64)
    except OSError as exc:
        reason = (exc.strerror or str(exc)).split(" (while")[0]  # create_server appends the address
        raise ConfigError(expected(
            "a port this worker can listen on (its own address in the cluster)", key=task.key,
            received=task.address, hint=f"Listening on port {port} failed: {reason}; is another process (an earlier "
                                        "worker?) still using it?",
        )) from exc
    listener.setblocking(False)
    return listener


def _accept_all(listener: socket.socket) -> None:
    while True:
        try:
            connection, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        connection.close()


# ---------------------------------------------------------------- losing a worker


def is_worker_failure(error: BaseException) -> bool:
    """Whether a TensorFlow error means another worker failed (dead, stuck, or unreachable)."""
    import tensorflow as tf  # here, not at the top: the sweep imports this module without TensorFlow

    if isinstance(error, (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.AbortedError,
                          tf.errors.CancelledError)):
        return True
    return isinstance(error, (tf.errors.InternalError, tf.errors.UnknownError, tf.errors.FailedPreconditionError)) \
        and bool(re.search(r"collective|coordination|heartbeat", str(error), re.IGNORECASE))


def lost_workers(tf_config: dict[str, Any], message: str, *,
                 probe_fn: Callable[[Task], str | None] = probe) -> list[tuple[Task, str]]:
    """The other workers to blame for a failed collective operation, each with why.

    Workers whose address no longer answers have stopped; a worker that still answers is named if
    TensorFlow's ``message`` names it, and every other worker is named when nothing narrows it down.
    """
    me = own_task(tf_config)
    peers = [task for task in cluster_tasks(tf_config) if task != me]
    named = {(kind, int(index)) for kind, index in _TASK_IN_MESSAGE.findall(message)}
    status = {task: probe_fn(task) for task in peers}
    gone = [(task, f"{status[task]}: the process has stopped, or its machine is unreachable")
            for task in peers if status[task] is not None]
    alive = [task for task in peers if status[task] is None]
    stuck = [task for task in alive if (task.type, task.index) in named] or ([] if gone else alive)
    return sorted(gone + [(task, STILL_RUNNING) for task in stuck], key=lambda item: peers.index(item[0]))


@contextlib.contextmanager
def lost_workers_reported(tf_config: dict[str, Any], timeout: float | None, run_dir: Path,
                          *, probe_fn: Callable[[Task], str | None] = probe) -> Iterator[None]:
    """Turn a TensorFlow error that means another worker failed into :class:`WorkerLost`.

    The message names the workers (task and address), says what TensorFlow reported, what was
    kept (the last checkpoint in ``run_dir``) and the command that resumes the run.
    """
    import tensorflow as tf  # here, not at the top: the sweep imports this module without TensorFlow

    try:
        yield
    except tf.errors.OpError as error:
        if not is_worker_failure(error):
            raise
        message = str(getattr(error, "message", "") or error)
        lost = lost_workers(tf_config, message, probe_fn=probe_fn)
        raise WorkerLost(expected(**_lost_worker_words(own_task(tf_config), lost, timeout, error, run_dir)),
                         [task.name for task, _ in lost]) from error


def lost_worker_message(me: Task, lost: list[tuple[Task, str]], timeout: float | None, error: BaseException,
                        run_dir: Path) -> str:
    """The one message of :class:`WorkerLost` for a worker lost during training."""
    return expected(**_lost_worker_words(me, lost, timeout, error, run_dir))


def _lost_worker_words(me: Task, lost: list[tuple[Task, str]], timeout: float | None, error: BaseException,
                       run_dir: Path) -> dict[str, Any]:
    key, received = _received(lost)
    within = f"within train.collective_timeout_seconds={timeout:g} s" if timeout else "(no timeout set)"
    reported = _NOISE.sub(" ", str(getattr(error, "message", "") or error))
    reported = " ".join(reported.split())
    if len(reported) > 300:
        reported = reported[:300].rsplit(" ", 1)[0] + " ..."
    reported += "" if reported.endswith(".") else "."
    slow = ""
    if any(why == STILL_RUNNING for _, why in lost):
        slow = (f" A worker that is only slow (a large checkpoint, a slow disk) needs a larger "
                f"train.collective_timeout_seconds: set it in {Path(run_dir) / 'config.yaml'} first.")
    return dict(
        what=f"every worker of train.distribute=multi_worker to take part in each collective operation {within} "
             f"(this is {me.name} at {me.address})", key=key, received=received,
        hint=f"TensorFlow reported {type(error).__name__}: {reported} {me.name} stops here; "
             f"{run_dir} keeps its last checkpoint{_checkpoint_note(run_dir)}. To continue, start every worker "
             f"again (the same TF_CONFIG) with: python train.py --resume {run_dir}.{slow}",
    )


def _received(lost: list[tuple[Task, str]]) -> tuple[str, Received]:
    if len(lost) == 1:
        task, why = lost[0]
        return task.key, Received(f"{task.address} ({task.name}: {why})")
    return "TF_CONFIG.cluster", Received(", ".join(f"{task.type}[{task.index}]={task.address} ({task.name}: {why})"
                                                   for task, why in lost))


def _checkpoint_note(run_dir: Path) -> str:
    """" (after epoch 1)" from the run's last checkpoint, or a note that there is none yet."""
    checkpoint = RunDir(run_dir).last_checkpoint()
    if checkpoint is None:
        return " (none yet: resuming starts from the beginning)"
    try:
        state = read_json(checkpoint / "state.json")
        epoch, step = int(state.get("epoch", 0)), int(state.get("step", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        return f" ({checkpoint}, unreadable from here)"
    return f" (after epoch {epoch}" + (f", step {step} of epoch {epoch + 1})" if step else ")")
