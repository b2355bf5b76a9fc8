"""Stop training cleanly on Ctrl-C (SIGINT) or SIGTERM (schedulers, preemption).

The first signal only sets a flag: the training loop finishes the step in progress, saves a
checkpoint and raises :class:`TrainingInterrupted`, so ``--resume`` continues exactly there. A
second signal aborts at once with ``KeyboardInterrupt``; the last complete checkpoint stays.
"""
from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from types import FrameType, TracebackType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(Exception):
    """Training stopped on a signal after saving a checkpoint; ``exit_code`` is ``128 + signal``
    (130, as for SIGINT, on a worker stopped by another worker's signal)."""

    def __init__(self, run_dir: Path, signal_number: int | None, epoch: int, step: int):
        """``epoch`` finished epochs and ``step`` finished steps of the next one; ``signal_number``
        is None on a worker that stopped because another worker received the signal."""
        self.run_dir, self.signal_number, self.epoch, self.step = Path(run_dir), signal_number, epoch, step
        name = signal.Signals(signal_number).name if signal_number else "A stop signal on another worker"
        where = f"step {step} of epoch {epoch + 1}" if step else f"epoch {epoch}"
        super().__init__(
            f"{name}: stopped after {where} and saved a checkpoint. Continue with: python train.py --resume {run_dir}"
        )

    @property
    def exit_code(self) -> int:
        return 128 + (self.signal_number or signal.SIGINT)


class StopRequest:
    """While entered, SIGINT/SIGTERM request a stop instead of killing the process.

    Handlers can only be installed from the main thread; elsewhere the request is never set and
    signals keep their previous behaviour.
    """

    def __init__(self) -> None:
        self.signal_number: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal_number is not None

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signal_number: int, frame: FrameType | None) -> None:
        if self.requested:  # a second signal: the user does not want to wait for the checkpoint
            raise KeyboardInterrupt(f"{signal.Signals(signal_number).name} received twice")
        self.signal_number = signal_number
        print(
            f"\n{signal.Signals(signal_number).name} received: stopping after this step and saving a checkpoint "
            "(send it again to abort at once).",
            file=sys.stderr,
            flush=True,
        )
