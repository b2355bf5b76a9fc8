"""train.distribute: batch splitting, data sharding, the project's loop against model.fit, two
replicas on one machine and two workers on 127.0.0.1 against one process."""
from __future__ import annotations

import re

import pytest

import train
from segpipe.config import ConfigError, load_config
from segpipe.training.distributed import (ShardedSampler, ShardSpec, per_replica_batch, read_tf_config,
                                 warn_if_tf_config_unused)
from segpipe.training.loop import TrainingLoop
from process_helpers import (assert_same_history, checkpoint_state, free_port, read_history, running,
                             shared_cache_dir, start, tf_config)

TIMEOUT = 240  # seconds for any subprocess; they take ~20 s on 2 busy cores

# A scale-sensitive optimizer (SGD, unlike Adam, notices gradients R times too large) and instance
# norm (batch-norm statistics depend on how the batch is split), so runs must match exactly.
EXACT = ["model.norm=instance", "train.optimizer=sgd", "train.momentum=0.9", "train.learning_rate=0.05",
         "train.epochs=2", "train.steps_per_epoch=2"]

MIRRORED_DRIVER = """
import sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import segpipe.training.distributed as distributed
# MirroredStrategy() takes the GPUs (or one CPU); mirror over two logical CPUs instead.
distributed.make_strategy = lambda name: tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
import train
sys.exit(train.main(sys.argv[1:]))
"""

