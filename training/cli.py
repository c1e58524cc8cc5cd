"""Command line of host-side training: `python -m training --help` (or `edge-train`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from training.datasets import DATA_ENV, DataNotFoundError


def _digits(args: argparse.Namespace) -> int:
    from training.digits import train

    path = train(
        out=args.out,
        arch=args.arch,
        epochs=args.epochs,
        batch=args.batch,
        data_dir=args.data_dir,
        subset=args.subset,
        seed=args.seed,
        verbose=2 if args.quiet else 1,
    )
    print(f"saved {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-train", description="Train the Keras models that the converter turns into bundles.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="TASK")
    p = sub.add_parser(
        "digits",
        help="handwritten digits on MNIST",
        description="Train a digit classifier on the full MNIST training split (60k) and report its accuracy "
        "on the 10k test split. Writes model.keras, history.json and train_info.json to --out.",
    )
    p.add_argument("--arch", choices=("edge", "seed"), default="edge",
                   help="edge: compact separable CNN we ship; seed: the classic Keras MNIST CNN (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=15, help="training epochs (default: %(default)s)")
    p.add_argument("--batch", type=int, default=128, help="batch size (default: %(default)s)")
    p.add_argument("--subset", type=int, default=None, help="train on the first N images only (smoke runs)")
    p.add_argument("--seed", type=int, default=1, help="random seed (default: %(default)s)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help=f"data directory holding mnist/ (default: ${DATA_ENV}, else ../shared/data beside the project)")
    p.add_argument("--out", type=Path, default=Path("build/digits"), help="output folder (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="one line per epoch instead of a progress bar")
    p.set_defaults(func=_digits)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (DataNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
