"""Aligning a camera frame to the meter's reference frame with reference marks, or refusing to.

A camera on a meter moves: the holder sags, someone bumps it, the lens warms up. The digit ROIs are
drawn once on a reference frame, so each new frame is first mapped back onto it. Small, textured
reference marks (cut from the reference frame: a screw, a logo, a printed character) are searched
by normalised cross-correlation within `search_px` of where they were, and the found positions
give the frame→reference transform: a shift for one mark, shift + rotation + scale for two, an
affine map for three, a homography (perspective) for four or more.

Why refuse instead of reading anyway: a misaligned frame crops half a digit, and the model then
reads *something*; that value would pass into the history and Home Assistant. So when a mark is
not found (its correlation is below `min_score`, e.g. covered by a reflection) or the transform is
implausible (rotated or scaled more than a camera on a holder can be), the frame is refused with
the reason, and the post-processing keeps the last good value. With three or more marks, one of
them may be lost (a reflection over a screw head is common) and the frame is aligned with the
others (`min_marks`, default: all but one); with one or two marks, all are needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from device.images import ImageError, load_image, to_gray
from device.meter.config import AlignmentConfig, ConfigError, Roi


@dataclass(frozen=True)
class MarkMatch:
    """Where one reference mark was found. Centres are in pixels; `window` is (x, y, w, h) in the frame."""

    name: str
    score: float
    expected: tuple[float, float]
    found: tuple[float, float]
    window: tuple[int, int, int, int]
    size: tuple[int, int]


@dataclass(frozen=True)
class Alignment:
    """The result of aligning one frame: the transform, how good it is, and why it was refused if it was.

    `matrix` maps reference-frame coordinates to this frame's coordinates (3x3, homogeneous).
    """

    ok: bool
    matches: tuple[MarkMatch, ...]
    matrix: np.ndarray | None
    shift_px: float
    rotation_deg: float
    scale: float
    reason: str = ""
    used: tuple[int, ...] = ()  # indices of the marks the transform was computed from

    @property
    def quality(self) -> float:
        """The worst used mark's correlation (0..1): the number to watch when marks start to fade."""
        return min((m.score for i, m in enumerate(self.matches) if i in self.used or not self.used), default=0.0)

    def summary(self) -> dict[str, float | bool | str | int]:
        return {"ok": self.ok, "quality": round(self.quality, 3), "marks_used": len(self.used),
                "marks": len(self.matches), "shift_px": round(self.shift_px, 1),
                "rotation_deg": round(self.rotation_deg, 2), "scale": round(self.scale, 4), "reason": self.reason}


class AlignmentError(Exception):
    """A frame could not be aligned; `alignment` says what was found."""

    def __init__(self, alignment: Alignment):
        super().__init__(alignment.reason)
        self.alignment = alignment


def _subpixel(scores: np.ndarray, x: int, y: int) -> tuple[float, float]:
    """Refine a correlation peak with a parabola through it and its neighbours (per axis)."""

    def offset(a: float, b: float, c: float) -> float:
        denom = a - 2 * b + c
        return 0.0 if abs(denom) < 1e-9 else float(np.clip(0.5 * (a - c) / denom, -0.5, 0.5))

    dx = offset(*scores[y, x - 1:x + 2]) if 0 < x < scores.shape[1] - 1 else 0.0
    dy = offset(*scores[y - 1:y + 2, x]) if 0 < y < scores.shape[0] - 1 else 0.0
    return x + dx, y + dy


def _transform(ref: np.ndarray, found: np.ndarray) -> np.ndarray:
    """3x3 reference→frame transform from point pairs, as rich as the number of marks allows."""
    n = len(ref)
    if n == 1:
        dx, dy = found[0] - ref[0]
        return np.array([[1, 0, dx], [0, 1, dy], [0, 0, 1]], dtype=np.float64)
    if n == 2:
        r, f = ref[1] - ref[0], found[1] - found[0]
        scale = float(np.hypot(*f) / max(np.hypot(*r), 1e-9))
        angle = math.atan2(f[1], f[0]) - math.atan2(r[1], r[0])
        c, s = scale * math.cos(angle), scale * math.sin(angle)
        a = np.array([[c, -s], [s, c]])
        t = found[0] - a @ ref[0]
        return np.array([[c, -s, t[0]], [s, c, t[1]], [0, 0, 1]], dtype=np.float64)
    if n == 3:
        affine = cv2.getAffineTransform(ref.astype(np.float32), found.astype(np.float32))
        return np.vstack([affine, [0, 0, 1]]).astype(np.float64)
    homography, _ = cv2.findHomography(ref, found, 0)
    if homography is None:
        raise np.linalg.LinAlgError("marks are collinear")
    return homography


