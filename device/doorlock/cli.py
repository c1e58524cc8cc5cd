"""The `doorlock` command (also `python -m device.doorlock`): enroll people, run the lock, read the audit log."""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import time
from dataclasses import asdict
from pathlib import Path

from device.bundle import BundleError
from device.camera import CameraError, EndOfStream, FrameError, open_source
from device.detect import DetectorError
from device.doorlock.audit import AuditLog
from device.doorlock.config import LOOSE_THRESHOLDS, Config, ConfigError, load_config
from device.doorlock.enroll import EnrollError, FaceDB, enroll_images, face_from_image
from device.doorlock.pipeline import Recognizer
from device.doorlock.relay import Relay, RelayError, mock_factory
from device.images import ImageError
from device.runtime import ModelError

# Errors a user can fix (a path, a config value, a missing database folder): one line, no traceback.
USER_ERRORS = (BundleError, CameraError, ConfigError, DetectorError, EnrollError, ImageError, ModelError,
               RelayError, OSError, ValueError, sqlite3.Error)


def _enroll(args: argparse.Namespace, config: Config) -> int:
    if not args.images and args.camera is None:
        raise EnrollError("give photo files, or --camera to take the photos now")
    recognizer = Recognizer.from_config(config)
    db = FaceDB(config.storage.database)
    try:
        if args.camera is not None:
            added, errors = _enroll_camera(db, recognizer, args, config), []
        else:
            added, errors = enroll_images(db, recognizer, args.name, args.images, aligned=args.aligned)
    finally:
        db.close()
    for message in errors:
        print(f"refused: {message}", file=sys.stderr)
    print(f"{args.name}: {added} face(s) enrolled, {len(errors)} photo(s) refused")
    if added and added < 3:
        print("hint: 3 or more photos (different days, light, glasses on/off) make recognition more reliable")
    return 0 if added else 1


def _enroll_camera(db: FaceDB, recognizer: Recognizer, args: argparse.Namespace, config: Config) -> int:
    """Take `--count` good face photos from a camera, `--interval` seconds apart so they differ a little."""
    spec = args.camera or config.camera.source
    added, last, deadline = 0, 0.0, time.monotonic() + args.timeout
    # Every photo must show the same person as the first (judged by the bundle's best_accuracy threshold, on
    # the normalised score when the bundle has a cohort): someone walking behind must not be enrolled too.
    first, same_person = None, recognizer.threshold("best_accuracy")
    with open_source(spec, size=(config.camera.width, config.camera.height)) as source:
        print(f"look at the camera ({spec}); taking {args.count} photos …", flush=True)
        while added < args.count:
            if time.monotonic() > deadline:
                raise EnrollError(f"only {added} of {args.count} usable photos within {args.timeout:.0f} s: "
                                  "check light, distance and that one face is in view")
            try:
                frame = source.read()
                if time.monotonic() - last < args.interval:
                    continue
                crop, vector = face_from_image(recognizer, frame, f"{spec} frame")
            except EndOfStream:
                raise EnrollError(f"{spec} ended after {added} usable photo(s) of the {args.count} asked for") from None
            except (FrameError, EnrollError, CameraError):
                continue
            if first is None:
                first = recognizer.gallery([("first", vector)], "best_accuracy")
            elif first.match(vector, same_person).person is None:
                print("  skipped a frame: a different face than the first photo?", flush=True)
                continue
            db.add(args.name, vector, crop, recognizer.model_sha256, f"camera {spec}")
            added, last = added + 1, time.monotonic()
            print(f"  photo {added}/{args.count}", flush=True)
    return added


def _list(args: argparse.Namespace, config: Config) -> int:
    db = FaceDB(config.storage.database)
    try:
        model_sha = Recognizer.from_config(config).model_sha256 if args.check_model else None
        people = db.people(model_sha)
    finally:
        db.close()
    if args.json:
        print(json.dumps([asdict(p) for p in people]))
    elif not people:
        print("nobody enrolled")
    for p in people if not args.json else []:
        note = f"  ({p.stale} from another model: run `doorlock reembed`)" if p.stale else ""
        print(f"{p.name}: {p.embeddings} embedding(s){note}")
    return 0


def _remove(args: argparse.Namespace, config: Config) -> int:
    db = FaceDB(config.storage.database)
    try:
        count = db.remove(args.name)
    finally:
        db.close()
    print(f"{args.name}: removed with {count} embedding(s)")
    return 0


def _reembed(args: argparse.Namespace, config: Config) -> int:
    recognizer = Recognizer.from_config(config)
    db = FaceDB(config.storage.database)
    try:
        count = db.reembed(recognizer)
    finally:
        db.close()
    print(f"{count} embedding(s) recomputed with model {recognizer.model_sha256[:12]}")
    return 0


def _run(args: argparse.Namespace, config: Config) -> int:
    from device.doorlock.service import run_service

    return run_service(config)


