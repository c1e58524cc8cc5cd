"""Command line of the device runtime: `python -m device --help` (or `edge-device`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from device.bundle import VARIANTS, Bundle, BundleError, default_models_dir
from device.images import ImageError
from device.runtime import ModelError

DEFAULT_MODELS = default_models_dir()
USER_ERRORS = (BundleError, ImageError, ModelError, OSError, ValueError)


def positive_int(text: str) -> int:
    """argparse type for counts: a clear usage error for 0 or less instead of a traceback later."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def _read_digit(args: argparse.Namespace) -> int:
    from device.digits import DigitReader

    reader = DigitReader.from_bundle(args.bundle, variant=args.variant, threads=args.threads)
    failures = 0
    for image in args.images:
        try:
            result = reader.read(image, k=args.top)
        except (ImageError, OSError) as exc:
            failures += 1
            print(f"{image}: error: {exc}", file=sys.stderr)
            continue
        if args.json:
            print(json.dumps({"image": str(image), "digit": result.digit, "confidence": result.confidence,
                              "top_k": [[d, p] for d, p in result.top_k]}))
        else:
            others = ", ".join(f"{d}:{p:.3f}" for d, p in result.top_k[1:])
            print(f"{image}: {result.digit}  (confidence {result.confidence:.3f}; next {others})")
    return 1 if failures else 0


def _verify(args: argparse.Namespace) -> int:
    bundle = Bundle.load(args.bundle)
    print(f"{bundle.root}: OK — task {bundle.task}, {len(bundle.manifest['files'])} files match their sha256")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from device.bench import main as bench_main

    return bench_main(args)


def _add_read_digit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "read-digit",
        help="read handwritten digits from image files",
        description="Read one handwritten digit per image (photo or scan, any size, dark-on-light or "
        "light-on-dark). Prints the digit, its confidence and the runners-up.",
    )
    p.add_argument("images", nargs="+", type=Path, help="image files (PNG, JPEG, BMP, …)")
    p.add_argument("--bundle", type=Path, default=DEFAULT_MODELS / "digits", help="digits bundle folder (default: %(default)s)")
    p.add_argument("--variant", choices=VARIANTS, default="int8",
                   help="which model of the bundle to run; edgetpu needs a Coral and a bundle converted where "
                        "edgetpu_compiler is installed (default: int8)")
    p.add_argument("--threads", type=positive_int, default=None, help="interpreter threads (default: all cores)")
    p.add_argument("--top", type=positive_int, default=3, help="how many candidates to report (default: 3)")
    p.add_argument("--json", action="store_true", help="one JSON object per line instead of text")
    p.set_defaults(func=_read_digit)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-device",
        description="Device runtime: runs verified int8 model bundles with LiteRT (never TensorFlow).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_read_digit(sub)
    p = sub.add_parser("verify", help="check a bundle's files against its manifest hashes")
    p.add_argument("bundle", type=Path, help="bundle folder")
    p.set_defaults(func=_verify)
    sub.add_parser("meter", help="read a water/gas/electricity meter from a camera (`meter --help`)", add_help=False)
    p = sub.add_parser("bench", help="measure latency, size and memory of the shipped bundles")
    p.add_argument("--models", type=Path, default=DEFAULT_MODELS, help="folder with the bundles (default: %(default)s)")
    p.add_argument("--out", type=Path, default=DEFAULT_MODELS / "benchmarks", help="results prefix: writes .json and .md (default: %(default)s)")
    p.add_argument("--runs", type=positive_int, default=300, help="timed runs per measurement (default: %(default)s)")
    p.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["meter"]:  # its own CLI (device/meter/cli.py); listed in --help by build_parser
        from device.meter.cli import main as meter_main

        return meter_main(argv[1:], prog="edge-device meter")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def read_digit_main(argv: list[str] | None = None) -> int:
    """The `read-digit` console script: same as `edge-device read-digit`."""
    return main(["read-digit", *(sys.argv[1:] if argv is None else argv)])
