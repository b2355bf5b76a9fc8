"""``evaluate.py`` / ``segpipe-evaluate``: score folders of segmentations, a run's validation cases, or compare runs.

Folder mode never imports TensorFlow."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from segpipe.cli import prog_name
from segpipe.data.layouts import load_dataset
from segpipe.errors import Received, StorageError, expected
from segpipe.evaluation.compare import (
    ComparisonError,
    check_comparable,
    find_run_dirs,
    group_runs,
    load_per_case,
    write_comparison,
)
from segpipe.evaluation.folders import evaluate_folders
from segpipe.evaluation.run import evaluate_run
from segpipe.io import explain_write_errors
from segpipe.locks import hold
from segpipe.reports.evaluation_tables import format_lesion_markdown, format_summary_markdown
from segpipe.runs.rundir import RunDir

EVALUATE_HELP = """Score segmentations: per-class overlap and surface metrics, per case and summarised.

Folder mode:  python evaluate.py --pred DIR --ref DIR [--labels 1 2 ...] [--dataset-json PATH]
                                 [--out DIR] [--tolerance-mm X | LABEL=X ...] [--workers N]
                                 [--lesion-wise LABEL ... [--lesion-min-size-mm3 X] [--lesion-dilation-vox K]]
                                 [--images DIR] [--no-report]
