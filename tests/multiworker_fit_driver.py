"""One step of ``model.fit`` of the U-Net under MultiWorkerMirroredStrategy (TF_CONFIG set: this
worker feeds its half of the global batch) or in one process (no TF_CONFIG: the whole batch);
saves the weights after the step to ``OUT.npz`` and prints the logged loss.

``python tests/multiworker_fit_driver.py CASE OUT`` with CASE from mirrored_fit_driver.CASES.
"""
from __future__ import annotations

import json
import os
import sys

import tensorflow as tf

import segpipe  # noqa: F401  (TensorFlow's environment first)

distributed = "TF_CONFIG" in os.environ
strategy = tf.distribute.MultiWorkerMirroredStrategy() if distributed else tf.distribute.get_strategy()

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from mirrored_fit_driver import BATCH, DS_DEPTH, batch, build  # noqa: E402

from segpipe.losses import deep_supervision_targets  # noqa: E402


def main(case: str, out: str) -> None:
    x, y = batch()
    if case == "deep_supervision":
        y = tuple(np.asarray(t) for t in deep_supervision_targets(y, DS_DEPTH - 1))
    if distributed:
        index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
        half = slice(index * BATCH // 2, (index + 1) * BATCH // 2)
        x = x[half]
        y = tuple(t[half] for t in y) if isinstance(y, tuple) else y[half]
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(len(x))
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    ds = ds.with_options(options)
    with strategy.scope():
        model = build(case, None)
    history = model.fit(ds, epochs=1, verbose=0).history
    np.savez(out, *model.get_weights())
    print("RESULT " + json.dumps({"case": case, "replicas": strategy.num_replicas_in_sync,
                                  "loss": history["loss"]}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
