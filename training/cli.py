"""Command line of host-side training: `python -m training --help` (or `edge-train`)."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from device.cli import positive_int
from device.images import ImageError
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
        validation=args.validation,
    )
    print(f"saved {path}")
    return 0


def _meter(args: argparse.Namespace) -> int:
    from training.meter import train

    path = train(out=args.out, epochs=args.epochs, batch=args.batch, width=args.width, data_dir=args.data_dir,
                 subset=args.subset, seed=args.seed, with_validation=args.with_validation, members=args.members)
    print(f"saved {path}")
    return 0


def _face(args: argparse.Namespace) -> int:
    from training.face.train import compare_recipes, train
    from training.teacher import TeacherUnavailable, default_workers

    options = dict(arch=args.arch, versions=args.versions, p=args.p, k=args.k, learning_rate=args.lr,
                   patience=args.patience, data_dir=args.data_dir, cache_dir=args.teacher_cache, seed=args.seed,
                   subset_people=args.subset_people, cached_teacher_only=args.cached_teacher_only,
                   teacher_workers=args.teacher_workers or default_workers(), init=args.init, pack=args.pack,
                   width=args.width, input_size=args.input_size)
    try:
        if args.compare:
            compare_recipes(args.out, args.compare.split(","), epochs=args.epochs, **options)
            print(f"saved {args.out / 'recipes.json'}")
        else:
            print(f"saved {train(args.out, recipe=args.recipe, epochs=args.epochs, **options)}")
    except (TeacherUnavailable, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _face_pack(args: argparse.Namespace) -> int:
    from training.face.pack import write_pack
    from training.face.train import load_lfw
    from training.teacher import TeacherCache, TeacherUnavailable, default_workers, load_teacher, teacher_available

    people, split = load_lfw(args.data_dir)
    try:
        teacher = load_teacher() if teacher_available() else None
        cache = (TeacherCache(args.teacher_cache, teacher.model_digest) if teacher
                 else TeacherCache.existing(args.teacher_cache))
        path = write_pack(args.out, people, split, args.versions, cache, teacher.embed if teacher else None,
                          workers=args.teacher_workers or default_workers())
    except TeacherUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"saved {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


def _face_resnet(args: argparse.Namespace) -> int:
    from training.face.dlib_resnet import build

    try:
        print(f"saved {build(args.out, args.weights, align=not args.no_align)}")
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _face_slim(args: argparse.Namespace) -> int:
    from training.face.slim import train_slim

    if args.init is not None and not args.init.is_file():
        print(f"error: --init {args.init}: no such model file (a finished run's model.keras)", file=sys.stderr)
        return 2
    path = train_slim(args.out, args.data_dir, widths=args.widths, size=args.size, versions=args.versions,
                      epochs=args.epochs, batch=args.batch, learning_rate=args.lr, cache_dir=args.teacher_cache,
                      subset_people=args.subset_people, seed=args.seed, weights=args.weights, init=args.init,
                      first_version=args.first_version, mixup=args.mixup, feature_weight=args.feature_weight)
    print(f"saved {path}")
    return 0


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not (value >= 0.0 and math.isfinite(value)):  # nan and inf too
        raise argparse.ArgumentTypeError(f"must be a finite number, 0 or more, not {value}")
    return value


def _share(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a share between 0 and 1, not {value}")
    return value


def _widths(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(w) for w in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"'{text}' is not comma-separated whole numbers, e.g. 32,48,64,80,96") from exc


def _add_run_args(p: argparse.ArgumentParser, out: Path) -> None:
    """--seed, --data-dir and --out, as every face training command takes them."""
    p.add_argument("--seed", type=int, default=1, help="random seed (default: %(default)s)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help=f"data directory holding faces/ (default: ${DATA_ENV}, else ../shared/data beside the project)")
    p.add_argument("--out", type=Path, default=out, help="output folder (default: %(default)s)")


def _add_face(sub: argparse._SubParsersAction) -> None:
    from training.face.recipes import RECIPES

    p = sub.add_parser(
        "face",
        help="face embedder on LFW, distilled from dlib's face ResNet",
        description="Train a 128-D face embedder on the LFW training identities (everyone not in the pairs of "
        "folds 7-10; fold 7 is the validation fold for early stopping, folds 8-10 are evaluation only). Recipes "
        "combine triplet loss (online semi-hard), CosFace, and distillation from dlib's ResNet (needs the teacher "
        "cache under --teacher-cache, computed here when dlib is installed: pip install .[teacher]). "
        "Writes model.keras, history.json and train_info.json to --out.",
    )
    p.add_argument("--recipe", choices=sorted(RECIPES), default="distill+triplet",
                   help="losses to train with (default: %(default)s)")
    p.add_argument("--compare", metavar="R1,R2,...", default=None,
                   help="instead: short runs of these recipes into --out/<recipe>/ and a table --out/recipes.json")
    p.add_argument("--arch", choices=("edge", "seed"), default="edge",
                   help="edge: MobileFaceNet-like net we ship; seed: plain conv stack reference (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=30, help="most epochs (early stopping may end sooner; default: %(default)s)")
    p.add_argument("--versions", type=int, default=9,
                   help="versions per image: 1 = originals only; each more is a seeded shift/rotation/scale/"
                        "brightness/contrast jitter (odd versions also mirrored, a third also blurred), embedded by "
                        "the teacher too (~11 core-minutes per 7.7k "
                        "images, spread over --teacher-workers; default: %(default)s)")
    p.add_argument("--p", type=int, default=32, help="identities per batch (default: %(default)s)")
    p.add_argument("--k", type=int, default=4, help="samples per identity in a batch (default: %(default)s)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate, cosine decay (default: %(default)s)")
    p.add_argument("--patience", type=int, default=8, help="early-stopping patience in epochs (default: %(default)s)")
    p.add_argument("--subset-people", type=int, default=None, help="train on the first N identities only (smoke runs)")
    p.add_argument("--teacher-cache", type=Path, default=Path("build/face/teacher"),
                   help="teacher embedding cache folder (default: %(default)s)")
    p.add_argument("--init", type=Path, default=None,
                   help="start from this earlier run's model.keras (same --arch) instead of random weights")
    p.add_argument("--teacher-workers", type=int, default=None,
                   help="processes computing missing teacher embeddings, one per core (default: all cores)")
    p.add_argument("--cached-teacher-only", action="store_true",
                   help="train distillation recipes only on samples whose teacher embedding is already cached")
    p.add_argument("--pack", type=Path, default=None,
                   help="train from a training pack written by `face-pack` instead of --data-dir and the teacher "
                        "cache (e.g. on a GPU machine without LFW or dlib); the converter evaluates the result")
    p.add_argument("--width", type=int, default=None, help="edge net width (default: 64, ~0.52M parameters)")
    p.add_argument("--input-size", type=int, default=None,
                   help="model input in pixels per side (default: 96; the bundle records it for the device)")
    _add_run_args(p, Path("build/face/model"))
    p.set_defaults(func=_face)

    p = sub.add_parser(
        "face-pack",
        help="write a face training pack: train elsewhere (GPU machine) without LFW or dlib",
        description="Write one .npz holding the LFW training images (their file bytes), the teacher's embedding of "
        "every augmented version (int8), and the validation images and pairs. `training face --pack FILE` "
        "trains from it on any machine with Keras (TensorFlow, JAX or PyTorch backend). Teacher embeddings missing "
        "from --teacher-cache are computed here (needs dlib: pip install .[teacher]).",
    )
    p.add_argument("--versions", type=int, default=9, help="versions per image to pack (default: %(default)s)")
    p.add_argument("--teacher-cache", type=Path, default=Path("build/face/teacher"),
                   help="teacher embedding cache folder (default: %(default)s)")
    p.add_argument("--teacher-workers", type=int, default=None,
                   help="processes computing missing teacher embeddings, one per core (default: all cores)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help=f"data directory holding faces/ (default: ${DATA_ENV}, else ../shared/data beside the project)")
    p.add_argument("--out", type=Path, default=Path("build/face/pack.npz"), help="pack file (default: %(default)s)")
    p.set_defaults(func=_face_pack)

    p = sub.add_parser(
        "face-resnet",
        help="dlib's face ResNet rebuilt in Keras from its public-domain weights (no training, no dlib)",
        description="Read dlib_face_recognition_resnet_model_v1.dat (from the face_recognition_models package, or "
        "--weights) and write the same network as a Keras face embedder for `converter face`: it takes dlib's "
        "aligned 150x150 grey chip, which the device cuts with dlib's 5-point landmark model ported to numpy (the "
        "converter puts that model in the bundle). 5.6 M parameters, 0.27 G MACs: the accurate choice beside the "
        "distilled student. Writes model.keras and train_info.json to --out.",
    )
    p.add_argument("--weights", type=Path, default=None,
                   help="the .dat file (default: the one in the installed face_recognition_models package)")
    p.add_argument("--no-align", action="store_true",
                   help="take the 128x128 crop and cut the chip from a fixed place instead of aligning with landmarks "
                        "(no landmark model on the device; 1.5 pp less accurate on the validation people)")
    p.add_argument("--out", type=Path, default=Path("build/face-resnet/model"),
                   help="output folder (default: %(default)s)")
    p.set_defaults(func=_face_resnet)

    from training.face.recipes import SLIM_CACHE, SLIM_SIZE, SLIM_WIDTHS

    p = sub.add_parser(
        "face-slim",
        help="compact face student cut out of dlib's network and distilled from it on aligned chips",
        description="Keep the strongest channels of every convolution of dlib's face ResNet (--widths per level; "
        "dlib's are 32,64,128,256,256), take a --size px aligned chip instead of 150, and distil the result from the "
        "full network on augmented versions of every LFW training image (the teacher labels its own 150 px chip of "
        "the same pixels; labels cached under --teacher-cache). Every epoch is scored on the validation people as in "
        "`face` and the best one is kept (the untrained cut competes as epoch 0). No dlib needed. Writes "
        "model.keras, history.json and train_info.json to --out.",
    )
    p.add_argument("--widths", type=_widths, default=SLIM_WIDTHS,
                   help="residual-stream width per level, non-decreasing (default: 32,48,64,80,96: 0.93 M parameters)")
    p.add_argument("--size", type=positive_int, default=SLIM_SIZE,
                   help="aligned chip side in pixels (default: %(default)s)")
    p.add_argument("--versions", type=positive_int, default=24,
                   help="augmented versions per training image, each aligned twice and labelled by the teacher (~40 s "
                        "per version on 2 cores the first time; default: %(default)s)")
    p.add_argument("--epochs", type=positive_int, default=4, help="epochs over all versions (default: %(default)s)")
    p.add_argument("--batch", type=positive_int, default=64, help="batch size (default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3,
                   help="peak learning rate after a short warm-up, cosine decay (default: %(default)s)")
    p.add_argument("--subset-people", type=int, default=None, help="train on the first N identities only (smoke runs)")
    p.add_argument("--teacher-cache", type=Path, default=SLIM_CACHE,
                   help="teacher label cache folder (default: %(default)s)")
    p.add_argument("--weights", type=Path, default=None,
                   help="dlib's network .dat (default: the one in the installed face_recognition_models package)")
    p.add_argument("--init", type=Path, default=None, metavar="MODEL",
                   help="continue a finished run's model.keras (its widths, size and centre) instead of a new cut")
    p.add_argument("--first-version", type=_non_negative, default=0, metavar="N",
                   help="use augmented versions N .. N+versions-1; with --init, versions the model has not seen "
                        "(default: %(default)s)")
    p.add_argument("--mixup", type=_share, default=0.0, metavar="SHARE",
                   help="share of the samples blended with another training face (teacher and student see the same "
                        "blend; default: %(default)s, none)")
    p.add_argument("--feature-weight", type=_non_negative_float, default=0.0, metavar="W",
                   help="also distil the teacher's intermediate maps: weight of each level's gap (the share of the "
                        "teacher's map variance a 1x1 projection of the student's map leaves unexplained; the teacher "
                        "runs at the student's chip size on every batch, ~2x the time per step; default: "
                        "%(default)s, off)")
    _add_run_args(p, Path("build/face-slim/model"))
    p.set_defaults(func=_face_slim)


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
    p.add_argument("--epochs", type=int, default=20, help="training epochs (default: %(default)s)")
    p.add_argument("--batch", type=int, default=128, help="batch size (default: %(default)s)")
    p.add_argument("--subset", type=positive_int, default=None, help="train on the first N images only (smoke runs)")
    p.add_argument("--validation", type=int, default=0, metavar="N",
                   help="hold out the last N training images and report accuracy on them every epoch: compare "
                        "settings on these, never on the test split; the shipped models use 0 (all 60k)")
    p.add_argument("--seed", type=int, default=1, help="random seed (default: %(default)s)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help=f"data directory holding mnist/ (default: ${DATA_ENV}, else ../shared/data beside the project)")
    p.add_argument("--out", type=Path, default=Path("build/digits"), help="output folder (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="one line per epoch instead of a progress bar")
    p.set_defaults(func=_digits)
    p = sub.add_parser(
        "meter",
        help="utility meter digit wheels (position in tenths) on real meter crops",
        description="Train the meter digit-wheel model: a small CNN that reads a wheel's position in tenths of a "
        "digit (100 classes, 0.0-9.9) from a 20x32 RGB crop, on the real crops in meter-digits/collected. "
        "Trains on the training meter groups with augmentation (framing, lighting, blur, glare, noise, colour "
        "channel swaps and inversion; a quarter of the LCD samples shown as a blank position, labelled 0.0) and "
        "prints whole-digit and rolling accuracy on the validation groups after every epoch; the test groups "
        "are left to the converter. Writes model.keras, history.json and train_info.json to --out.",
    )
    p.add_argument("--epochs", type=int, default=30, help="training epochs (default: %(default)s)")
    p.add_argument("--batch", type=int, default=64, help="batch size (default: %(default)s)")
    p.add_argument("--with-validation", action="store_true",
                   help="also train on the validation groups (for the shipped model, once settings are chosen); "
                        "the per-epoch validation numbers then only show progress")
    p.add_argument("--width", type=int, default=24,
                   help="filters of the first conv block; later blocks use 2x and 4x (default: %(default)s)")
    p.add_argument("--subset", type=positive_int, default=None, help="train on N random training crops only (smoke runs)")
    p.add_argument("--seed", type=int, default=1, help="random seed (default: %(default)s)")
    p.add_argument("--members", type=int, default=1,
                   help="train N models with seeds --seed, --seed+1, ... and save one model whose output is the "
                        "mean of their softmax outputs (a seed ensemble; N times the compute; default: %(default)s)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help=f"data directory holding meter-digits/ (default: ${DATA_ENV}, else ../shared/data beside the project)")
    p.add_argument("--out", type=Path, default=Path("build/meter"), help="output folder (default: %(default)s)")
    p.set_defaults(func=_meter)
    _add_face(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (DataNotFoundError, ImageError, ValueError) as exc:  # ImageError: a corrupt file in the data
        print(f"error: {exc}", file=sys.stderr)
        return 2
