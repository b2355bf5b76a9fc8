"""Several runs in turn: configs x folds into one experiment folder, failures reported, a summary at the end.

``train.py --config a.yaml b.yaml ... [--experiment NAME] [--folds K]`` is planned by :func:`plan_runs`
and run by :func:`run_sweep`:

- each config trains into its run directory, ``<output_dir>/[<experiment>/]<name>``; with k folds
  (``--folds K`` or ``data.folds``) every config trains on every fold into ``<name>_fold<k>``, the
  names :mod:`segpipe.evaluation.compare` groups by configuration;
- configs of one experiment share the dataset cache and hence the split of a given seed, so their
  runs can be compared pairwise (``evaluate.py --compare <output_dir>/<experiment>``);
- a finished run is skipped; an unfinished one (crash, Ctrl-C) is continued from its last
  checkpoint when the sweep is started again with ``--resume`` (each run resumes only with the config
  it was started with), and without ``--resume`` it is reported as failed, so nothing is overwritten
  by accident;
- a run that fails (any exception but a stop signal) is reported with its error and the sweep goes
  on with the next; a stop signal (Ctrl-C, SIGTERM) ends the sweep after the interrupted run's
  checkpoint;
- at the end a summary lists the runs that finished, were skipped or failed.
"""
from __future__ import annotations

import copy
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, TextIO

from segpipe.config import Config, ConfigError, validate
from segpipe.errors import Received, StorageError, expected
from segpipe.runs.rundir import RunDir
from segpipe.training.cluster import WorkerLost
from segpipe.training.interrupts import TrainingInterrupted


