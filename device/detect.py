"""Face detection for the door lock: find faces, keep the largest, reject ones too small or too blurred.

The default detector is OpenCV's Haar cascade shipped inside opencv-python-headless (`cv2.data`),
because the face embedder was trained on LFW crops whose framing comes from the same Viola-Jones
detector: a Haar box, squared and scaled by `device.face.crop_face`, reproduces that framing.
YuNet (`cv2.FaceDetectorYN`) is used when the user supplies its ONNX file; its boxes are tighter
than Haar's, so they are widened by `YUNET_TO_HAAR` before cropping (an approximation, see README).

Detection runs on a frame downscaled to `detect_width` pixels wide (Haar cost grows with the area
scanned) and, when the caller passes the previous box as `near`, only around it — a face in front
of a door moves little between frames — falling back to the whole frame when it is not found.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from device.images import to_gray

HAAR_CASCADE = "haarcascade_frontalface_default.xml"
# YuNet boxes span brow to chin; a Haar box of the same face is about this much wider (square).
YUNET_TO_HAAR = 1.15
# The blur measure is taken on the face resized to this width, so it does not depend on distance.
BLUR_SIDE = 128
# When tracking, the region around the previous face is scaled so that the face is about this wide.
TRACK_SIDE = 64

Box = tuple[int, int, int, int]


class DetectorError(Exception):
    """The detector model cannot be loaded."""


@dataclass(frozen=True)
class Face:
    """One detected face: box (x, y, w, h) in frame pixels, and the detector's score when it has one."""

    box: Box
    score: float = 1.0

    @property
    def size(self) -> int:
        """Side of the face box in pixels: the quantity the minimum-size check compares."""
        return min(self.box[2], self.box[3])


def blur_score(image: np.ndarray, box: Box) -> float:
    """Variance of the Laplacian inside the face box (higher = sharper).

    Measured on the face resized to `BLUR_SIDE` pixels so that the same sharpness gives the same
    number near and far from the camera; motion blur and bad focus both lower it.
    """
    x, y, w, h = box
    gray = to_gray(image)
    region = gray[max(0, y):y + h, max(0, x):x + w]
    if region.size == 0:
        return 0.0
    region = cv2.resize(region, (BLUR_SIDE, BLUR_SIDE), interpolation=cv2.INTER_AREA)
    return float(cv2.Laplacian(region, cv2.CV_64F).var())


class FaceDetector:
    """Haar cascade by default, YuNet when `model` points at its ONNX file."""

    def __init__(self, model: str | Path | None = None, detect_width: int = 320, min_face: int = 80,
                 scale_factor: float = 1.15, min_neighbors: int = 5, score_threshold: float = 0.8):
        self.detect_width = detect_width
        self.min_face = min_face
        self.scale_factor = scale_factor
        self.min_neighbors = min_neighbors
        self._yunet = None
        self._cascade = None
        if model:
            path = Path(model)
            if not path.is_file():
                raise DetectorError(f"{path}: YuNet model file not found")
            try:
                self._yunet = cv2.FaceDetectorYN.create(str(path), "", (320, 320), score_threshold, 0.3, 50)
            except cv2.error as exc:
                raise DetectorError(f"{path}: not a YuNet ONNX model OpenCV can load: {exc}") from exc
            self.name = f"yunet:{path.name}"
        else:
            cascade = cv2.CascadeClassifier(str(Path(cv2.data.haarcascades) / HAAR_CASCADE))
            if cascade.empty():
                raise DetectorError(f"OpenCV's {HAAR_CASCADE} is missing from {cv2.data.haarcascades}")
            self._cascade = cascade
            self.name = "haar"

    def detect(self, image: np.ndarray, near: Box | None = None) -> list[Face]:
        """All faces at least `min_face` px, largest first. With `near`, search around that box first.

        Around `near` only faces of 0.7-1.4x its size are looked for, at a scale that makes such a face
        about `TRACK_SIDE` px: a few cascade scales over a small region instead of all of them. A `near` box
        that does not overlap the frame (the camera came back at a smaller resolution) is ignored.
        """
        if near is not None and not _overlaps(near, image.shape):
            near = None
        if near is not None:
            side = max(near[2], near[3])
            scale = min(1.0, TRACK_SIDE / side)
            faces = self._detect_region(image, _expand(near, 0.6, image.shape), scale,
                                        (max(self.min_face, int(0.7 * side)), int(1.4 * side)))
            if faces:
                return faces
        width = image.shape[1]
        return self._detect_region(image, (0, 0, width, image.shape[0]), min(1.0, self.detect_width / width))

    def largest(self, image: np.ndarray, near: Box | None = None) -> Face | None:
        """The largest face — the person standing closest to the door — or None."""
        faces = self.detect(image, near)
        return faces[0] if faces else None

    def _detect_region(self, image: np.ndarray, region: Box, scale: float,
                       sizes: tuple[int, int] | None = None) -> list[Face]:
        """Faces inside `region`, searched on it resized by `scale`; `sizes` bounds the face side (frame px)."""
        rx, ry, rw, rh = region
        crop = image[ry:ry + rh, rx:rx + rw]
        small = cv2.resize(crop, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) if scale < 1 else crop
        low, high = sizes or (self.min_face, 0)
        min_side = max(12, int(low * scale))
        max_side = int(high * scale)
        if self._yunet is not None:
            raw = self._run_yunet(small, min_side)
        else:
            gray = to_gray(small)
            found = self._cascade.detectMultiScale(gray, self.scale_factor, self.min_neighbors,
                                                   minSize=(min_side, min_side), maxSize=(max_side, max_side))
            raw = [(tuple(int(v) for v in f), 1.0) for f in found]
        faces = [Face((int(x / scale) + rx, int(y / scale) + ry, int(w / scale), int(h / scale)), s)
                 for (x, y, w, h), s in raw]
        faces = [f for f in faces if f.size >= self.min_face]
        return sorted(faces, key=lambda f: f.box[2] * f.box[3], reverse=True)

    def _run_yunet(self, image: np.ndarray, min_side: int) -> list[tuple[Box, float]]:
        bgr = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR) if image.ndim == 2 else image
        self._yunet.setInputSize((bgr.shape[1], bgr.shape[0]))
        _, found = self._yunet.detect(bgr)
        out = []
        for row in found if found is not None else []:
            x, y, w, h = row[:4]
            side = max(w, h) * YUNET_TO_HAAR
            cx, cy = x + w / 2, y + h / 2
            if side >= min_side:
                out.append(((int(cx - side / 2), int(cy - side / 2), int(side), int(side)), float(row[-1])))
        return out


def _overlaps(box: Box, shape: tuple[int, ...]) -> bool:
    """Whether `box` has any area inside a frame of `shape`."""
    x, y, w, h = box
    return w > 0 and h > 0 and x < shape[1] and y < shape[0] and x + w > 0 and y + h > 0


def _expand(box: Box, margin: float, shape: tuple[int, ...]) -> Box:
    """`box` grown by `margin` of its size on every side, clipped to the frame."""
    x, y, w, h = box
    x0, y0 = max(0, int(x - margin * w)), max(0, int(y - margin * h))
    x1, y1 = min(shape[1], int(x + w + margin * w)), min(shape[0], int(y + h + margin * h))
    return x0, y0, max(1, x1 - x0), max(1, y1 - y0)
