"""``train.py`` for one worker of a test cluster, with a fault on request (tests/test_distributed.py).

``SEGPIPE_TEST_FAULT=die:N``: the worker SIGKILLs itself after its N-th training step (counted in
this process). ``SEGPIPE_TEST_FAULT=stall:N``: it stays alive but stops taking part (sleeps) after
its N-th step. Just before, it prints ``FAULT <kind> <time.time()>`` so that the test can time how
long the other worker takes to stop. Without the variable it is plain ``train.py``.
"""
from __future__ import annotations

import os
import signal
import sys
import time

import segpipe  # noqa: F401  (TensorFlow's environment first)
import train
from segpipe.training.checkpoints import RunCheckpoint

KIND, _, AFTER = os.environ.get("SEGPIPE_TEST_FAULT", "").partition(":")
steps = 0


def on_train_batch_end(self, batch, logs=None):
    global steps
    ORIGINAL(self, batch, logs)
    steps += 1
    if steps == int(AFTER):
        print(f"FAULT {KIND} {time.time():.3f}", flush=True)
        if KIND == "die":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(3600)


if KIND:
    ORIGINAL = RunCheckpoint.on_train_batch_end
    RunCheckpoint.on_train_batch_end = on_train_batch_end

if __name__ == "__main__":
    sys.exit(train.main(sys.argv[1:]))
