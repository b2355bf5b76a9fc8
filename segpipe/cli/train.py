"""``train.py`` / ``segpipe-train``: train one config or a sweep of configs (x folds)."""
from __future__ import annotations

import argparse
import copy
import glob
import json
import re
import sys
import time
from pathlib import Path

from segpipe.cli import evaluate, prog_name
from segpipe.cli.plan import planned_config, planned_run_name, report
from segpipe.config import Config, ConfigError, load_config
from segpipe.data.pipeline import DataError
from segpipe.errors import Received, StorageError, expected
from segpipe.io import read_json, write_json
from segpipe.ownership import check_replaceable
from segpipe.planning.output import budget_line, budget_report
from segpipe.planning.time_plan import EXPORT_SECONDS
from segpipe.runs.rundir import RunDir
from segpipe.training.sweep import comparability_warning, plan_runs, run_sweep

ALLOWANCE_STEP_MINUTES = 0.05  # a run's allowance changes only by more than 3 s

TRAIN_HELP = """Train a 3D segmentation model from a config file, or several in turn (a sweep).

    python train.py                                  # configs/default.yaml (generated phantoms)
    python train.py --config configs/x.yaml --set train.epochs=3 loss.name=tversky
    python train.py --resume runs/default            # continue an interrupted run
    python train.py --config configs/losses/*.yaml --experiment losses [--folds 5]
                                                     # a sweep into runs/losses/<config>[_fold<k>]/
    python evaluate.py --compare runs/losses         # compare the runs of that experiment
    python train.py --set data.root=PATH/TO/DATASET  # your own data: plan for this machine, then train
    python train.py --set data.root=DIR train.time_budget_minutes=60   # ... fitted to a time budget
    python train.py --plan-only --set data.root=DIR  # only write and print the plan (segpipe-plan DIR)

Your own data (docs/planning.md): without --config, a data.root given on the command line is
planned from its fingerprint (spacing, patch, network, batch, schedule); keys given with --set
win over the plan. A config with train.time_budget_minutes is planned too, and its run is evaluated
(evaluate.py RUN_DIR) right after training, inside the budget; --no-plan trains the configs as written.

A sweep trains each config (on each fold) in turn: finished runs are skipped, a failed run is
reported and the sweep goes on, and a summary ends it (exit code 1 if any run failed). Run the same
command again, with --resume, to continue an interrupted sweep, interrupted runs included.

Ctrl-C (or SIGTERM) stops after the current step and saves a checkpoint (exit code 130 / 143);
press it twice to abort at once. Several GPUs or machines: train.distribute (README.md, "Several GPUs").
"""