class Aligner:
    """Reference marks loaded once; `align(frame)` per frame, then `crop(frame, alignment, rois)`."""

    def __init__(self, config: AlignmentConfig):
        self.config = config
        self.templates: list[np.ndarray] = []
        for mark in config.marks:
            try:
                template = to_gray(load_image(mark.image))
            except ImageError as exc:
                raise ConfigError(f"reference mark: {exc}") from exc
            if float(template.std()) < 2.0:
                raise ConfigError(f"reference mark {mark.image} is flat (no texture); cut a mark with edges, e.g. "
                                  "a screw, a logo or a printed character")
            self.templates.append(template)

    def _match(self, gray: np.ndarray, index: int) -> MarkMatch:
        mark, template = self.config.marks[index], self.templates[index]
        th, tw = template.shape
        s = self.config.search_px
        x0, y0 = max(mark.x - s, 0), max(mark.y - s, 0)
        x1, y1 = min(mark.x + tw + s, gray.shape[1]), min(mark.y + th + s, gray.shape[0])
        expected = (mark.x + tw / 2, mark.y + th / 2)
        window = (x0, y0, max(x1 - x0, 0), max(y1 - y0, 0))
        if x1 - x0 < tw or y1 - y0 < th:
            return MarkMatch(mark.image.name, 0.0, expected, expected, window, (tw, th))
        scores = cv2.matchTemplate(gray[y0:y1, x0:x1], template, cv2.TM_CCOEFF_NORMED)
        _, best, _, (bx, by) = cv2.minMaxLoc(scores)
        fx, fy = _subpixel(scores, bx, by)
        score = float(best) if np.isfinite(best) else 0.0
        return MarkMatch(mark.image.name, score, expected, (x0 + fx + tw / 2, y0 + fy + th / 2), window, (tw, th))

    def align(self, frame: np.ndarray) -> Alignment:
        """Find every mark and derive the transform; `ok` is False (with `reason`) when the frame must be refused."""
        gray = to_gray(frame)
        matches = tuple(self._match(gray, i) for i in range(len(self.templates)))
        used = tuple(i for i, m in enumerate(matches) if m.score >= self.config.min_score)
        found_marks = [matches[i] for i in used]
        weak = [m for m in matches if m.score < self.config.min_score]
        needed = self.config.min_marks or len(matches)
        if len(found_marks) < needed:
            names = ", ".join(f"{m.name} (score {m.score:.2f})" for m in weak)
            return Alignment(False, matches, None, 0.0, 0.0, 1.0, f"reference mark not found: {names} < min_score "
                             f"{self.config.min_score} ({len(found_marks)} of {needed} needed marks found)")
        ref = np.array([m.expected for m in found_marks], dtype=np.float64)
        found = np.array([m.found for m in found_marks], dtype=np.float64)
        try:
            matrix = _transform(ref, found)
        except np.linalg.LinAlgError as exc:
            return Alignment(False, matches, None, 0.0, 0.0, 1.0, f"alignment failed: {exc}")
        if not np.all(np.isfinite(matrix)) or abs(matrix[2, 2]) < 1e-12:
            return Alignment(False, matches, None, 0.0, 0.0, 1.0, "alignment failed: the found marks are collinear")
        linear = matrix[:2, :2] / matrix[2, 2]
        scale = math.sqrt(abs(float(np.linalg.det(linear))))
        rotation = math.degrees(math.atan2(linear[1, 0], linear[0, 0]))
        shift = float(np.mean(np.hypot(*(found - ref).T)))
        reason = ""
        if abs(rotation) > self.config.max_rotation_deg:
            reason = f"frame rotated {rotation:.1f}° (more than max_rotation_deg {self.config.max_rotation_deg})"
        elif abs(scale - 1.0) > self.config.max_scale_change:
            reason = f"frame scaled {scale:.3f}x (more than max_scale_change {self.config.max_scale_change})"
        return Alignment(not reason, matches, matrix, shift, rotation, scale, reason, used)

    @staticmethod
    def crop(frame: np.ndarray, alignment: Alignment, roi: Roi) -> np.ndarray:
        """The ROI (reference coordinates) cut from the frame through the alignment transform.

        Each ROI is warped on its own (the matrix maps its pixels straight into the frame), which
        costs a few small warps instead of one warp of the whole frame.
        """
        if alignment.matrix is None:
            raise AlignmentError(alignment)
        to_roi = np.array([[1, 0, roi.x], [0, 1, roi.y], [0, 0, 1]], dtype=np.float64)
        return cv2.warpPerspective(frame, alignment.matrix @ to_roi, (roi.w, roi.h),
                                   flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REPLICATE)

    @staticmethod
    def outside(frame: np.ndarray, alignment: Alignment, rois: tuple[Roi, ...] | list[Roi]) -> list[int]:
        """Indices of the ROIs that, mapped into the frame, leave it (their crops would be invented pixels)."""
        if alignment.matrix is None:
            return list(range(len(rois)))
        corners = np.array([[[x, y]] for r in rois for x, y in ((r.x, r.y), (r.x + r.w, r.y), (r.x, r.y + r.h),
                                                                 (r.x + r.w, r.y + r.h))], dtype=np.float64)
        mapped = cv2.perspectiveTransform(corners, alignment.matrix).reshape(len(rois), 4, 2)
        h, w = frame.shape[:2]
        fits = (mapped >= -1).all(axis=(1, 2)) & (mapped[:, :, 0] <= w + 1).all(axis=1) & \
            (mapped[:, :, 1] <= h + 1).all(axis=1)
        return [i for i, ok in enumerate(fits) if not ok]