WORKER_DRIVER = """
import hashlib, json, os, signal, sys
import numpy as np
import segpipe.training.distributed as distributed
from segpipe.training.checkpoints import RunCheckpoint

def digest(path):
    import keras
    model = keras.saving.load_model(path, compile=False)
    return hashlib.sha256(b"".join(np.ascontiguousarray(w).tobytes() for w in model.get_weights())).hexdigest()

remove = distributed.remove_worker_dir

def report_then_remove(path, worker):  # the final weights each worker saved, before its folder goes
    model = path / "model.keras"
    print(f"WORKER {worker.name} chief={worker.is_chief} dir={path} "
          f"weights={digest(model) if model.is_file() else None}", flush=True)
    remove(path, worker)

distributed.remove_worker_dir = report_then_remove
if os.environ.get("CHIEF_CTRL_C") and json.loads(os.environ["TF_CONFIG"])["task"]["index"] == 0:
    def ctrl_c(self, batch, logs=None):  # Ctrl-C on the chief only, after step 1 of epoch 2
        if len(self.rows) == 1 and batch == 0:
            os.kill(os.getpid(), signal.SIGINT)
    RunCheckpoint.on_train_batch_end = ctrl_c
import train
sys.exit(train.main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def base_overrides(phantom_root, tmp_path_factory):
    """Tiny-run overrides sharing one data cache, so subprocesses skip preprocessing."""
    cache = shared_cache_dir(tmp_path_factory)
    return [f"data.root={phantom_root}", "data.phantoms=null", "data.patch_size=[16, 16, 16]", "data.batch_size=2",
            "data.val_fraction=0.34", f"data.cache_dir={cache}", "model.depth=2", "model.base_filters=4",
            "train.epochs=2", "train.steps_per_epoch=3"]


@pytest.fixture(scope="module")
def single_process_run(base_overrides, tmp_path_factory):
    """The reference: the EXACT config trained in this process with train.distribute: none."""
    out = tmp_path_factory.mktemp("reference")
    assert train.main(["--set", *base_overrides, *EXACT, f"output_dir={out}", "name=one"]) == 0
    return out / "one"


# ---------------------------------------------------------------- config and arithmetic


def test_batch_size_must_divide_over_replicas():
    assert per_replica_batch(8, 4) == 2
    with pytest.raises(ConfigError, match=r"Expected a multiple of the 2 replicas .*Received: data.batch_size=3. Nearest valid: 2 or 4"):
        per_replica_batch(3, 2)


def test_distribute_and_sync_batch_norm_are_checked():
    with pytest.raises(ConfigError, match=r"Expected one of \[.*\]. Received: train.distribute="):
        load_config(None, ["train.distribute=multiworker"])
    with pytest.raises(ConfigError, match=r"^Expected 'batch' when train.sync_batch_norm is true \(only batch norm has statistics to synchronise\)\. Received: model\.norm='instance'\.$"):
        load_config(None, ["train.sync_batch_norm=true", "model.norm=instance"])
    assert load_config(None, []).train.distribute == "none"


def test_sync_batch_norm_builds_synchronized_layers():
    import keras

    from segpipe.training.train import build_model

    config = load_config(None, ["train.sync_batch_norm=true", "model.depth=2", "model.base_filters=2"])
    norms = [layer for layer in build_model(config, 1, 3).layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert norms and all(layer.synchronized for layer in norms)


def test_tf_config_errors_name_the_variable():
    with pytest.raises(ConfigError, match=r"^Expected the cluster and this worker's task for train\.distribute=multi_worker, e\.g\. .*Received: TF_CONFIG=<unset>\.$"):
        read_tf_config({})
    with pytest.raises(ConfigError, match=r"^Expected JSON \(for train\.distribute=multi_worker\)\. Received: TF_CONFIG='\{cluster'\. JSON says: "):
        read_tf_config({"TF_CONFIG": "{cluster"})
    with pytest.raises(ConfigError, match=r"^Expected an index in 0\.\.1 for type 'worker'\. Received: TF_CONFIG\.task\.index=2\.$"):
        read_tf_config({"TF_CONFIG": tf_config([1, 2], 0).replace('"index": 0', '"index": 2')})
    assert read_tf_config({"TF_CONFIG": tf_config([1, 2], 1)})["task"]["index"] == 1
    assert "trains on its own" in warn_if_tf_config_unused("mirrored", {"TF_CONFIG": tf_config([1, 2], 1)})
    assert warn_if_tf_config_unused("none", {}) is None


@pytest.mark.parametrize("batch, replicas, pipelines", [(2, 1, 1), (4, 2, 1), (4, 2, 2), (8, 4, 2), (6, 3, 3)])
def test_shards_split_every_global_batch_into_disjoint_contiguous_slices(batch, replicas, pipelines):
    base, steps = 12, 3
    per_replica, local = batch // replicas, replicas // pipelines
    seen = {}
    for pipeline in range(pipelines):
        spec = ShardSpec(batch, replicas, pipelines, pipeline, base)
        indices = [spec.global_index(i) for i in range(steps * local * per_replica)]
        # the pipeline's local replicas take successive per-replica batches
        for n in range(steps * local):
            step, replica = divmod(n, local)
            seen[(step, pipeline * local + replica)] = indices[n * per_replica:(n + 1) * per_replica]
    for step in range(steps):
        together = [i for g in range(replicas) for i in seen[(step, g)]]
        assert together == list(range(base + step * batch, base + (step + 1) * batch))


def test_sharded_sampler_draws_global_indices_in_per_replica_batches():
    class Sampler:
        batch_size, patch_size = 4, (8, 8, 8)

        def __call__(self, index):
            return index

    sharded = ShardedSampler(Sampler(), ShardSpec(4, 2, 2, 1))
    assert sharded.batch_size == 2 and sharded.patch_size == (8, 8, 8)
    assert [sharded(i) for i in range(4)] == [2, 3, 6, 7]


# ---------------------------------------------------------------- the loop against fit


@pytest.mark.parametrize("deep_supervision", [False, True], ids=["plain", "deep_supervision"])
def test_own_loop_gives_the_history_of_model_fit(deep_supervision, base_overrides, tmp_path, monkeypatch):
    overrides = [*base_overrides, f"output_dir={tmp_path}",
                 *(["model.deep_supervision=true", "model.depth=3"] if deep_supervision else [])]
    assert train.main(["--set", *overrides, "name=loop"]) == 0

    def fit_instead(self, train_data, val_data, *, epochs, steps_per_epoch, start, callbacks, checkpoint):
        self.model.fit(train_data, epochs=epochs, steps_per_epoch=steps_per_epoch, initial_epoch=start.epoch,
                       validation_data=val_data, callbacks=callbacks, shuffle=False, verbose=0)

    monkeypatch.setattr(TrainingLoop, "fit", fit_instead)
    assert train.main(["--set", *overrides, "name=fit"]) == 0
    loop, fit = read_history(tmp_path / "loop"), read_history(tmp_path / "fit")
    # with several outputs fit also logs each output's loss ("out0_loss", ...); the loop logs their sum
    extra = set(fit[0]) - set(loop[0])
    assert all(key.endswith("_loss") and "out" in key for key in extra) and (bool(extra) == deep_supervision), extra
    assert_same_history(loop, [{key: row[key] for key in loop[0]} for row in fit])


# ---------------------------------------------------------------- several replicas and workers


def test_two_mirrored_replicas_train_like_one_process(single_process_run, base_overrides, tmp_path):
    driver = tmp_path / "mirrored.py"
    driver.write_text(MIRRORED_DRIVER)
    log = tmp_path / "mirrored.log"
    with running(start([str(driver), "--set", *base_overrides, *EXACT, "train.distribute=mirrored",
                        f"output_dir={tmp_path}", "name=two"], log)) as (proc,):
        assert proc.wait(timeout=TIMEOUT) == 0, log.read_text()[-3000:]
    assert "2 replica(s) on 1 worker(s)" in log.read_text()
    assert_same_history(read_history(single_process_run), read_history(tmp_path / "two"))


def run_workers(args: list[str], tmp_path, phase: str, **env: str) -> tuple[list[int], list[str]]:
    """Two local workers of ``python ARGS``; their exit codes and logs."""
    ports = [free_port(), free_port()]
    procs = [start(args, tmp_path / f"{phase}{i}.log", TF_CONFIG=tf_config(ports, i), TMPDIR=str(tmp_path / f"tmp{i}"),
                   **env) for i in range(2)]
    with running(*procs):
        codes = [proc.wait(timeout=TIMEOUT) for proc in procs]
    return codes, [(tmp_path / f"{phase}{i}.log").read_text() for i in range(2)]


def test_two_workers_stop_resume_end_identical_and_only_the_chief_writes(single_process_run, base_overrides, tmp_path):
    driver = tmp_path / "worker.py"
    driver.write_text(WORKER_DRIVER)
    out = tmp_path / "runs"
    for i in range(2):
        (tmp_path / f"tmp{i}").mkdir()
    args = [str(driver), "--set", *base_overrides, *EXACT, "train.distribute=multi_worker", f"output_dir={out}",
            "name=mw"]

    # Ctrl-C on the chief alone stops both workers after the same step, with a checkpoint
    codes, logs = run_workers(args, tmp_path, "stop", CHIEF_CTRL_C="1")
    assert codes == [130, 130], "\n\n".join(log[-3000:] for log in logs)
    assert "A stop signal on another worker: stopped after step 1 of epoch 2" in logs[1]
    state = checkpoint_state(out / "mw")
    assert (state["epoch"], state["step"]) == (1, 1)

    codes, logs = run_workers([str(driver), "--resume", str(out / "mw")], tmp_path, "resume")
    assert codes == [0, 0], "\n\n".join(log[-3000:] for log in logs)
    reports = [re.search(r"WORKER (\S+) chief=(\S+) dir=(\S+) weights=(\S+)", log).groups() for log in logs]
    assert [(name, chief) for name, chief, _, _ in reports] == [("worker0", "True"), ("worker1", "False")]
    (_, _, chief_dir, chief_weights), (_, _, worker_dir, worker_weights) = reports
    assert chief_weights == worker_weights != "None"  # identical final weights
    assert chief_dir == str(out / "mw")
    assert worker_dir.startswith(str(tmp_path / "tmp1"))
    assert not list((tmp_path / "tmp1").iterdir())  # the other worker's folders are gone
    assert [p.name for p in out.iterdir()] == ["mw"]  # only the chief's run directory
    assert_same_history(read_history(single_process_run), read_history(out / "mw"))  # = one process, uninterrupted
    assert "2 replica(s) on 2 worker(s)" in logs[0]