def main(argv: list[str] | None = None) -> int:
    """``train.py``: train one config or a sweep of configs (x folds); returns the exit code.

    0: every run finished or had finished; 1: a run failed; 2: a config could not be loaded;
    130 / 143: stopped by SIGINT / SIGTERM (checkpoint saved).
    """
    parser = argparse.ArgumentParser(prog=prog_name("train"), description=TRAIN_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", nargs="+", default=None,
                        help="YAML config file(s) or glob patterns, trained in turn; default: configs/default.yaml")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="dotted overrides, e.g. train.epochs=3")
    parser.add_argument("--experiment", metavar="NAME",
                        help="train into <output_dir>/NAME/<config name>/ (the folder evaluate.py --compare takes)")
    parser.add_argument("--folds", type=int, metavar="K",
                        help="k-fold: train every config on every fold into <name>_fold<k> (default: data.folds)")
    parser.add_argument("--fold", type=int, nargs="+", metavar="I", help="with k-fold: train only these folds")
    parser.add_argument("--resume", nargs="?", const=True, default=False, metavar="RUN_DIR",
                        help="continue an interrupted run (its own config) from its last checkpoint; without "
                             "RUN_DIR, continue the unfinished runs of the configs given")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete an existing run of the same name first (only a folder segpipe created as a run)")
    parser.add_argument("--plan-only", action="store_true",
                        help="write and print the plan (plan.json, plan.yaml), do not train")
    parser.add_argument("--no-plan", action="store_true", help="never plan: train the configs as written")
    args = parser.parse_args(argv)
    started = time.monotonic()  # the whole command, for budget.json

    result = None  # the plan, when this command plans
    try:
        if isinstance(args.resume, str):
            if args.config or args.set or args.experiment or args.folds is not None or args.fold:
                parser.error("--resume RUN_DIR continues a run with its saved config; "
                             "do not pass --config/--set/--experiment/--folds/--fold")
            runs = [RunDir(args.resume).config()]
            run_dirs = [Path(args.resume)]  # the run itself, wherever this command runs from
        else:
            # quoted, so a name like 2024-05 stays a string (override values are parsed as YAML)
            experiment = [f"experiment={json.dumps(args.experiment)}"] if args.experiment is not None else []
            overrides = [*args.set, *experiment]
            if args.folds is not None:  # the plan divides a time budget over the folds
                overrides.append(f"data.folds={args.folds}")
            paths = _config_paths(args.config) if args.config else [str(default_config_path())]
            configs = [load_config(p, overrides) for p in paths]
            wants_plan = _wants_plan(args, configs)
            if args.overwrite and not args.plan_only:  # before planning touches the data: a refusal writes nothing
                named = configs
                if wants_plan and len(paths) == 1:
                    named = [_renamed(configs[0], planned_run_name(paths[0] if args.config else None, overrides))]
                check_overwrite(plan_runs(named, folds=args.folds, only_folds=args.fold))
            if wants_plan:
                if len(paths) > 1:
                    parser.error("planning takes one config (or none); pass --no-plan to train several as written")
                result = planned_config(paths[0] if args.config else None, overrides)
                print(report(result))
                if args.plan_only:
                    return 0
                configs = [load_config(result.yaml_path)]
            runs = plan_runs(configs, folds=args.folds, only_folds=args.fold)
            run_dirs = None
            if args.overwrite:
                check_overwrite(runs)
    except FileExistsError as exc:  # --overwrite of a folder segpipe did not create
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except DataError as exc:  # found while planning: the run fails as it would have in training
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    warning = comparability_warning(runs) if len(runs) > 1 else None
    if warning:
        print(warning, file=sys.stderr)
    plan = read_json(result.json_path) if result is not None else None
    if plan is not None and "time_limit" not in plan.get("choices", {}):
        plan = None  # no time budget
    folds_plan = plan if plan is not None and "budget_division" in plan["choices"] else None
    before_run = _training_deadline(plan, runs, started) if plan is not None else None
    code = run_sweep(runs, resume=bool(args.resume), overwrite=args.overwrite, run_dirs=run_dirs,
                     before_run=before_run)[1]
    budgeted = [c for c in runs if c.train.time_budget_minutes is not None]
    evaluation_seconds: dict[str, float] = {}
    if code == 0 and budgeted and not isinstance(args.resume, str):
        # the budget covers the final evaluation of the validation cases: run it now
        for config in budgeted:
            evaluated = time.monotonic()
            code = max(code, evaluate.main([str(RunDir.of(config).path), "--model", "best"]))
            evaluation_seconds[config.name] = time.monotonic() - evaluated
            if result is not None and folds_plan is None:  # k-fold: one report for the command, after the ensemble
                _report_budget(RunDir.of(config), result.json_path, config.train.time_budget_minutes,
                               final_seconds=evaluation_seconds[config.name],
                               command_seconds=time.monotonic() - started)
    if code == 0:
        ensembled = time.monotonic()
        code = build_fold_ensembles(runs)
        if code == 0 and folds_plan is not None and len(evaluation_seconds) == len(runs):
            _report_folds_budget(folds_plan, runs, evaluation_seconds, ensemble_seconds=time.monotonic() - ensembled,
                                 command_seconds=time.monotonic() - started)
    return code


