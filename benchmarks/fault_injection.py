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

After every kill (:func:`check_run`): every cache entry the next start would trust holds the
uninterrupted run's arrays; the last checkpoint, ``best.keras`` and ``model.keras`` are complete zip
files and the checkpoint's history is a prefix of the uninterrupted history, as is ``history.csv``;
a ``bundle/`` folder is a complete bundle; ``per_case.csv`` is the uninterrupted evaluation's. The
next start must not fail (a start that exits on its own with an error breaks the point). When the
chain is done: the history equals the uninterrupted run's, the evaluation too, and no temporary
file or folder is left in the run directory. A kill point *holds* when all of this is true.

Prints one row per phase: kill points tried (kills that landed there), held, and the harmless
temporary files left in the data cache (never read; removed when the entry is rebuilt).
``tests/test_fault_injection.py`` runs a few fixed kill points of the same harness.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # segpipe, and the subprocess helpers of the tests

from process_helpers import TRAIN, start  # noqa: E402

EVALUATE = REPO / "evaluate.py"
STEPS, EPOCHS, EVERY = 6, 4, 2
TIMEOUT = 300  # seconds for one start to reach its kill point (or finish)

PREPROCESSING, EPOCH, SWAP, HISTORY, EXPORT, EVALUATION = (
    "start-up, preprocessing, cache writes", "training (set-up, steps, epoch ends)", "checkpoint swap",
    "history.csv write", "bundle export", "evaluation writes")
PHASES = (PREPROCESSING, EPOCH, SWAP, HISTORY, EXPORT, EVALUATION)


def run_overrides(phantom_root: Path, cache_dir: Path, *, preprocess_workers: int = 1, epochs: int = EPOCHS,
                  steps: int = STEPS) -> list[str]:
    """The tiny run, with its own data cache (so a trial preprocesses, and can be killed doing it)."""
    return [f"data.root={phantom_root}", "data.phantoms=null", "data.patch_size=[16, 16, 16]", "data.batch_size=2",
            "data.val_fraction=0.34", f"data.cache_dir={cache_dir}", f"data.preprocess_workers={preprocess_workers}",
            "model.depth=2", "model.base_filters=4", f"train.epochs={epochs}", f"train.steps_per_epoch={steps}",
            f"train.checkpoint_every_steps={EVERY}"]


def train_args(overrides: Sequence[str], output_dir: Path) -> list[str]:
    """Continue the run as the docs say after a crash (``--resume RUN_DIR``: its saved config), or, before
    it has saved its config, start it again (the first command with ``--resume``: starts a new run)."""
    run_dir = output_dir / "run"
    if (run_dir / "config.yaml").is_file():
        return [str(TRAIN), "--resume", str(run_dir)]
    return [str(TRAIN), "--set", *overrides, f"output_dir={output_dir}", "name=run", "--resume"]


def evaluate_args(run_dir: Path, *, report: bool, workers: int | None = None) -> list[str]:
    return [str(EVALUATE), str(run_dir), *([] if report else ["--no-report"]),
            *([] if workers is None else ["--workers", str(workers)])]


# ---------------------------------------------------------------- kill points


@dataclass
class KillPoint:
    """Where one start dies: at a failpoint, or ``delay`` seconds (a random range) after ``after`` holds.

    ``after`` gets the run directory and the start's time; None: from the start of the process.
    """

    phase: str
    command: str = "train"  # or "evaluate"
    failpoint: str | None = None
    after: Callable[[Path, float], bool] | None = None
    delay: tuple[float, float] = (0.0, 0.0)

    def describe(self) -> str:
        if self.failpoint:
            return f"SEGPIPE_FAILPOINT={self.failpoint}"
        return f"{self.delay[0]:.2f}-{self.delay[1]:.2f} s after {getattr(self.after, '__name__', 'start')}"


@dataclass
class Outcome:
    point: KillPoint
    killed: bool  # False: the start ended before the kill point (a missed point, not tried)
    landed: str  # the phase the kill landed in
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def held(self) -> bool:
        return not self.problems


def mid_epoch_checkpoint(run_dir: Path, since: float) -> bool:
    """A checkpoint in the middle of an epoch, written by this start."""
    state = _state(run_dir)
    return bool(state and state.get("step") and _mtime(run_dir / "checkpoints" / "last" / "state.json") > since)


def checkpoint_written(run_dir: Path, since: float) -> bool:
    """Any checkpoint written by this start (training is under way)."""
    return _mtime(run_dir / "checkpoints" / "last" / "state.json") > since


