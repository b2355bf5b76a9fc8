"""Command-line entry points: ``train``, ``evaluate``, ``predict`` (and ``predict export``).

    python train.py [--config FILE ...] [--set KEY=VALUE ...] [--experiment NAME] [--folds K] [--resume [RUN_DIR]]
    python evaluate.py RUN_DIR | --pred DIR --ref DIR | --compare EXPERIMENT_DIR ...
    python predict.py --model BUNDLE --input FILE_OR_DIR [...] --output DIR [--format keras|savedmodel|onnx]
    python predict.py export RUN_DIR [--checkpoint best|last|final|FILE.keras] [--out DIR] [--onnx] [--overwrite]

Everything lives in the package, so the console scripts of ``pyproject.toml`` (``segpipe-train``,
``segpipe-evaluate``, ``segpipe-predict``) work from an installed wheel; ``train.py``,
``evaluate.py`` and ``predict.py`` in the repository are thin wrappers around the ``*_main``
functions here. Heavy imports (TensorFlow) happen inside the functions that need them.
"""
from __future__ import annotations

import argparse
import glob
import json
import sys
from pathlib import Path

TRAIN_HELP = """Train a 3D segmentation model from a config file, or several in turn (a sweep).

    python train.py                                  # configs/default.yaml (generated phantoms)
    python train.py --config configs/x.yaml --set train.epochs=3 loss.name=tversky
    python train.py --resume runs/default            # continue an interrupted run
    python train.py --config configs/losses/*.yaml --experiment losses [--folds 5]
                                                     # a sweep into runs/losses/<config>[_fold<k>]/
    python evaluate.py --compare runs/losses         # compare the runs of that experiment

A sweep trains each config (on each fold) in turn: finished runs are skipped, a failed run is
reported and the sweep goes on, and a summary ends it (exit code 1 if any run failed). Run the same
command again, with --resume, to continue an interrupted sweep, interrupted runs included.

Ctrl-C (or SIGTERM) stops after the current step and saves a checkpoint (exit code 130 / 143);
press it twice to abort at once. Several GPUs or machines: train.distribute (README.md, "Several GPUs").
"""

EVALUATE_HELP = """Score segmentations: per-class overlap and surface metrics, per case and summarised.

Folder mode:  python evaluate.py --pred DIR --ref DIR [--labels 1 2 ...] [--dataset-json PATH]
                                 [--out DIR] [--tolerance-mm X | LABEL=X ...] [--workers N]
Run mode:     python evaluate.py RUN_DIR [--model best|final]   (predicts the run's validation cases, then scores them)
Compare mode: python evaluate.py --compare EXPERIMENT_DIR | RUN_DIR ... [--reference CONFIG]
              (evaluates runs not yet evaluated, then writes comparison/: tables, paired
              Wilcoxon tests with Holm correction, box plots, training curves, report.md)

Writes per_case.csv and summary.json into --out (default: PRED/evaluation, or RUN_DIR/evaluation)
and prints the summary as a Markdown table. Metric definitions: README.md, "Evaluation".
"""


# ---------------------------------------------------------------------------- train


def train_main(argv: list[str] | None = None) -> int:
    """``train.py``: train one config or a sweep of configs (x folds); returns the exit code.

    0: every run finished or had finished; 1: a run failed; 2: a config could not be loaded;
    130 / 143: stopped by SIGINT / SIGTERM (checkpoint saved).
    """
    parser = argparse.ArgumentParser(prog=_prog("train"), description=TRAIN_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", nargs="+", default=None,
                        help="YAML config file(s) or glob patterns, trained in turn; default: configs/default.yaml")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="dotted overrides, e.g. train.epochs=3")
    parser.add_argument("--experiment", metavar="NAME",
                        help="train into <output_dir>/NAME/<config name>/ (the folder evaluate.py --compare takes)")
    parser.add_argument("--folds", type=int, metavar="K",
                        help="k-fold: train every config on every fold into <name>_fold<k> (default: data.folds)")
    parser.add_argument("--fold", type=int, nargs="+", metavar="I", help="with k-fold: train only these folds")
    parser.add_argument("--resume", nargs="?", const=True, default=False, metavar="RUN_DIR",
                        help="continue an interrupted run (its own config) from its last checkpoint; without "
                             "RUN_DIR, continue the unfinished runs of the configs given")
    parser.add_argument("--overwrite", action="store_true", help="delete an existing run of the same name first")
    args = parser.parse_args(argv)

    from segpipe.config import ConfigError, load_config
    from segpipe.sweep import comparability_warning, plan_runs, run_sweep
    from segpipe.training import load_run_config

    try:
        if isinstance(args.resume, str):
            if args.config or args.set or args.experiment or args.folds is not None or args.fold:
                parser.error("--resume RUN_DIR continues a run with its saved config; "
                             "do not pass --config/--set/--experiment/--folds/--fold")
            runs = [load_run_config(args.resume)]
        else:
            # quoted, so a name like 2024-05 stays a string (override values are parsed as YAML)
            overrides = [*args.set, *([f"experiment={json.dumps(args.experiment)}"] if args.experiment is not None else [])]
            paths = _config_paths(args.config) if args.config else [str(default_config_path())]
            configs = [load_config(p, overrides) for p in paths]
            runs = plan_runs(configs, folds=args.folds, only_folds=args.fold)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    warning = comparability_warning(runs) if len(runs) > 1 else None
    if warning:
        print(warning, file=sys.stderr)
    return run_sweep(runs, resume=bool(args.resume), overwrite=args.overwrite)[1]


