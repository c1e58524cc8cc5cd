"""Frames per second of the whole door-lock pipeline, and where the time goes, at 640x480.

Frames are real photos letterboxed to 640x480 and preloaded, so camera/decoder time is excluded
(a camera delivers frames in parallel with processing). Each photo is held for `hold` consecutive
frames, as a person standing at the door is, so the detector's search near the previous face is
exercised; a second pass with tracking off gives the worst case (every frame searched in full).
Stage times are means (with p90s in the JSON), not the medians of `device.timing`: here the means add up
to the frame time that sets the FPS, and a tracked frame and a full search differ by design, not by noise.
Speed is measured here, never asserted in tests.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from device.camera import open_source
from device.doorlock.config import Config
from device.doorlock.decide import Decider, Gallery
from device.doorlock.pipeline import Recognizer

STAGES = ("detect", "quality", "crop", "embed", "match", "decide")


def letterbox(image: np.ndarray, size: tuple[int, int] = (640, 480)) -> np.ndarray:
    """Scale into `size` keeping the aspect ratio; the rest is black, as a 4:3 camera frame would frame it."""
    scale = min(size[0] / image.shape[1], size[1] / image.shape[0])
    small = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    frame = np.zeros((size[1], size[0], 3), np.uint8)
    top, left = (size[1] - small.shape[0]) // 2, (size[0] - small.shape[1]) // 2
    frame[top:top + small.shape[0], left:left + small.shape[1]] = small
    return frame


def run_pass(recognizer: Recognizer, decider: Decider, gallery: Gallery, threshold: float,
             frames: list[np.ndarray], track: bool) -> dict[str, Any]:
    """Time every frame through detect → embed → match → decide; returns FPS and per-stage ms."""
    stage_ms: dict[str, list[float]] = {s: [] for s in STAGES}
    faces = 0
    start = time.perf_counter()
    for i, frame in enumerate(frames):
        result = recognizer.process(frame, gallery, threshold, track=track)
        if result.match is not None:
            faces += 1
            t = time.perf_counter()
            decider.observe(result.match, result.crop, now=i / 15)
            result.ms["decide"] = (time.perf_counter() - t) * 1000
        for stage, ms in result.ms.items():
            stage_ms[stage].append(ms)
    elapsed = time.perf_counter() - start
    return {"frames": len(frames), "frames_with_face": faces, "fps": len(frames) / elapsed,
            "ms_per_frame": 1000 * elapsed / len(frames),
            "stage_ms": {s: float(np.mean(v)) if v else 0.0 for s, v in stage_ms.items()},
            "stage_p90_ms": {s: float(np.percentile(v, 90)) if v else 0.0 for s, v in stage_ms.items()}}


def bench_pipeline(config: Config, source: str, frames: int = 300, hold: int = 10) -> dict[str, Any]:
    """Benchmark the configured pipeline on photos from `source` (a folder, video or image)."""
    recognizer = Recognizer.from_config(config)
    with open_source(source) as src:
        photos = [letterbox(f) for f in src]
    if not photos:
        raise ValueError(f"{source}: no frames to benchmark with")
    sequence = [photos[(i // hold) % len(photos)] for i in range(frames)]
    # A realistic gallery: the faces of the photos themselves (matching cost grows with its size).
    entries = []
    for i, photo in enumerate(photos):
        face = recognizer.detector.largest(photo)
        if face is not None:
            entries.append((f"person{i}", recognizer.embed_face(photo, face)[1]))
    gallery = recognizer.gallery(entries, config.decision.threshold)
    threshold = recognizer.threshold(config.decision.threshold)
    for frame in sequence[:10]:  # warm-up: interpreter allocation, OpenCV's first-call costs
        recognizer.process(frame, gallery, threshold)
    passes = {}
    for name, track in (("tracking", True), ("full_search", False)):
        passes[name] = run_pass(recognizer, Decider(config.decision, config.liveness), gallery, threshold,
                                sequence, track)
    return {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
            "load_average": os.getloadavg()[0], "resolution": "640x480", "variant": config.model.variant,
            "threads": config.model.threads or os.cpu_count(), "detector": recognizer.detector.name,
            "detect_width": config.detector.detect_width, "photos": len(photos), "hold": hold,
            "gallery": len(gallery), **passes}


def markdown(report: dict[str, Any]) -> str:
    lines = [f"Door-lock pipeline at {report['resolution']}, {report['variant']} model, {report['threads']} thread(s), "
             f"detector {report['detector']} at width {report['detect_width']}; {report['machine']}, "
             f"1-min load average {report['load_average']:.1f} at start.", "",
             "| pass | FPS | ms/frame | " + " | ".join(f"{s} ms" for s in STAGES) + " |",
             "|---|---:|---:|" + "---:|" * len(STAGES)]
    for name in ("tracking", "full_search"):
        p = report[name]
        lines.append(f"| {name} | {p['fps']:.1f} | {p['ms_per_frame']:.1f} | "
                     + " | ".join(f"{p['stage_ms'][s]:.2f}" for s in STAGES) + " |")
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out: Path) -> str:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    out.with_suffix(".md").write_text(table)
    return table