Run mode:     python evaluate.py RUN_DIR [--model best|final]   (predicts the run's validation cases, then scores them)
Compare mode: python evaluate.py --compare EXPERIMENT_DIR | RUN_DIR | EVALUATED_DIR ... [--reference CONFIG]
              (evaluates runs not yet evaluated, then writes comparison/: tables, paired
              Wilcoxon tests with Holm correction, box plots, training curves, report.md, report.html,
              and the recommendation: the best by mean foreground Dice, its margin over the runner-up
              with a paired test and a bootstrap CI, its post-processing; recommendation.json)

Writes per_case.csv, summary.json, report.html and overlays/ (best, median and worst case per
class as slice overlays) into --out (default: PRED/evaluation, or RUN_DIR/evaluation), with
--lesion-wise also lesions.csv, and prints the summary as a Markdown table. Metric definitions:
docs/evaluation.md; the report and lesion-wise metrics: docs/reports.md.
"""


def _parser(prog: str) -> argparse.ArgumentParser:
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
                        help="experiment folder(s) (train.py --experiment NAME: <output_dir>/NAME), run folders or "
                             "folders with evaluation/per_case.csv (scored predictions, an ensemble) to compare")
    parser.add_argument("--reference", help="configuration the others are tested against (default: the first)")
    parser.add_argument("--ensemble", type=Path, nargs="+", metavar="RUN_DIR",
                        help="the folds of a k-fold split as one ensemble: out-of-fold evaluation, post-processing "
                             "chosen on it, one bundle of all (--out, default <name>_ensemble beside the runs)")
    parser.add_argument("--lesion-wise", type=int, nargs="+", metavar="LABEL",
                        help="also score these labels lesion by lesion (connected components: detection "
                             "TP/FP/FN, precision/recall/F1, BraTS 2023 lesion-wise Dice; lesions.csv)")
    parser.add_argument("--lesion-min-size-mm3", type=float, default=0.0, metavar="X",
                        help="with --lesion-wise: smaller components are not lesions (default 0)")
    parser.add_argument("--lesion-dilation-vox", type=int, default=0, metavar="K",
                        help="with --lesion-wise: match components within K voxels of a reference lesion "
                             "(BraTS 2023 uses 1-3; default 0: by overlap)")
    parser.add_argument("--images", type=Path, metavar="DIR",
                        help="scans drawn under the report's overlays (CASE_0000.nii.gz or CASE.nii.gz; "
                             "default: the images* folder beside the references' labels* folder)")
    parser.add_argument("--no-report", action="store_true", help="do not write report.html and overlays/")
    return parser


def _check_modes(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exactly one of run mode (RUN_DIR) and folder mode (--pred and --ref); exits with usage otherwise."""
    if args.run_dir is not None and (args.pred or args.ref):
        parser.error("give either RUN_DIR or --pred and --ref, not both")
    if args.run_dir is None and not (args.pred and args.ref):
        parser.error("give RUN_DIR, or both --pred and --ref")
    if args.model and args.run_dir is None:
        parser.error("--model chooses the model of RUN_DIR (run mode)")
    if (args.lesion_min_size_mm3 or args.lesion_dilation_vox) and not args.lesion_wise:
        parser.error("--lesion-min-size-mm3 and --lesion-dilation-vox need --lesion-wise LABEL ...")


def _ensemble(args: argparse.Namespace, prog: str) -> int:
    """``evaluate.py --ensemble RUN RUN ...``: the ensemble folder of chosen runs
    (:mod:`segpipe.evaluation.ensemble`)."""
    from segpipe.evaluation.ensemble import build_ensemble_run  # TensorFlow: the runs predict and export

    try:
        out = build_ensemble_run(args.ensemble, args.out, checkpoint=args.model or "best", workers=args.workers or 1,
                                 overwrite=True)
    except (FileExistsError, FileNotFoundError, ValueError, StorageError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    record = json.loads((out / "ensemble.json").read_text())["postprocessing"]
    print(f"Ensemble of {len(args.ensemble)} runs: {out}\n"
          f"  out-of-fold foreground Dice {record['dice_before']['foreground_mean']:.4f} -> "
          f"{record['dice_after']['foreground_mean']:.4f} with the chosen post-processing "
          f"(largest foreground component: {record['postprocess_largest_foreground']}, "
          f"largest component of labels {record['postprocess_largest_component']})\n  bundle: {out / 'bundle'}")
    return 0


def _dataset_classes(dataset_json: Path | None, labels: list[int] | None) -> tuple[list[int] | None, dict | None, dict]:
    """Labels to score and class names from ``--dataset-json`` (explicit ``--labels`` win), and its
    ignore label and regions as ``evaluate_folders`` options."""
    if dataset_json is None:
        return labels, None, {}
    dataset = load_dataset(dataset_json.parent if dataset_json.is_file() else dataset_json)
    scheme = {"ignore_label": dataset.ignore_label, "regions": dataset.regions}
    return (labels if labels is not None else sorted(v for v in dataset.labels if v != 0)), dataset.labels, scheme


def main(argv: list[str] | None = None) -> int:
    """``evaluate.py``: parse ``argv`` (default: the command line), evaluate, print the table; return 0 or 1."""
    prog = prog_name("evaluate")
    parser = _parser(prog)
    args = parser.parse_args(argv)
    if args.compare:
        if args.run_dir is not None or args.pred or args.ref:
            parser.error("--compare takes its own folders; do not combine it with RUN_DIR or --pred/--ref")
        return _compare(args, prog)
    if args.ensemble:
        if args.run_dir is not None or args.pred or args.ref:
            parser.error("--ensemble takes its own run folders; do not combine it with RUN_DIR or --pred/--ref")
        return _ensemble(args, prog)
    _check_modes(parser, args)
    try:
        tolerance_mm = _parse_tolerance(args.tolerance_mm)
    except ValueError as exc:
        parser.error(str(exc))

    try:
        labels, class_names, scheme = _dataset_classes(args.dataset_json, args.labels)
        options = dict(labels=labels, class_names=class_names, tolerance_mm=tolerance_mm, workers=args.workers,
                       lesion_labels=args.lesion_wise, lesion_min_size_mm3=args.lesion_min_size_mm3,
                       lesion_dilation_vox=args.lesion_dilation_vox, report=not args.no_report,
                       image_dir=args.images)
        out_dir = args.out or (RunDir(args.run_dir).evaluation_dir if args.run_dir is not None
                               else args.pred / "evaluation")
        with explain_write_errors(out_dir):  # a full disk or read-only folder: one error naming the folder
            if args.run_dir is not None:  # holds the run's evaluation lock
                summary, out_dir = evaluate_run(args.run_dir, args.out, model=args.model, **options)
            else:
                with hold(out_dir, what="evaluation folder"):  # one writer of the folder at a time
                    summary = evaluate_folders(args.pred, args.ref, out_dir, **options, **scheme)
    # StorageError: a full or read-only output folder; FileExistsError: another evaluation holds the folder
    except (FileNotFoundError, FileExistsError, ValueError, StorageError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    print(format_summary_markdown(summary))
    if "regions" in summary:  # region datasets (dataset.json regions, data.regions): Dice per region
        print("\n| region | Dice (mean) |\n| --- | --- |")
        for name, entry in summary["regions"].items():
            print(f"| {name} | {entry['metrics']['dice']['mean']:.4f} |")
    if "lesion_wise" in summary:
        print()
        print(format_lesion_markdown(summary["lesion_wise"]))
    written = ["per_case.csv", "summary.json", *(["regions.csv"] if "regions" in summary else []),
               *(["lesions.csv"] if args.lesion_wise else []),
               *([] if args.no_report else ["report.html", "overlays/"])]
    print(f"\nWrote {', '.join(str(out_dir / name) for name in written)}")
    return 0


def _compare(args: argparse.Namespace, prog: str) -> int:
    """Compare mode: check pairing, evaluate what is missing, write the comparison folder."""
    try:
        tolerance_mm = _parse_tolerance(args.tolerance_mm)
        groups = group_runs(find_run_dirs(args.compare))
        if args.reference is not None:
            names = [g.name for g in groups]
            if args.reference not in names:
                raise ComparisonError(expected(f"one of the configurations {names}", key="--reference",
                                               received=args.reference))
            groups.sort(key=lambda g: g.name != args.reference)  # stable: reference first
        if len(groups) < 2:
            raise ComparisonError(expected("at least two configurations to compare", key="--compare",
                                           received=Received(f"{[g.name for g in groups]}")))
        check_comparable(groups)  # refuse before spending time on predictions
        for group in groups:
            for run_dir in group.run_dirs:
                per_case = RunDir(run_dir).evaluation_dir / "per_case.csv"
                if not per_case.is_file():
                    print(f"Evaluating {run_dir}")
                    evaluate_run(run_dir, tolerance_mm=tolerance_mm, workers=args.workers)
                group.rows += [{**row, "run": run_dir.name} for row in load_per_case(per_case)]
        class_names = {r["class"]: r["class_name"] for g in groups for r in g.rows}
        default_out = (args.compare[0] / "comparison" if len(args.compare) == 1 and not RunDir(args.compare[0]).is_run()
                       else Path("comparison"))
        out_dir = args.out or default_out
        result = write_comparison(groups, out_dir, class_names)
    except (ComparisonError, FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    print(result["markdown"])
    print(f"Wrote {out_dir}/report.md, report.html, comparison.csv, comparison.json, recommendation.json and plots")
    return 0


def _parse_tolerance(values: list[str]) -> float | dict[int, float]:
    """``["2"]`` -> 2.0; ``["1=2", "2=0.5"]`` -> {1: 2.0, 2: 0.5}."""
    try:
        if len(values) == 1 and "=" not in values[0]:
            return float(values[0])
        pairs = [v.split("=", 1) for v in values]
        return {int(label): float(mm) for label, mm in pairs}
    except ValueError:
        raise ValueError(expected("one number or LABEL=MM pairs", key="--tolerance-mm",
                                  received=Received(" ".join(values)))) from None


def console() -> None:
    """Console script ``segpipe-evaluate``."""
    sys.exit(main())