def exporting(run_dir: Path, since: float) -> bool:
    """The bundle is being written (its temporary folder exists)."""
    return any(run_dir.glob(".bundle.tmp-*"))


def landed_phase(point: KillPoint, run_dir: Path, since: float) -> str:
    """The phase a kill landed in, from what this start (begun at ``since``) has written so far: every
    start rewrites ``config.yaml`` once its data is prepared, ``model.keras`` when training is done."""
    if point.failpoint or point.command == "evaluate":
        return point.phase
    if _mtime(run_dir / "config.yaml") <= since:
        return PREPROCESSING
    if any(run_dir.glob(".bundle.tmp-*")) or _mtime(run_dir / "model.keras") > since:
        return EXPORT
    return EPOCH


def inject(point: KillPoint, args: list[str], run_dir: Path, log: Path, rng: random.Random) -> Outcome:
    """Start ``python ARGS``, kill it at ``point``; a start that ends on its own must exit 0."""
    env = {"SEGPIPE_FAILPOINT": point.failpoint} if point.failpoint else {}
    started = time.time()
    proc = start(args, log, **env)
    landed = point.phase
    try:
        deadline = time.monotonic() + TIMEOUT
        if point.failpoint is None:
            while point.after is not None and not point.after(run_dir, started) and proc.poll() is None:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{point.describe()}: not reached in {TIMEOUT} s")
                time.sleep(0.01)
            end = time.monotonic() + rng.uniform(*point.delay)
            while proc.poll() is None and time.monotonic() < end:
                time.sleep(0.005)
            if proc.poll() is None:
                landed = landed_phase(point, run_dir, started)
                os.killpg(proc.pid, signal.SIGKILL)
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        with contextlib.suppress(ProcessLookupError):  # orphaned preprocessing workers die with the program
            os.killpg(proc.pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    outcome = Outcome(point, killed=code == -signal.SIGKILL, landed=landed, seconds=time.time() - started)
    if code not in (0, -signal.SIGKILL):
        outcome.problems.append(f"the start failed (exit {code}) after the previous kill:\n{_tail(log)}")
    return outcome


# ---------------------------------------------------------------- what must hold after a kill


@dataclass
class Reference:
    """The uninterrupted run: its history rows, its data cache folder, its evaluation (per_case.csv)."""

    history: list[dict]
    cache_dir: Path
    per_case: Path | None = None


def check_run(run_dir: Path, cache_dir: Path, reference: Reference) -> list[str]:
    """Everything a next start (or a reader) would trust is complete and right; returns the problems."""
    problems = _check_cache(cache_dir, reference.cache_dir)
    checkpoints = run_dir / "checkpoints"
    last = _last_checkpoint(checkpoints / "last")
    if last is not None:
        problems += _check_zip(last / "model.keras")
        try:
            state = json.loads((last / "state.json").read_text())
            problems += _check_prefix(f"{last}/state.json history", state["history"], reference.history)
        except (ValueError, KeyError) as exc:
            problems.append(f"{last}/state.json unreadable: {exc}")
    for model in (checkpoints / "best.keras", run_dir / "model.keras"):
        if model.exists():
            problems += _check_zip(model)
    if (run_dir / "history.csv").exists():
        problems += _check_prefix("history.csv", _read_csv(run_dir / "history.csv"), reference.history)
    problems += _check_bundle(run_dir / "bundle")
    for name in ("status.json", "splits.json", "preprocessing.json", "evaluation/summary.json"):
        if (run_dir / name).exists():
            try:
                json.loads((run_dir / name).read_text())
            except ValueError as exc:
                problems.append(f"{name} half-written: {exc}")
    per_case = run_dir / "evaluation" / "per_case.csv"
    if per_case.exists() and reference.per_case is not None:
        problems += _check_per_case(per_case, reference.per_case)
    return problems


def check_finished(run_dir: Path, reference: Reference) -> list[str]:
    """The chain's end: finished, the uninterrupted history, nothing temporary left in the run directory."""
    problems = []
    status = (json.loads((run_dir / "status.json").read_text())["status"] if (run_dir / "status.json").is_file()
              else None)
    if status != "finished":
        problems.append(f"status {status!r}, expected 'finished'")
    rows = _read_csv(run_dir / "history.csv") if (run_dir / "history.csv").is_file() else []
    if len(rows) != len(reference.history):
        problems.append(f"history.csv has {len(rows)} rows, the uninterrupted run {len(reference.history)}")
    problems += _check_prefix("history.csv", rows, reference.history)
    problems += [f"left behind: {p}" for p in run_leftovers(run_dir)]
    return problems


def run_leftovers(run_dir: Path) -> list[Path]:
    """Temporary files and folders of killed writes in the run directory, predictions/ and evaluation/
    included (the next evaluation removes those of killed ones)."""
    found = [p for folder in (run_dir, run_dir / "checkpoints") if folder.is_dir() for p in folder.glob(".*.tmp*")]
    found += [p for folder in (run_dir / "predictions", run_dir / "evaluation") if folder.is_dir()
              for p in folder.rglob(".*.tmp*")]
    found += list(run_dir.glob(".bundle.*"))
    found += [p for p in (run_dir / "checkpoints" / "last.tmp", run_dir / "checkpoints" / "last.old") if p.exists()]
    return found


def cache_leftovers(cache_dir: Path) -> list[Path]:
    """Temporary files of killed writes in the data cache (never read; removed when the entry is rebuilt)."""
    return list(cache_dir.rglob(".*.tmp*")) if cache_dir.is_dir() else []


def _check_cache(cache_dir: Path, reference_dir: Path) -> list[str]:
    """Every case the cache would trust (segpipe.data.cache.load_cached_case) holds the reference arrays."""
    from segpipe.data.cache import load_cached_case

    problems = []
    for folder in sorted(cache_dir.glob("preprocessed-*")):
        for case_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
            cached = load_cached_case(case_dir)
            if cached is None:
                continue  # not trusted: rebuilt by the next start
            ref = reference_dir / folder.name / case_dir.name
            ref_meta = json.loads((ref / "meta.json").read_text())
            if cached.meta.get("key") != ref_meta.get("key"):
                problems.append(f"cache entry {case_dir} trusted with another key")
            for name in ("image", "label", "locations"):
                if not np.array_equal(np.load(case_dir / f"{name}.npy"), np.load(ref / f"{name}.npy")):
                    problems.append(f"cache entry {case_dir}/{name}.npy trusted but differs from an uninterrupted "
                                    "run's")
    return problems


def _last_checkpoint(folder: Path) -> Path | None:
    from segpipe.runs.rundir import find_last_checkpoint

    return find_last_checkpoint(folder)


def _check_zip(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError) as exc:
        return [f"{path} is not a complete .keras file: {exc}"]
    return [f"{path}: corrupt member {bad}"] if bad else []


def _check_bundle(bundle: Path) -> list[str]:
    if not bundle.exists():
        return []
    from segpipe.inference.bundle import read_bundle

    try:
        read_bundle(bundle)  # every file against its size and SHA-256 in the manifest: complete, unchanged
    except Exception as exc:  # noqa: BLE001 - any failure to read it is the finding
        return [f"{bundle} incomplete: {type(exc).__name__}: {exc}"]
    return []


def _check_prefix(what: str, rows: list[dict], reference: list[dict]) -> list[str]:
    """``rows`` are the first rows of the reference history (same epochs, values within 1e-5)."""
    if len(rows) > len(reference):
        return [f"{what}: {len(rows)} rows, more than the {len(reference)} epochs"]
    for row, ref in zip(rows, reference):
        if str(row.get("epoch")) != str(ref["epoch"]) or set(row) != set(ref):
            return [f"{what}: row {row.get('epoch')} has other epochs or columns than the uninterrupted run"]
        for key in ref:
            a, b = float(row[key]), float(ref[key])
            if not (math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6) or (math.isnan(a) and math.isnan(b))):
                return [f"{what}: epoch {ref['epoch']} {key} = {a}, uninterrupted {b}"]
    return []