def _training_deadline(plan: dict, runs: list[Config], started: float):
    """``run_sweep``'s ``before_run`` for a planned time budget (one run, or k folds under one budget): a run's
    training allowance is what is left of the budget when it starts, less the ensemble (k-fold) and each
    remaining run's final evaluation and export, shared by the remaining runs. It is shorter than the plan's
    when the start-up or earlier folds ran late, and longer when they finished early (a fold's last epoch
    stopped short of its allowance, a start-up quicker than its margin): the time is not lost, and the
    planned schedule still caps a run's epochs."""
    budget = float(runs[0].train.time_budget_minutes) * 60.0
    per_run = float(plan["predicted"].get("final_evaluation_seconds", 0.0)) + EXPORT_SECONDS
    ensemble = float(plan["predicted"].get("ensemble_seconds", 0.0))

    def before_run(config: Config, index: int) -> Config:
        left = len(runs) - index  # this run and the ones after it
        minutes = (budget - (time.monotonic() - started) - ensemble - left * per_run) / left / 60.0
        planned = config.train.max_train_minutes
        minutes = round(max(minutes, 0.5), 2)  # past the budget: a minimal allowance, the run saves a checkpoint
        if planned is None or abs(minutes - planned) < ALLOWANCE_STEP_MINUTES:
            return config
        changed = copy.deepcopy(config)
        changed.train.max_train_minutes = minutes
        why = "took longer than planned" if minutes < planned else "left time unused"
        print(f"{config.name}: train.max_train_minutes {planned:g} -> {minutes:g} (the command so far {why}; "
              f"the budget holds)")
        return changed

    return before_run


def _report_folds_budget(plan: dict, runs: list[Config], evaluation_seconds: dict[str, float], *,
                         ensemble_seconds: float, command_seconds: float) -> None:
    """``<name>_ensemble/budget.json`` for ``--folds K`` under one budget: the plan's division against the
    measured parts (each fold's training and evaluation, the ensemble, the whole command), and one line."""
    from segpipe.evaluation.ensemble import ensemble_dir  # TensorFlow: loaded by the ensemble already

    division = plan["choices"]["budget_division"]["value"]
    budget_minutes = float(runs[0].train.time_budget_minutes)
    folds = []
    for config in runs:
        seconds = RunDir.of(config).epoch_seconds()
        evaluation = evaluation_seconds.get(config.name)
        folds.append({"run": config.name, "training_seconds": float(sum(seconds)), "epochs": len(seconds),
                      "evaluation_seconds": evaluation, "seconds": float(sum(seconds)) + (evaluation or 0.0)})
    report = {"budget_minutes": budget_minutes, "within_budget": command_seconds <= budget_minutes * 60.0,
              "division": division, "folds": folds,
              "parts": {"timings_seconds": {"predicted": division["timings_minutes"] * 60.0,
                                            "measured": plan.get("measured", {}).get("timing_seconds")},
                        "fold_seconds": {"predicted": division["fold_minutes"] * 60.0,
                                         "measured": [f["seconds"] for f in folds]},
                        "ensemble_seconds": {"predicted": division["ensemble_minutes"] * 60.0,
                                             "measured": ensemble_seconds},
                        "command_seconds": {"predicted": budget_minutes * 60.0, "measured": command_seconds}}}
    out = ensemble_dir([RunDir.of(config).path for config in runs])
    if out.is_dir():
        write_json(out / "budget.json", report)
    print(f"Time budget: {command_seconds / 60:.1f} of {budget_minutes:g} min for {len(runs)} folds and their "
          f"ensemble{'' if report['within_budget'] else ' — OVER BUDGET'} (training + evaluation per fold: "
          + ", ".join(f"{f['seconds'] / 60:.1f}" for f in folds)
          + f" min, planned {division['fold_minutes']:.1f}; ensemble {ensemble_seconds / 60:.1f} min)")


