"""The fault-injection harness: kill ``train.py`` and ``evaluate.py`` with SIGKILL at chosen moments and check
that every restart works.

Shared by ``tests/test_fault_injection.py`` (a few fixed kill points) and
``benchmarks/fault_injection.py`` (random kill points over many trials, timed against an uninterrupted
run); both import it by name (``tests/`` is on ``sys.path``). A run is trained as a chain of starts,
each killed (the whole process group) at one :class:`KillPoint`, each start after the first
continuing the previous one (``train.py --resume RUN_DIR``, or the first command with ``--resume``
while the run has not saved its config yet; :func:`train_args`). A kill point is

* a failpoint, where the program kills itself (``SEGPIPE_FAILPOINT``, :func:`segpipe.io.failpoint`):
  a file complete under its temporary name but not renamed, or one of the three moments of a
  checkpoint swap; or
* a random moment: a delay drawn from a range, counted from a marker of a phase in this start's run
  directory or cache (:func:`caching`, :func:`checkpoint_written`, :func:`mid_epoch_checkpoint`,
  :func:`exporting`), so that the kill lands near the phase however busy the machine is; the phase a
  kill really landed in is read from the run directory at that moment (:func:`landed_phase`).

After every kill (:func:`check_run`): every cache entry the next start would trust holds the
uninterrupted run's arrays; the last checkpoint, ``best.keras`` and ``model.keras`` are complete zip
files and the checkpoint's history is a prefix of the uninterrupted history, as is ``history.csv``;
a ``bundle/`` folder is a complete bundle; ``per_case.csv`` is the uninterrupted evaluation's. The
next start must not fail (a start that exits on its own with an error breaks the point). When the
chain is done (:func:`run_chain`, :func:`check_finished`): the history equals the uninterrupted
run's, the evaluation too, and no temporary file or folder is left in the run directory. A kill
point *holds* when all of this is true; :func:`summarize` counts kill points tried and held per phase.
"""
from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import random
import signal
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from process_helpers import REPO, TRAIN, start

EVALUATE = REPO / "evaluate.py"
EVERY = 2  # train.checkpoint_every_steps of the runs killed: mid-epoch checkpoints to kill around
TIMEOUT = 300  # seconds for one start to reach its kill point (or finish)

PREPROCESSING, EPOCH, SWAP, HISTORY, EXPORT, EVALUATION = (
    "start-up, preprocessing, cache writes", "training (set-up, steps, epoch ends)", "checkpoint swap",
    "history.csv write", "bundle export", "evaluation writes")
PHASES = (PREPROCESSING, EPOCH, SWAP, HISTORY, EXPORT, EVALUATION)


def train_args(overrides: Sequence[str], output_dir: Path) -> list[str]:
    """Continue the run as the docs say after a crash (``--resume RUN_DIR``: its saved config), or, before
    it has saved its config, start it again (the first command with ``--resume``: starts a new run)."""
    run_dir = output_dir / "run"
    if (run_dir / "config.yaml").is_file():
        return [str(TRAIN), "--resume", str(run_dir)]
    return [str(TRAIN), "--set", *overrides, f"output_dir={output_dir}", "name=run", "--resume"]


def evaluate_args(run_dir: Path, *, report: bool, workers: int | None = None) -> list[str]:
    """``evaluate.py RUN_DIR`` (with ``--no-report`` unless ``report``, ``--workers N`` when given)."""
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


def caching(cache_dir: Path) -> Callable[[Path, float], bool]:
    """This start is writing the data cache (it has completed a case): a moment tied to the run's
    progress, so that a kill lands in the phase it is meant for however busy the machine is."""
    def cache_case_written(run_dir: Path, since: float) -> bool:
        return any(_mtime(meta) > since for meta in cache_dir.glob("preprocessed-*/*/meta.json"))
    return cache_case_written



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
        outcome.problems.append(f"the start failed (exit {code}) after the previous kill:\n{log_tail(log)}")
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
        problems += _check_prefix("history.csv", read_csv(run_dir / "history.csv"), reference.history)
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
    rows = read_csv(run_dir / "history.csv") if (run_dir / "history.csv").is_file() else []
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
    rows, ref = read_csv(path), read_csv(reference)
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


def read_csv(path: Path) -> list[dict]:
    """The rows of a CSV file (``history.csv``, ``per_case.csv``) as dicts of strings."""
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


def log_tail(log: Path, chars: int = 3000) -> str:
    """The last ``chars`` characters of a start's log (empty if it cannot be read)."""
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
        return [] if code == 0 else [f"{command} after the last kill failed (exit {code}):\n{log_tail(log)}"]

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