def _check_per_case(path: Path, reference: Path) -> list[str]:
    rows, ref = _read_csv(path), _read_csv(reference)
    if len(rows) != len(ref):
        return [f"{path}: {len(rows)} rows, the uninterrupted evaluation {len(ref)}"]
    for row, want in zip(rows, ref):
        for key, value in want.items():
            if row.get(key) != value and not _close(row.get(key), value):
                return [f"{path}: {row.get('case')} {key} = {row.get(key)}, uninterrupted {value}"]
    return []


def _close(a: str | None, b: str) -> bool:
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-4, abs_tol=1e-6)
    except (TypeError, ValueError):
        return False


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _state(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / "checkpoints" / "last" / "state.json").read_text())
    except (OSError, ValueError):
        return None


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _tail(log: Path, chars: int = 3000) -> str:
    try:
        return log.read_text()[-chars:]
    except OSError:
        return ""


# ---------------------------------------------------------------- a chain of kill points


def run_chain(points: Sequence[KillPoint], *, overrides: list[str], output_dir: Path, cache_dir: Path,
              reference: Reference, rng: random.Random, logs: Path, report: bool = True, workers: int | None = None,
              verbose: bool = False, finisher: Callable[[str], list[str]] | None = None) -> list[Outcome]:
    """Kill the run at each point in turn (resuming each time), then finish it; evaluation points
    come after training is finished. Returns one outcome per point; problems found at the end of
    the chain go to its last point. ``finisher(command)`` (optional) finishes ``"train"`` or
    ``"evaluate"`` instead of a subprocess (a test runs it in its own process) and returns problems."""
    run_dir = output_dir / "run"
    logs.mkdir(parents=True, exist_ok=True)
    outcomes: list[Outcome] = []

    def finish(command: str) -> list[str]:
        args = (train_args(overrides, output_dir) if command == "train"
                else evaluate_args(run_dir, report=report, workers=workers))
        log = logs / f"{len(outcomes):02d}-finish-{command}.log"
        proc = start(args, log)
        try:
            code = proc.wait(timeout=TIMEOUT)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        return [] if code == 0 else [f"{command} after the last kill failed (exit {code}):\n{_tail(log)}"]

    for command in ("train", "evaluate"):
        if not any(p.command == command for p in points):
            continue
        for point in (p for p in points if p.command == command):
            args = (train_args(overrides, output_dir) if command == "train"
                    else evaluate_args(run_dir, report=report, workers=workers))
            outcome = inject(point, args, run_dir, logs / f"{len(outcomes):02d}-{command}.log", rng)
            outcome.problems += check_run(run_dir, cache_dir, reference)
            outcomes.append(outcome)
            if verbose:
                print(f"  {point.phase:<28} {point.describe():<44} {'killed' if outcome.killed else 'missed'}"
                      f" in {outcome.landed:<28} "
                      f"{'held' if outcome.held else 'BROKEN: ' + '; '.join(outcome.problems)}",
                      flush=True)
        end = finisher(command) if finisher is not None else finish(command)
        end += check_run(run_dir, cache_dir, reference)
        if command == "train":
            end += check_finished(run_dir, reference)
        else:
            if reference.per_case is not None and not (run_dir / "evaluation" / "per_case.csv").is_file():
                end.append("evaluation/per_case.csv missing after the last evaluation")
            end += [f"left behind: {p}" for p in run_leftovers(run_dir)]
        if end:
            outcomes[-1].problems += end
    return outcomes