def _expected_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message says everything (segpipe's own checks); any other failure also gets a traceback."""
    return ConfigError, StorageError, FileExistsError, FileNotFoundError, ValueError, WorkerLost


@dataclass
class RunOutcome:
    """What became of one planned run: ``finished`` (trained now), ``skipped`` (had finished before),
    ``failed``, ``interrupted`` (stop signal; checkpoint saved) or ``not started``."""

    name: str
    run_dir: Path
    status: str
    error: str | None = None


def plan_runs(configs: Sequence[Config], *, folds: int | None = None,
              only_folds: Sequence[int] | None = None) -> list[Config]:
    """The runs of a sweep, in order: every config, times every fold when k-fold is on.

    Parameters
    ----------
    configs
        loaded configs (``--experiment`` and other overrides already applied).
    folds
        number of folds for every config (``--folds``); ``None`` keeps each config's ``data.folds``.
    only_folds
        train only these folds (``--fold``); ``None`` trains all.

    Returns
    -------
    list[Config]
        One config per run. With k folds, config ``x`` becomes ``x_fold0`` ... ``x_fold<k-1>`` with
        ``data.folds = k`` and ``data.fold`` set.

    Raises
    ------
    ConfigError
        fewer than 2 folds, ``only_folds`` without k-fold, a fold out of range, or two
        runs that would share a run directory.
    """
    if folds is not None and (isinstance(folds, bool) or not isinstance(folds, int) or folds < 2):
        raise ConfigError(expected("a number of folds >= 2", key="--folds", received=folds))
    runs: list[Config] = []
    for config in configs:
        k = folds if folds is not None else config.data.folds
        if k is None:
            if only_folds is not None:
                raise ConfigError(expected(f"k-fold training (--folds K or data.folds in {config.name})", key="--fold",
                                           received=Received(f"{' '.join(map(str, only_folds))} without folds")))
            runs.append(config)
            continue
        for fold in range(k) if only_folds is None else only_folds:
            run = copy.deepcopy(config)
            run.data.folds, run.data.fold, run.name = k, fold, f"{config.name}_fold{fold}"
            validate(run)  # fold in 0..k-1
            runs.append(run)
    seen: dict[Path, str] = {}
    for run in runs:
        run_dir = RunDir.of(run).path
        if run_dir in seen:
            raise ConfigError(expected(
                "a different run name for every config of a sweep", key="name",
                received=Received(f"{run.name!r} twice (both would train into {run_dir})"),
                hint="Set `name:` in one of the files.",
            ))
        seen[run_dir] = run.name
    return runs


def comparability_warning(runs: Sequence[Config]) -> str | None:
    """A warning when the runs cannot all be compared pairwise (different dataset, seed or split settings)."""
    keys = {(str(Path(r.data.root).resolve()), r.seed, r.data.folds,
             r.data.val_fraction if r.data.folds is None else None)
            for r in runs}
    if len(keys) <= 1:
        return None
    return ("warning: these configs use different datasets, seeds or split settings "
            "(data.root, seed, data.folds, data.val_fraction), so their runs will not share a split and "
            "evaluate.py --compare will refuse to pair them")


def run_sweep(
    runs: Sequence[Config],
    *,
    resume: bool = False,
    overwrite: bool = False,
    train_fn: Callable[..., Path] | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
    run_dirs: Sequence[Path] | None = None,
    before_run: Callable[[Config, int], Config] | None = None,
) -> tuple[list[RunOutcome], int]:
    """Train ``runs`` in turn; returns the outcomes and the exit code (0, 1 if any failed, 130/143 on a stop signal).

    Parameters
    ----------
    runs
        from :func:`plan_runs`.
    resume
        continue unfinished runs from their last checkpoint (runs not started yet start).
    overwrite
        train every run anew, finished or not.
    train_fn
        :func:`segpipe.training.train.train` (replaceable in tests).
    out, err
        where progress and errors go (default stdout, stderr).
    run_dirs
        the run directory of each run (``train.py --resume RUN_DIR``: the folder itself, not
        ``RunDir.of(config)``, which resolves a relative ``output_dir`` against the current folder).
    before_run
        called with each run's config and its index just before it trains (a run not
        finished before); returns the config to train (``train.py --folds K`` with a time budget
        shortens a fold's allowance when earlier folds ran late).
    """
    from segpipe.training.train import train  # TensorFlow: planning and summarising a sweep do not need it

    train_fn = train_fn or train
    out, err = out or sys.stdout, err or sys.stderr
    outcomes: list[RunOutcome] = []
    code = 0
    for i, config in enumerate(runs):
        run_dir = RunDir.of(config).path if run_dirs is None else Path(run_dirs[i])
        where = {} if run_dirs is None else {"run_dir": run_dir}
        if len(runs) > 1:
            print(f"\n[{i + 1}/{len(runs)}] {config.name} -> {run_dir}", file=out, flush=True)
        finished_before = not overwrite and RunDir(run_dir).status() == "finished"
        if before_run is not None and not finished_before:
            config = before_run(config, i)
        try:
            run_dir = train_fn(config, resume=resume, overwrite=overwrite, **where)
            print(f"Run directory: {run_dir}", file=out, flush=True)
            outcomes.append(RunOutcome(config.name, run_dir, "skipped" if finished_before else "finished"))
        except TrainingInterrupted as exc:  # Ctrl-C / SIGTERM: a checkpoint was saved; stop the sweep
            print(f"{config.name}: {exc}", file=err, flush=True)
            outcomes.append(RunOutcome(config.name, run_dir, "interrupted", str(exc)))
            outcomes += [RunOutcome(c.name, RunDir.of(c).path, "not started") for c in runs[i + 1:]]
            code = exc.exit_code
            break
        except Exception as exc:  # any failure of this run: report it, go on with the next
            if isinstance(exc, _expected_errors()):
                print(f"error: {config.name}: {exc}", file=err, flush=True)
            else:
                print(f"error: {config.name}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}", file=err,
                      flush=True)
            outcomes.append(RunOutcome(config.name, run_dir, "failed", f"{type(exc).__name__}: {exc}"))
            code = 1
    if len(runs) > 1:
        print(format_summary(outcomes, resume=resume), file=out, flush=True)
    return outcomes, code


def format_summary(outcomes: Sequence[RunOutcome], *, resume: bool = False) -> str:
    """The end-of-sweep table: one line per run, counts, and how to continue."""
    notes = {"skipped": "already finished"}
    width = max(len(o.name) for o in outcomes)
    lines = ["", "Sweep summary: " + ", ".join(
        f"{sum(o.status == s for o in outcomes)} {s}"
        for s in ("finished", "skipped", "failed", "interrupted", "not started")
        if any(o.status == s for o in outcomes))]
    for o in outcomes:
        detail = o.error.splitlines()[0] if o.error and o.status == "failed" else notes.get(o.status, "")
        lines.append(f"  {o.status:<11} {o.name:<{width}}  {o.run_dir}" + (f"  ({detail})" if detail else ""))
    if any(o.status in ("interrupted", "not started") for o in outcomes):
        lines.append("To continue, run the same command again with --resume: finished runs are skipped and the "
                     "interrupted run continues from its checkpoint.")
    elif any(o.status == "failed" for o in outcomes):
        lines.append("Fix what failed and run the same command again: finished runs are skipped"
                     + ("." if resume else "; add --resume to continue unfinished runs from their checkpoints."))
    return "\n".join(lines)
