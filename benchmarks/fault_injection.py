"""Fault injection: SIGKILL ``train.py`` and ``evaluate.py`` at many moments; every restart must work.

Usage: ``python benchmarks/fault_injection.py [--trials 3] [--seed 0] [--work /tmp/segpipe_faults]``

A tiny run (generated phantoms, 16³ patches, a 2-level U-Net with 4 base filters, 6 epochs of 6
steps, ``train.checkpoint_every_steps=2``) is trained once without interruption, as a subprocess
whose run directory is watched to time its phases (preprocessing, training, bundle export,
evaluation). Then each trial trains the same config into a fresh run directory and a fresh data
cache as a chain of starts, each killed with SIGKILL (the whole process group) at one *kill point*,
each start after the first continuing the previous one (``train.py --resume RUN_DIR``, or the first
command with ``--resume`` while the run has not saved its config yet):

* random moments: a delay drawn uniformly over a phase's length in the uninterrupted run, counted
  from a marker of that phase in this start's run directory or cache (its first cache entry, a
  checkpoint, the bundle's temporary folder), so that the kill lands near the phase however busy the
  machine is; the phase a kill really landed in is read from the run directory at that moment;
* failpoints, where the program kills itself (``SEGPIPE_FAILPOINT``, :func:`segpipe.io.failpoint`):
  a cache file, ``history.csv``, a prediction, ``per_case.csv`` or ``bundle.json`` complete under its
  temporary name but not renamed, and the three moments of a checkpoint swap. Random moments alone
  rarely land in a swap, which takes milliseconds.

After every kill: every cache entry the next start would trust holds the uninterrupted run's arrays;
the last checkpoint, ``best.keras`` and ``model.keras`` are complete zip files and the checkpoint's
history is a prefix of the uninterrupted history, as is ``history.csv``; a ``bundle/`` folder is a
complete bundle; ``per_case.csv`` is the uninterrupted evaluation's. The next start must not fail (a
start that exits on its own with an error breaks the point). When the chain is done: the history
equals the uninterrupted run's, the evaluation too, and no temporary file or folder is left in the
run directory. A kill point *holds* when all of this is true.

Prints one row per phase: kill points tried (kills that landed there), held, and the harmless
temporary files left in the data cache (never read; removed when the entry is rebuilt).

The kill points, the injection, these checks and the chain runner are ``tests/fault_harness.py``,
which ``tests/test_fault_injection.py`` runs with a few fixed kill points; this script holds the
benchmark's own parts: the tiny run's config, the timed uninterrupted run, each trial's random kill
points and the table.
"""
from __future__ import annotations

import argparse
import random
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# segpipe, and the fault harness and subprocess helpers this benchmark shares with its test (tests/)
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from fault_harness import (  # noqa: E402
    EPOCH,
    EVALUATION,
    EVERY,
    EXPORT,
    HISTORY,
    PREPROCESSING,
    SWAP,
    KillPoint,
    Outcome,
    Reference,
    cache_leftovers,
    caching,
    checkpoint_written,
    evaluate_args,
    exporting,
    log_tail,
    mid_epoch_checkpoint,
    read_csv,
    run_chain,
    summarize,
    train_args,
)
from process_helpers import start  # noqa: E402

STEPS, EPOCHS = 6, 4


def run_overrides(phantom_root: Path, cache_dir: Path, *, preprocess_workers: int = 1, epochs: int = EPOCHS,
                  steps: int = STEPS) -> list[str]:
    """The tiny run, with its own data cache (so a trial preprocesses, and can be killed doing it)."""
    return [f"data.root={phantom_root}", "data.phantoms=null", "data.patch_size=[16, 16, 16]", "data.batch_size=2",
            "data.val_fraction=0.34", f"data.cache_dir={cache_dir}", f"data.preprocess_workers={preprocess_workers}",
            "model.depth=2", "model.base_filters=4", f"train.epochs={epochs}", f"train.steps_per_epoch={steps}",
            f"train.checkpoint_every_steps={EVERY}"]


# ---------------------------------------------------------------- the benchmark


@dataclass
class Timeline:
    """Seconds from the start of the uninterrupted processes to their phase boundaries."""

    cache_start: float
    config: float
    export_start: float
    finished: float
    evaluate: float


BENCH_EPOCHS = 6  # more checkpoints than the test's run, so that one trial's kill points fit into it