def summarize(outcomes: Sequence[Outcome]) -> list[tuple[str, int, int]]:
    """(phase, kill points tried there, held) per phase, in pipeline order; a missed point is not counted
    unless something broke (a start that failed)."""
    tried = [o for o in outcomes if o.killed or o.problems]
    return [(phase, sum(o.landed == phase for o in tried), sum(o.landed == phase and o.held for o in tried))
            for phase in PHASES]


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
        raise RuntimeError(f"the uninterrupted run failed:\n{_tail(work / 'reference-train.log')}")
    finished = time.monotonic() - started
    watcher.join()
    began = time.monotonic()
    if start(evaluate_args(run_dir, report=True), work / "reference-evaluate.log").wait(timeout=1800) != 0:
        raise RuntimeError(f"the uninterrupted evaluation failed:\n{_tail(work / 'reference-evaluate.log')}")
    timeline = Timeline(marks.get("cache_start", 0.0), marks["config"], marks.get("export_start", finished), finished,
                        time.monotonic() - began)
    reference = Reference(_read_csv(run_dir / "history.csv"), cache, run_dir / "evaluation" / "per_case.csv")
    return reference, timeline


def caching(cache_dir: Path) -> Callable[[Path, float], bool]:
    """This start is writing the data cache (it has completed a case): a moment tied to the run's
    progress, so that a kill lands in the phase it is meant for however busy the machine is."""
    def cache_case_written(run_dir: Path, since: float) -> bool:
        return any(_mtime(meta) > since for meta in cache_dir.glob("preprocessed-*/*/meta.json"))
    return cache_case_written


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
