"""Command line of the converter: `python -m converter --help` (or `edge-convert`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from device.bundle import BundleError, default_models_dir
from device.cli import positive_int
from training.datasets import DATA_ENV, DataNotFoundError

MODELS = default_models_dir()


def _add_common(p: argparse.ArgumentParser, max_drop: float, out: Path, min_accuracy: float) -> None:
    p.add_argument("--data-dir", type=Path, default=None,
                   help=f"data directory (default: ${DATA_ENV}, else ../shared/data beside the project)")
    p.add_argument("--out", type=Path, default=out, help="bundle folder to write (default: %(default)s)")
    p.add_argument("--representative", type=positive_int, default=300,
                   help="calibration samples drawn from the training split (default: %(default)s)")
    p.add_argument("--max-drop-pp", type=float, default=max_drop,
                   help="gate: largest accepted accuracy drop int8 vs float, in percentage points (default: %(default)s)")
    p.add_argument("--min-accuracy", type=float, default=min_accuracy,
                   help="gate: the int8 model must also reach this accuracy (0-1), so a model too weak to be of use "
                        "never ships, however small its drop (default: %(default)s)")
    p.add_argument("--io", choices=("int8", "uint8"), default="int8",
                   help="int8 model input/output type; uint8 for Coral's pycoral (default: %(default)s)")
    p.add_argument("--fix", action="store_true",
                   help="if the gate fails, keep the worst layers' op types in float until it passes "
                        "(the result is no longer Edge TPU-ready; not with --io uint8, which TF's debugger drops)")


def _digits(args: argparse.Namespace) -> int:
    from converter.digits import quantize_digits

    passed = quantize_digits(args.model, args.out, data_dir=args.data_dir, representative=args.representative,
                             max_drop_pp=args.max_drop_pp, io_type=args.io, fix=args.fix,
                             min_accuracy=args.min_accuracy)
    return 0 if passed else 1


def _meter(args: argparse.Namespace) -> int:
    from converter.meter import quantize_meter

    passed = quantize_meter(args.model, args.out, data_dir=args.data_dir, representative=args.representative,
                            max_drop_pp=args.max_drop_pp, io_type=args.io, fix=args.fix, test_limit=args.test_limit,
                            min_accuracy=args.min_accuracy)
    return 0 if passed else 1


def _face(args: argparse.Namespace) -> int:
    from converter.face import quantize_face

    passed = quantize_face(args.model, args.out, data_dir=args.data_dir, representative=args.representative,
                           max_drop_pp=args.max_drop_pp, io_type=args.io, fix=args.fix,
                           cache_dir=args.teacher_cache, recipes=args.recipes, teacher=not args.no_teacher,
                           min_accuracy=args.min_accuracy)
    return 0 if passed else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-convert",
        description="Turn a trained Keras model into a float32 and an int8 TFLite model, measure both through "
        "the device runtime on real test data, and write a bundle only if int8 stays within the accuracy gate. "
        "Exit status: 0 passed, 1 gate failed (report in <out>.rejected/), 2 bad input.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="TASK")
    p = sub.add_parser("digits", help="MNIST digit classifier → models/digits",
                       description="Convert and gate a digits model on the full 10k MNIST test set.")
    p.add_argument("--model", type=Path, default=Path("build/digits/model.keras"),
                   help="trained Keras model (default: %(default)s)")
    _add_common(p, max_drop=0.3, out=MODELS / "digits", min_accuracy=0.98)
    p.set_defaults(func=_digits)
    p = sub.add_parser("meter", help="meter digit-wheel model → models/meter-digits",
                       description="Convert and gate a meter digit-wheel model. Measured through the device runtime "
                       "on every crop of the held-out test meters (groups never seen in training): whole-digit "
                       "accuracy (the gate metric), rolling accuracy within ±0.1/±0.2 digit, per-meter tables.")
    p.add_argument("--model", type=Path, default=Path("build/meter/model.keras"),
                   help="trained Keras model (default: %(default)s)")
    p.add_argument("--test-limit", type=int, default=None,
                   help="evaluate on N random test crops only (smoke runs; default: all)")
    _add_common(p, max_drop=0.5, out=MODELS / "meter-digits", min_accuracy=0.95)
    p.set_defaults(func=_meter)
    p = sub.add_parser("face", help="face embedder → models/face",
                       description="Convert and gate the face embedder on the LFW evaluation folds' pairs (identities "
                       "never trained on): verification accuracy (the gate), AUC, TAR at FAR 1%/0.1% for float, int8 "
                       "and the dlib teacher side by side; match thresholds re-calibrated on each variant.")
    p.add_argument("--model", type=Path, default=Path("build/face/model/model.keras"),
                   help="trained Keras model (default: %(default)s)")
    p.add_argument("--teacher-cache", type=Path, default=Path("build/face/teacher-eval"),
                   help="teacher embeddings of the evaluation images, for the teacher's numbers; kept apart from "
                        "training's cache (default: %(default)s)")
    p.add_argument("--recipes", type=Path, default=Path("build/face/recipes/recipes.json"),
                   help="recipe comparison table to include in the report, if present (default: %(default)s)")
    p.add_argument("--no-teacher", action="store_true",
                   help="leave the teacher's numbers out instead of computing its missing embeddings (~85 ms each)")
    _add_common(p, max_drop=0.5, out=MODELS / "face", min_accuracy=0.90)
    p.set_defaults(func=_face)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.fix and args.io == "uint8":
        print("error: --fix cannot keep uint8 input/output (TF's quantization debugger writes int8 I/O); "
              "convert with --io int8, or without --fix", file=sys.stderr)
        return 2
    model = getattr(args, "model", None)
    if model is not None and not Path(model).exists():
        print(f"error: no trained model at {model}; train it first (python -m training {args.command})", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except (DataNotFoundError, BundleError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