def _report_budget(run: RunDir, plan_json: Path, budget_minutes: float, *, final_seconds: float,
                   command_seconds: float) -> None:
    """``RUN_DIR/budget.json``: the plan's predictions against this command's measured times, and one line."""
    report = budget_report(read_json(plan_json), epoch_seconds=run.epoch_seconds(),
                           final_evaluation_seconds=final_seconds, command_seconds=command_seconds,
                           budget_minutes=budget_minutes)
    write_json(run.budget_json, report)
    print(budget_line(report))


def build_fold_ensembles(runs: list[Config]) -> int:
    """After k-fold training: each configuration whose folds have all finished gets ``<name>_ensemble``
    (out-of-fold evaluation, post-processing chosen on it, one bundle of all folds;
    :mod:`segpipe.evaluation.ensemble`). Only with ``train.export_bundle`` (the default); a complete
    ensemble folder is kept, so a resumed command does not redo it. Returns the exit code."""
    from segpipe.evaluation.ensemble import build_ensemble_run  # TensorFlow: only when folds finished

    groups: dict[str, list[Config]] = {}
    for config in runs:
        if config.data.folds and config.train.export_bundle:
            groups.setdefault(re.sub(r"_fold\d+$", "", config.name), []).append(config)
    for name, configs in groups.items():
        folds = configs[0].data.folds
        dirs = [RunDir.of(c).path for c in configs]
        if len(configs) < 2 or len(configs) != folds or not all(RunDir(d).status() == "finished" for d in dirs):
            continue  # only some folds were trained (--fold), or one did not finish
        try:
            out = build_ensemble_run(dirs)
        except (FileExistsError, FileNotFoundError, ValueError, StorageError) as exc:
            print(f"error: ensemble of {name}: {exc}", file=sys.stderr)
            return 1
        print(f"Ensemble of {folds} folds: {out} (bundle: {out / 'bundle'})")
    return 0


def check_overwrite(runs: list[Config]) -> None:
    """``--overwrite`` deletes only run directories segpipe created (checked for every run before any work).

    Raises
    ------
    FileExistsError
        a run's folder exists without segpipe's run marker (names it and what it holds).
    """
    for config in runs:
        check_replaceable(RunDir.of(config).path, "run", key="--overwrite")


def _renamed(config: Config, name: str) -> Config:
    renamed = copy.deepcopy(config)
    renamed.name = name
    return renamed


def _wants_plan(args: argparse.Namespace, configs: list) -> bool:
    """--plan-only; or (unless --no-plan) a data.root given without --config, or a time budget."""
    if args.plan_only:
        return True
    if args.no_plan:
        return False
    own_data = not args.config and any(item.partition("=")[0] == "data.root" for item in args.set)
    return own_data or any(c.train.time_budget_minutes is not None for c in configs)


def default_config_path() -> Path:
    """``configs/default.yaml`` of the source checkout, else of the working directory.

    Raises
    ------
    FileNotFoundError
        neither exists (an installed wheel, run outside a checkout).
    """
    candidates = [Path(__file__).resolve().parents[2] / "configs" / "default.yaml", Path("configs") / "default.yaml"]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(expected(
        f"--config FILE, or a default config at {' or '.join(str(p) for p in candidates)}", key="--config",
        received=Received("<not given>, and neither file exists"),
        hint="segpipe installed from a wheel? Pass --config.",
    ))


def _config_paths(patterns: list[str]) -> list[str]:
    """Config files in order; a pattern with * ? [ that names no file is expanded as a glob (sorted)."""
    paths: list[str] = []
    for pattern in patterns:
        if not Path(pattern).exists() and any(c in pattern for c in "*?["):
            matches = sorted(glob.glob(pattern))
            if not matches:
                raise FileNotFoundError(expected("a pattern that matches config files", key="--config",
                                                 received=Received(f"{pattern!r} (matches none)")))
            paths += matches
        else:
            paths.append(pattern)
    return paths


def console() -> None:
    """Console script ``segpipe-train``."""
    sys.exit(main())
