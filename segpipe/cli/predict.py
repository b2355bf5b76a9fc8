"""``predict.py`` / ``segpipe-predict``: segment NIfTI scans with a bundle; ``predict.py export RUN_DIR`` writes one.

Before the network is loaded, every scan is checked against the bundle (readable 3-D/4-D NIfTI, no
empty axis, an invertible affine, finite intensities, the bundle's channel count): a bad scan is named
in one error and nothing is written. So is the output folder: label maps that exist already are
replaced only with ``--overwrite``, and a folder holding an input scan or a dataset's reference
labels (``labelsTr/``, ``labels/``) is refused. A full disk or a read-only output folder is one error naming the
file; the label maps written before it are complete.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from segpipe.cli import prog_name
from segpipe.data.checks import check_scans
from segpipe.errors import Received, StorageError, expected
from segpipe.inference.bundle import Bundle, BundleError, read_bundle
from segpipe.inference.runtimes import RUNTIMES
from segpipe.inference.segment import find_cases, predict_files


def main(argv: list[str] | None = None) -> int:
    """``predict.py``: segment NIfTI files with a bundle, or ``predict.py export ...``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["export"]:
        return export_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog=prog_name("predict"),
        description="Segment raw NIfTI scans with an exported model bundle (no run directory or dataset needed).",
        epilog="Export a bundle from a trained run first:\n  python predict.py export RUN_DIR [--checkpoint "
               "best|last|final] [--out DIR] [--onnx]\n(run `python predict.py export --help` for details)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, type=Path, metavar="BUNDLE",
                        help="bundle folder (from `predict.py export`)")
    parser.add_argument("--input", required=True, type=Path, nargs="+", metavar="FILE_OR_DIR",
                        help="NIfTI file(s) or folder(s); CASE_0000.nii.gz, CASE_0001... form one multi-channel case")
    parser.add_argument("--output", required=True, type=Path, metavar="DIR",
                        help="folder for the label maps CASE.nii.gz")
    parser.add_argument("--format", choices=("auto", *RUNTIMES), default="keras",
                        help="runtime: auto = the fastest installed one the bundle holds that cannot run code "
                             "(docs/inference.md); default keras")
    parser.add_argument("--trust-bundle", action="store_true",
                        help="allow a format that can run code (savedmodel): only for a bundle from a source you trust "
                             "(docs/deployment.md, Trust)")
    parser.add_argument("--save-probabilities", nargs="?", const="nifti", choices=("nifti", "npz"),
                        help="also write the per-class probabilities: CASE_probabilities.nii.gz (X, Y, Z, C; default) "
                             "or .npz (probabilities, affine, class_names)")
    parser.add_argument("--probabilities-dtype", choices=("float16", "float32"), default="float16",
                        help="saved probabilities: float16 (default; half the size; NIfTI stores it as uint16 "
                             "scaled by ~1/65535) or float32")
    parser.add_argument("--overlap", type=float, help="window overlap in [0, 0.95] (default: the bundle's, 0.5)")
    mirror = parser.add_mutually_exclusive_group()
    mirror.add_argument("--mirror-axes", type=int, nargs="+", choices=(0, 1, 2), metavar="AXIS",
                        help="axes mirrored for test-time augmentation (default: the bundle's, 0 1 2)")
    mirror.add_argument("--no-mirror", action="store_true", help="no test-time mirroring (8x faster than 3 axes)")
    parser.add_argument("--batch-size", type=int, help="windows per network call (default: the bundle's)")
    parser.add_argument("--largest-component", type=int, nargs="*", metavar="LABEL",
                        help="keep only the largest connected component of these labels, instead of the bundle's "
                             "post-processing (none given: no post-processing)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace label maps that exist in --output (never an input scan or a dataset's labels)")
    args = parser.parse_args(argv)

    try:
        bundle = read_bundle(args.model)
        check_inputs(bundle, args.input)
        written = predict_files(
            bundle, args.input, args.output, format=args.format,
            overlap=args.overlap, mirror_axes=() if args.no_mirror else args.mirror_axes, batch_size=args.batch_size,
            postprocess_largest_component=args.largest_component,
            save_probabilities=args.save_probabilities or False, probabilities_dtype=args.probabilities_dtype,
            progress=not args.quiet, trust_bundle=args.trust_bundle, overwrite=args.overwrite,
        )
    except (BundleError, StorageError, FileExistsError, FileNotFoundError, ValueError, ImportError) as exc:
        print(f"{prog_name('predict')}: error: {exc}", file=sys.stderr)
        return 1
    print(f"Wrote {len(written)} label map(s) to {args.output}")
    return 0


def check_inputs(bundle: Bundle, inputs: Sequence[Path]) -> None:
    """Every scan of ``inputs`` fits ``bundle`` (read once, before any network is loaded).

    Raises
    ------
    ValueError
        one message listing every problem, one line each, naming the file.
    """
    cases = find_cases(inputs, bundle.input_channels)
    problems = check_scans(cases, input_channels=bundle.input_channels, channel_names=bundle.channel_names)
    if problems:
        lines = "\n  ".join(p.format() for p in problems)
        raise ValueError(expected("NIfTI scans the bundle can segment", key="--input",
                                  received=Received(f"{len(problems)} problem(s) in {len(cases)} scan(s)"))
                         + f"\n  {lines}")


def export_main(argv: list[str] | None = None) -> int:
    """``predict.py export RUN_DIR``: write the deployable bundle of a trained run; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog=f"{prog_name('predict')} export",
        description="Write a deployable bundle (weights, SavedModel, optional ONNX, OpenVINO, bundle.json) of a "
                    "trained run.",
    )
    parser.add_argument("run_dir", type=Path, nargs="+", metavar="RUN_DIR",
                        help="trained run folder (runs/<name>); several: one ensemble bundle averaging them (needs "
                             "--out)")
    parser.add_argument("--checkpoint", default="best", metavar="best|last|final|FILE.keras",
                        help="best (checkpoints/best.keras, default), last (last finished epoch), final (model.keras), "
                             "or a file")
    parser.add_argument("--out", type=Path, metavar="DIR", help="bundle folder (default RUN_DIR/bundle)")
    parser.add_argument("--onnx", action="store_true", help='also write model.onnx (pip install "segpipe[onnx]")')
    parser.add_argument("--overwrite", action="store_true", help="replace an existing bundle folder that segpipe wrote")
    args = parser.parse_args(argv)

    from segpipe.export.ensemble import export_ensemble  # TensorFlow, as above
    from segpipe.export.run_export import export_run  # TensorFlow: only when exporting

    try:
        if len(args.run_dir) == 1:
            out = export_run(args.run_dir[0], args.out, checkpoint=args.checkpoint, onnx=args.onnx,
                             overwrite=args.overwrite)
        elif args.out is None:
            raise ValueError(expected("--out DIR for an ensemble of several runs", key="--out", received=None))
        else:
            out = export_ensemble(args.run_dir, args.out, checkpoint=args.checkpoint, onnx=args.onnx,
                                  overwrite=args.overwrite)
    except (BundleError, StorageError, FileExistsError, FileNotFoundError, ValueError, ImportError) as exc:
        print(f"{prog_name('predict')} export: error: {exc}", file=sys.stderr)
        return 1
    print(f"Wrote bundle {out}")
    return 0


def console() -> None:
    """Console script ``segpipe-predict``."""
    sys.exit(main())
