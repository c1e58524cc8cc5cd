"""Command line of the meter reader: `meter --help` (also `python -m device.meter`, `python -m device meter`).

    meter preview IMAGE --config water.toml --out preview/   check marks and ROIs on a photo
    meter read IMAGE... --config water.toml [--json]        read photos once (state untouched)
    meter run --config water.toml                           the service: capture, read, publish
    meter set-value 123.456 --config water.toml             set the stored last good value offline
    meter mark PHOTO --box x,y,w,h --out marks/left.png      cut a reference mark from a photo
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from device.bundle import BundleError
from device.images import ImageError, load_image
from device.meter.config import MeterConfig, load_config
from device.runtime import ModelError

if TYPE_CHECKING:
    from device.meter.postprocess import Outcome
    from device.meter.reader import MeterReader, MeterReading

USER_ERRORS = (BundleError, ImageError, ModelError, OSError, ValueError)


def _config(args: argparse.Namespace) -> MeterConfig:
    return load_config(args.config)


def _reader(config: MeterConfig) -> "MeterReader":
    from device.meter.reader import MeterReader

    return MeterReader.from_config(config)


def _read(args: argparse.Namespace) -> int:
    config = _config(args)
    reader = _reader(config)
    refused = 0
    for image in args.images:
        try:
            reading = reader.read(load_image(image))
        except ImageError as exc:
            refused += 1
            print(f"{image}: error: {exc}", file=sys.stderr)
            continue
        refused += reading.value is None
        if args.json:
            print(json.dumps({"image": str(image), **reading.summary()}))
        elif reading.value is None:
            print(f"{image}: refused: {reading.error}")
        else:
            wheels = " ".join(f"{v:.1f}" for v in reading.positions())
            print(f"{image}: {reading.text} {config.unit}".rstrip() + f"  (wheels {wheels}; confidence "
                  f"{reading.confidence:.2f}; alignment {reading.alignment.quality:.2f})")
    return 1 if refused else 0


def _preview(args: argparse.Namespace) -> int:
    from device.meter.align import Aligner
    from device.meter.preview import write_preview

    config = _config(args)
    frame = load_image(args.image)
    reading = None
    if args.no_model:
        aligner = Aligner(config.alignment)
    else:
        reader = _reader(config)
        aligner = reader.aligner
        reading = reader.read(frame)
    alignment, files = write_preview(frame, aligner, list(config.digits), args.out, reading)
    for i, match in enumerate(alignment.matches):
        print(f"mark {match.name}: score {match.score:.3f}, moved "
              f"{match.found[0] - match.expected[0]:+.1f},{match.found[1] - match.expected[1]:+.1f} px"
              + (f", DROPPED: {alignment.residuals[i]:.1f} px from where the other marks put it"
                 if i in alignment.dropped else ""))
    if not alignment.ok:
        print(f"alignment REFUSED: {alignment.reason}")
    elif reading is not None:
        print(f"reading: {reading.text or reading.error}  (wheels {' '.join(f'{v:.1f}' for v in reading.positions())})")
    print(f"wrote {len(files)} files to {args.out} (open {args.out / 'preview.png'})")
    return 0 if alignment.ok and (reading is None or reading.value is not None) else 1


def _run(args: argparse.Namespace) -> int:
    from device.camera import CameraError
    from device.meter.service import MeterService

    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s")
    config = _config(args)
    service = MeterService(config)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def report(outcome: "Outcome", reading: "MeterReading | None") -> None:
        wheels = "" if reading is None or not reading.wheels else \
            "  wheels " + " ".join(f"{v:.1f}" for v in reading.positions())
        print(f"{outcome.status:>10}  value {outcome.value}  raw {outcome.raw}"
              f"{'  ' + outcome.reason if outcome.reason else ''}{wheels}", flush=True)

    source = args.source or config.source
    interval = config.interval_s if args.interval is None else args.interval
    print(f"meter {config.name}: reading {source} every {interval:g} s (Ctrl-C to stop)", flush=True)
    try:
        service.start_outputs()
        service.run(source, interval, stop, max_frames=args.frames, report=report)
    except KeyboardInterrupt:
        pass
    except CameraError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        service.close()
    return 0


def _set_value(args: argparse.Namespace) -> int:
    from device.meter.postprocess import PostProcessor

    config = _config(args)
    outcome = PostProcessor(config.postprocess, config.resolution).set_value(args.value)
    print(f"stored {outcome.value:g} in {config.postprocess.state_file} (a running service must be told over "
          "HTTP POST /api/value or MQTT <base>/set_value instead)")
    return 0


def _mark(args: argparse.Namespace) -> int:
    import cv2

    frame = load_image(args.image)
    try:
        x, y, w, h = (int(v) for v in args.box.split(","))
    except ValueError:
        raise ValueError(f"--box must be x,y,w,h in pixels, got {args.box!r}") from None
    if w < 8 or h < 8 or x < 0 or y < 0 or x + w > frame.shape[1] or y + h > frame.shape[0]:
        raise ValueError(f"--box {args.box} must be at least 8x8 px and inside the "
                         f"{frame.shape[1]}x{frame.shape[0]} image")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(args.out), frame[y:y + h, x:x + w]):
        raise OSError(f"{args.out}: could not write (use a .png file name)")
    print(f"wrote {args.out}; add to the config:\n[[alignment.marks]]\nimage = \"{args.out}\"\nx = {x}\ny = {y}")
    return 0


def build_parser(prog: str = "meter") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Read a water/gas/electricity meter's digit wheels from a camera: align to reference marks, "
        "read every wheel with the int8 digit model, check the value against the last good one (with recovery), "
        "publish to MQTT/Home Assistant, HTTP and an SQLite history. See device/meter/examples/water.toml.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_text: str, func) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", "-c", type=Path, required=True, help="the meter's TOML config file")
        p.set_defaults(func=func)
        return p

    p = add("run", "run the service: capture a frame every interval, read, check, store and publish it", _run)
    p.add_argument("--source", help="frame source, overrides capture.source: 'picamera2', '0', '/dev/video0', "
                                    "'rtsp://…', a video, a folder of images or one image")
    p.add_argument("--interval", type=float, help="seconds between readings (default: capture.interval_s)")
    p.add_argument("--frames", type=int, help="stop after this many frames (default: run until stopped)")
    p.add_argument("--quiet", "-q", action="store_true", help="log warnings only")
    p = add("read", "read one or more photos once and print the value (the stored state is not touched); "
                    "exit status 1 when a photo was refused", _read)
    p.add_argument("images", nargs="+", type=Path, help="photos of the meter")
    p.add_argument("--json", action="store_true", help="one JSON object per image")
    p = add("preview", "write the ROI and reference-mark crops and an annotated preview.png to check a config",
            _preview)
    p.add_argument("image", type=Path, help="a photo of the meter")
    p.add_argument("--out", type=Path, required=True, help="folder for the preview files")
    p.add_argument("--no-model", action="store_true", help="only align and crop (no model bundle needed)")
    p = sub.add_parser("mark", help="cut a reference mark (template) out of a good photo of the meter",
                       description="Cut a reference mark out of a good photo of the meter: pick something "
                       "small, textured and fixed to the meter body (a screw, a logo, a printed character), "
                       "away from the wheels and from reflections. Use two or more marks, far apart.")
    p.add_argument("image", type=Path, help="a good photo of the meter (the reference frame)")
    p.add_argument("--box", required=True, help="x,y,w,h of the mark in the photo, in pixels")
    p.add_argument("--out", type=Path, required=True, help="PNG file to write, e.g. marks/left.png")
    p.set_defaults(func=_mark)
    p = add("set-value", "store a last good value (e.g. after a meter exchange) while the service is stopped",
            _set_value)
    p.add_argument("value", type=float, help="the meter's current value")
    return parser


def main(argv: list[str] | None = None, prog: str = "meter") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