def reference_run(work: Path, phantom_root: Path) -> tuple[Reference, Timeline]:
    """Train (and evaluate) the run once without interruption, timing its phases from its run directory."""
    cache = work / "reference-cache"
    overrides = run_overrides(phantom_root, cache, preprocess_workers=2, epochs=BENCH_EPOCHS)
    out = work / "reference"
    run_dir = out / "run"
    marks: dict[str, float] = {}
    started = time.monotonic()
    proc = start(train_args(overrides, out), work / "reference-train.log")

    def watch() -> None:
        tests = {"cache_start": lambda: any(cache.glob("preprocessed-*")),
                 "config": lambda: (run_dir / "config.yaml").is_file(),
                 "export_start": lambda: any(run_dir.glob(".bundle.tmp-*"))}
        while proc.poll() is None:
            for name, test in tests.items():
                if name not in marks and test():
                    marks[name] = time.monotonic() - started
            time.sleep(0.005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    if proc.wait(timeout=1800) != 0:
        raise RuntimeError(f"the uninterrupted run failed:\n{log_tail(work / 'reference-train.log')}")
    finished = time.monotonic() - started
    watcher.join()
    began = time.monotonic()
    if start(evaluate_args(run_dir, report=True), work / "reference-evaluate.log").wait(timeout=1800) != 0:
        raise RuntimeError(f"the uninterrupted evaluation failed:\n{log_tail(work / 'reference-evaluate.log')}")
    timeline = Timeline(marks.get("cache_start", 0.0), marks["config"], marks.get("export_start", finished), finished,
                        time.monotonic() - began)
    reference = Reference(read_csv(run_dir / "history.csv"), cache, run_dir / "evaluation" / "per_case.csv")
    return reference, timeline


def trial_points(rng: random.Random, timeline: Timeline, cache_dir: Path) -> list[KillPoint]:
    """One trial's kill points in pipeline order (11: failpoints at random counts, random moments)."""
    t = timeline
    cache_file = rng.choice(["image.npy", "label.npy", "locations.npy", "meta.json"])
    train_seconds = max(1.0, t.export_start - t.config)
    return [
        KillPoint(PREPROCESSING, failpoint=f"atomic_write@{cache_file}#{rng.randint(1, 2)}"),
        # the rest of the cache
        KillPoint(PREPROCESSING, after=caching(cache_dir), delay=(0.0, t.config - t.cache_start)),
        KillPoint(SWAP, failpoint=f"checkpoint_{rng.choice(['written', 'swap', 'swapped'])}#{rng.randint(1, 3)}"),
        KillPoint(EPOCH, after=checkpoint_written, delay=(0.0, train_seconds / 6)),
        KillPoint(HISTORY, failpoint=f"atomic_write@history.csv#{rng.randint(1, 2)}"),
        KillPoint(SWAP, failpoint=f"checkpoint_{rng.choice(['written', 'swap', 'swapped'])}#{rng.randint(1, 2)}"),
        KillPoint(EPOCH, after=mid_epoch_checkpoint, delay=(0.0, train_seconds / 8)),
        KillPoint(EXPORT, after=exporting, delay=(0.0, t.finished - t.export_start)),
        KillPoint(EXPORT, failpoint="atomic_write@bundle.json"),
        KillPoint(EVALUATION, command="evaluate", failpoint=rng.choice(
            ["atomic_write@.nii.gz#1", "atomic_write@.nii.gz#2", "atomic_write@per_case.csv",
             "atomic_write@summary.json"])),
        KillPoint(EVALUATION, command="evaluate", delay=(0.3 * t.evaluate, t.evaluate)),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=3, help="chains of 11 kill points (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("/tmp/segpipe_faults"), help="scratch folder (emptied)")
    args = parser.parse_args(argv)

    from segpipe.data.phantoms import PhantomSettings, write_phantom_dataset

    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    phantoms = write_phantom_dataset(args.work / "phantoms",
                                     PhantomSettings(num_cases=6, shape=(24, 24, 16), spacing_mm=(1.0, 1.0, 1.5),
                                                     seed=3))
    began = time.monotonic()
    reference, timeline = reference_run(args.work, phantoms)
    print(f"uninterrupted run: cache from {timeline.cache_start:.1f} s, training from {timeline.config:.1f} s, "
          f"export from {timeline.export_start:.1f} s, finished at {timeline.finished:.1f} s; "
          f"evaluation {timeline.evaluate:.1f} s", flush=True)
    rng = random.Random(args.seed)
    outcomes: list[Outcome] = []
    leftovers = 0
    for trial in range(args.trials):
        print(f"trial {trial + 1}/{args.trials}", flush=True)
        work = args.work / f"trial{trial}"
        cache = work / "cache"
        overrides = run_overrides(phantoms, cache, preprocess_workers=2, epochs=BENCH_EPOCHS)
        outcomes += run_chain(trial_points(rng, timeline, cache), overrides=overrides, output_dir=work / "out",
                              cache_dir=cache, reference=reference, rng=rng, logs=work / "logs", verbose=True)
        leftovers += len(cache_leftovers(cache))
    rows = summarize(outcomes)
    missed = sum(not o.killed and o.held for o in outcomes)
    print("\n| phase | kill points tried | held |\n|---|---|---|")
    for phase, tried, held in rows:
        print(f"| {phase} | {tried} | {held} |")
    tried, held = sum(r[1] for r in rows), sum(r[2] for r in rows)
    print(f"| all | {tried} | {held} |")
    print(f"\n{missed} kill point(s) missed (the start ended first; not counted); {leftovers} temporary file(s) "
          f"left in the data caches (never read); {time.monotonic() - began:.0f} s in all")
    broken = [o for o in outcomes if not o.held]
    for o in broken:
        print(f"BROKEN at {o.point.phase} ({o.point.describe()}): " + "\n  ".join(o.problems), file=sys.stderr)
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