def _audit(args: argparse.Namespace, config: Config) -> int:
    log = AuditLog(config.storage.database)
    try:
        rows = log.recent(args.limit)
    finally:
        log.close()
    for r in rows:
        if args.json:
            print(json.dumps(asdict(r)))
        else:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.time))
            dist = f"{r.distance:.3f}" if r.distance is not None else "-"
            score = f"  score {r.score:.2f}" if r.score is not None else ""
            print(f"{when}  {r.action:9s} {r.person or 'unknown':20s} distance {dist}{score}  frames {r.frames}  "
                  f"{r.reason}")
    return 0


def _check_config(args: argparse.Namespace, config: Config) -> int:
    """Print the effective settings, then load what `run` will load (bundle with its sha256 checks, detector,
    threshold), so a deploy fails here rather than when the service starts."""
    print(json.dumps(asdict(config), indent=2, default=str))
    recognizer = Recognizer.from_config(config)
    print(f"ok: {recognizer.embedder.variant} face model {recognizer.embedder.model.path} verified, "
          f"match threshold {recognizer.describe_threshold(config.decision.threshold)}")
    if config.decision.threshold in LOOSE_THRESHOLDS:
        print(f"warning: threshold {config.decision.threshold!r} lets in many more strangers than \"far_0.001pct\" "
              "(README: 7.8% vs 0.12% per attempt)", file=sys.stderr)
    return 0


def _relock(args: argparse.Namespace, config: Config) -> int:
    relay = Relay(config.relay.pin, config.relay.active_high, config.relay.unlock_s,
                  pin_factory=mock_factory() if config.relay.mock else None)
    relay.close()
    print(f"relay on pin {config.relay.pin} set to locked")
    return 0


def _bench(args: argparse.Namespace, config: Config) -> int:
    from device.doorlock.bench import bench_pipeline, write_report

    if args.threads is not None:
        config.model.threads = args.threads
    print(f"benchmarking the door-lock pipeline on {args.source} ({args.frames} frames) …", flush=True)
    report = bench_pipeline(config, str(args.source), frames=args.frames)
    print(write_report(report, args.out))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="doorlock",
        description="Face-recognition door lock: enroll people, then `doorlock run` unlocks a relay when an "
        "enrolled face matches in several frames at the model's calibrated threshold.",
    )
    parser.add_argument("--config", type=Path, default=os.environ.get("DOORLOCK_CONFIG") or None,
                        help="TOML config file (default: $DOORLOCK_CONFIG, else built-in defaults; "
                        "see device/doorlock/example.toml)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("enroll", help="add photos of a person", description=(
        "Enroll a person from photos (one face each; several photos recommended) or from the camera. "
        "Photos with no face, several faces or a blurred face are refused with the reason."))
    p.add_argument("name", help="the person's name as it will appear in the audit log")
    p.add_argument("images", nargs="*", type=Path, help="photo files")
    p.add_argument("--camera", nargs="?", const="", default=None, metavar="SPEC",
                   help="take photos from a camera instead (default: the configured camera)")
    p.add_argument("--count", type=int, default=5, help="photos to take with --camera (default: %(default)s)")
    p.add_argument("--interval", type=float, default=0.5,
                   help="seconds between --camera photos, so they differ (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=60.0, help="give up --camera after this many seconds")
    p.add_argument("--aligned", action="store_true",
                   help="the files are already face crops framed like the model's training data (e.g. LFW crops)")
    p.set_defaults(func=_enroll)

    p = sub.add_parser("list", help="show enrolled people")
    p.add_argument("--check-model", action="store_true", help="also count embeddings made by another model")
    p.add_argument("--json", action="store_true", help="JSON output")
    p.set_defaults(func=_list)

    p = sub.add_parser("remove", help="delete a person and their embeddings")
    p.add_argument("name")
    p.set_defaults(func=_remove)

    p = sub.add_parser("reembed", help="recompute embeddings from stored crops after a model change")
    p.set_defaults(func=_reembed)

    p = sub.add_parser("run", help="run the lock service (JSON-lines log on stderr; stop with SIGTERM/Ctrl-C)")
    p.set_defaults(func=_run)

    p = sub.add_parser("audit", help="show the latest decisions")
    p.add_argument("--limit", type=int, default=20, help="how many (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=_audit)

    p = sub.add_parser("check-config", help="validate the config, print the effective settings, and load the face "
                                            "bundle (sha256 verified), detector and threshold as `run` would")
    p.set_defaults(func=_check_config)

    p = sub.add_parser("bench", help="frames/s of the whole pipeline at 640x480, with per-stage times")
    p.add_argument("--source", type=Path, required=True, help="photos with faces: a folder, a video or an image")
    p.add_argument("--frames", type=int, default=300, help="frames per pass (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="interpreter threads (default: from the config)")
    p.add_argument("--out", type=Path, default=Path("models/doorlock-bench"),
                   help="results prefix: writes .json and .md (default: %(default)s)")
    p.set_defaults(func=_bench)

    p = sub.add_parser("relock", help="drive the relay to locked (systemd runs this after the service stops)")
    p.set_defaults(func=_relock)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config)
        return args.func(args, config)
    except USER_ERRORS as exc:
        print(f"doorlock: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