def default_config_path() -> Path:
    """``configs/default.yaml`` of the source checkout, else of the working directory.

    Raises:
        FileNotFoundError: neither exists (an installed wheel, run outside a checkout).
    """
    candidates = [Path(__file__).resolve().parent.parent / "configs" / "default.yaml", Path("configs") / "default.yaml"]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"Expected --config FILE, or a default config at {' or '.join(str(p) for p in candidates)}. "
        f"Received: no --config, and neither file exists (segpipe installed from a wheel? pass --config)"
    )


def _config_paths(patterns: list[str]) -> list[str]:
    """Config files in order; a pattern with * ? [ that names no file is expanded as a glob (sorted)."""
    paths: list[str] = []
    for pattern in patterns:
        if not Path(pattern).exists() and any(c in pattern for c in "*?["):
            matches = sorted(glob.glob(pattern))
            if not matches:
                raise FileNotFoundError(f"--config: expected files matching {pattern!r}. Received: none")
            paths += matches
        else:
            paths.append(pattern)
    return paths


# ---------------------------------------------------------------------------- evaluate


def evaluate_main(argv: list[str] | None = None) -> int:
    """``evaluate.py``: parse ``argv`` (default: the command line), evaluate, print the table; return 0 or 1."""
    prog = _prog("evaluate")
    parser = argparse.ArgumentParser(
        prog=prog,
        description=EVALUATE_HELP.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(EVALUATE_HELP.split("\n\n")[1:]),
    )
    parser.add_argument("run_dir", nargs="?", type=Path, help="trained run folder (run mode)")
    parser.add_argument("--pred", type=Path, help="folder of predicted label maps (folder mode)")
    parser.add_argument("--ref", type=Path, help="folder of reference label maps (folder mode)")
    parser.add_argument("--labels", type=int, nargs="+", help="label values to score "
                        "(default: from --dataset-json, else every value in the references but 0)")
    parser.add_argument("--dataset-json", type=Path,
                        help="dataset.json (or its folder) for class names and default labels")
    parser.add_argument("--out", type=Path, help="output folder")
    parser.add_argument("--tolerance-mm", nargs="+", default=["1.0"], metavar="X",
                        help="NSD tolerance in mm: one value, or LABEL=X per class (default 1.0)")
    parser.add_argument("--workers", type=int, help="parallel processes (default: available cores)")
    parser.add_argument("--model", choices=["best", "final"],
                        help="run mode: the best checkpoint (chosen on these validation cases; the default) "
                             "or the final model")
    parser.add_argument("--compare", type=Path, nargs="+", metavar="DIR",
                        help="experiment folder(s) (train.py --experiment NAME: <output_dir>/NAME) or run folders to compare")
    parser.add_argument("--reference", help="configuration the others are tested against (default: the first)")
    args = parser.parse_args(argv)
    if args.compare:
        if args.run_dir is not None or args.pred or args.ref:
            parser.error("--compare takes its own folders; do not combine it with RUN_DIR or --pred/--ref")
        return _compare(args, prog)

    if args.run_dir is not None and (args.pred or args.ref):
        parser.error("give either RUN_DIR or --pred and --ref, not both")
    if args.run_dir is None and not (args.pred and args.ref):
        parser.error("give RUN_DIR, or both --pred and --ref")
    if args.model and args.run_dir is None:
        parser.error("--model chooses the model of RUN_DIR (run mode)")
    try:
        tolerance_mm = _parse_tolerance(args.tolerance_mm)
    except ValueError as exc:
        parser.error(str(exc))

    from segpipe.evaluation import evaluate_folders, format_summary_markdown

    labels, class_names = args.labels, None
    try:
        if args.dataset_json is not None:
            from segpipe.data.layouts import load_dataset

            root = args.dataset_json.parent if args.dataset_json.is_file() else args.dataset_json
            dataset = load_dataset(root)
            class_names = dataset.labels
            if labels is None:
                labels = sorted(v for v in dataset.labels if v != 0)
        if args.run_dir is not None:
            from segpipe.evaluation import evaluate_run

            summary, out_dir = evaluate_run(
                args.run_dir, args.out,
                labels=labels, class_names=class_names, tolerance_mm=tolerance_mm, workers=args.workers,
                model=args.model,
            )
        else:
            out_dir = args.out or args.pred / "evaluation"
            summary = evaluate_folders(
                args.pred, args.ref, out_dir,
                labels=labels, class_names=class_names, tolerance_mm=tolerance_mm, workers=args.workers,
            )
    except (FileNotFoundError, ValueError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    print(format_summary_markdown(summary))
    print(f"\nWrote {out_dir / 'per_case.csv'} and {out_dir / 'summary.json'}")
    return 0


def _compare(args: argparse.Namespace, prog: str) -> int:
    """Compare mode: check pairing, evaluate what is missing, write the comparison folder."""
    from segpipe.compare import ComparisonError, check_comparable, find_run_dirs, group_runs, load_per_case, write_comparison

    try:
        tolerance_mm = _parse_tolerance(args.tolerance_mm)
        groups = group_runs(find_run_dirs(args.compare))
        if args.reference is not None:
            names = [g.name for g in groups]
            if args.reference not in names:
                raise ComparisonError(f"Expected --reference to be one of {names}. Received: {args.reference!r}")
            groups.sort(key=lambda g: g.name != args.reference)  # stable: reference first
        if len(groups) < 2:
            raise ComparisonError(f"Expected at least two configurations to compare. Received: {[g.name for g in groups]}")
        check_comparable(groups)  # refuse before spending time on predictions
        for group in groups:
            for run_dir in group.run_dirs:
                per_case = run_dir / "evaluation" / "per_case.csv"
                if not per_case.is_file():
                    from segpipe.evaluation import evaluate_run

                    print(f"Evaluating {run_dir}")
                    evaluate_run(run_dir, tolerance_mm=tolerance_mm, workers=args.workers)
                group.rows += [{**row, "run": run_dir.name} for row in load_per_case(per_case)]
        class_names = {r["class"]: r["class_name"] for g in groups for r in g.rows}
        default_out = args.compare[0] / "comparison" if len(args.compare) == 1 and not (args.compare[0] / "config.yaml").is_file() else Path("comparison")
        out_dir = args.out or default_out
        result = write_comparison(groups, out_dir, class_names)
    except (ComparisonError, FileNotFoundError, ValueError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    print(result["markdown"])
    print(f"Wrote {out_dir}/report.md, comparison.csv, comparison.json and plots")
    return 0


def _parse_tolerance(values: list[str]) -> float | dict[int, float]:
    """``["2"]`` -> 2.0; ``["1=2", "2=0.5"]`` -> {1: 2.0, 2: 0.5}."""
    try:
        if len(values) == 1 and "=" not in values[0]:
            return float(values[0])
        pairs = [v.split("=", 1) for v in values]
        return {int(label): float(mm) for label, mm in pairs}
    except ValueError:
        raise ValueError(
            f"Expected --tolerance-mm as one number or LABEL=MM pairs. Received: {' '.join(values)}"
        ) from None


# ---------------------------------------------------------------------------- predict


def predict_main(argv: list[str] | None = None) -> int:
    """``predict.py``: segment NIfTI files with a bundle, or ``predict.py export ...``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["export"]:
        return export_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog=_prog("predict"),
        description="Segment raw NIfTI scans with an exported model bundle (no run directory or dataset needed).",
        epilog="Export a bundle from a trained run first:\n  python predict.py export RUN_DIR [--checkpoint best|last|final] "
               "[--out DIR] [--onnx]\n(run `python predict.py export --help` for details)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, type=Path, metavar="BUNDLE", help="bundle folder (from `predict.py export`)")
    parser.add_argument("--input", required=True, type=Path, nargs="+", metavar="FILE_OR_DIR",
                        help="NIfTI file(s) or folder(s); CASE_0000.nii.gz, CASE_0001... form one multi-channel case")
    parser.add_argument("--output", required=True, type=Path, metavar="DIR", help="folder for the label maps CASE.nii.gz")
    parser.add_argument("--format", choices=("keras", "savedmodel", "onnx"), default="keras", help="which model file to run (default keras)")
    parser.add_argument("--save-probabilities", action="store_true", help="also write CASE_probabilities.nii.gz (X, Y, Z, C) float32")
    parser.add_argument("--overlap", type=float, help="window overlap in [0, 1) (default: the bundle's, 0.5)")
    mirror = parser.add_mutually_exclusive_group()
    mirror.add_argument("--mirror-axes", type=int, nargs="+", choices=(0, 1, 2), metavar="AXIS",
                        help="axes mirrored for test-time augmentation (default: the bundle's, 0 1 2)")
    mirror.add_argument("--no-mirror", action="store_true", help="no test-time mirroring (8x faster than 3 axes)")
    parser.add_argument("--batch-size", type=int, help="windows per network call (default: the bundle's)")
    parser.add_argument("--largest-component", type=int, nargs="*", metavar="LABEL",
                        help="keep only the largest connected component of these labels (none given: switch the bundle's off)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    from segpipe.export import BundleError
    from segpipe.predict import predict_files

    try:
        written = predict_files(
            args.model, args.input, args.output, format=args.format,
            overlap=args.overlap, mirror_axes=() if args.no_mirror else args.mirror_axes, batch_size=args.batch_size,
            postprocess_largest_component=args.largest_component,
            save_probabilities=args.save_probabilities, progress=not args.quiet,
        )
    except (BundleError, FileNotFoundError, ValueError, ImportError) as exc:
        print(f"{_prog('predict')}: error: {exc}", file=sys.stderr)
        return 1
    print(f"Wrote {len(written)} label map(s) to {args.output}")
    return 0


def export_main(argv: list[str] | None = None) -> int:
    """``predict.py export RUN_DIR``: write the deployable bundle of a trained run; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog=f"{_prog('predict')} export",
        description="Write a deployable bundle (model.keras, SavedModel, optional ONNX, bundle.json) of a trained run.",
    )
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="trained run folder (runs/<name>)")
    parser.add_argument("--checkpoint", default="best", metavar="best|last|final|FILE.keras",
                        help="best (checkpoints/best.keras, default), last (last finished epoch), final (model.keras), or a file")
    parser.add_argument("--out", type=Path, metavar="DIR", help="bundle folder (default RUN_DIR/bundle)")
    parser.add_argument("--onnx", action="store_true", help='also write model.onnx (pip install "segpipe[onnx]")')
    parser.add_argument("--overwrite", action="store_true", help="replace an existing bundle folder")
    args = parser.parse_args(argv)

    from segpipe.export import BundleError, export_run

    try:
        out = export_run(args.run_dir, args.out, checkpoint=args.checkpoint, onnx=args.onnx, overwrite=args.overwrite)
    except (BundleError, FileExistsError, FileNotFoundError, ValueError, ImportError) as exc:
        print(f"{_prog('predict')} export: error: {exc}", file=sys.stderr)
        return 1
    print(f"Wrote bundle {out}")
    return 0


# ---------------------------------------------------------------------------- console scripts


def train() -> None:
    """Console script ``segpipe-train``."""
    sys.exit(train_main())


def evaluate() -> None:
    """Console script ``segpipe-evaluate``."""
    sys.exit(evaluate_main())


def predict() -> None:
    """Console script ``segpipe-predict``."""
    sys.exit(predict_main())


def _prog(tool: str) -> str:
    """``segpipe-<tool>`` when run as that console script, else ``<tool>.py``."""
    return f"segpipe-{tool}" if Path(sys.argv[0]).name == f"segpipe-{tool}" else f"{tool}.py"
