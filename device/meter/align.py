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
implausible (rotated, scaled, sheared or in perspective more than a camera on a holder can be),
the frame is refused with the reason, and the post-processing keeps the last good value. With
three or more marks, one of them may be lost (a reflection over a screw head is common) and the
frame is aligned with the others (`min_marks`, default: all but one); with one or two marks, all
are needed.

A mark can also be found confidently at the wrong place: a similar screw head, a reflection, a
holder that moved in the reference photo. An affine map through three marks or a homography through
four fits any positions exactly, so such a mark would be absorbed as shear or perspective and move
every ROI by a digit's width while the scores look perfect. So the found marks are first checked
against each other (`_agreeing`): a mark that the others do not confirm is dropped when exactly one
mark can be blamed, and the frame is refused when that cannot be told; the final transform must
also stay within the shear and perspective a camera on a holder can produce.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations

import cv2
import numpy as np

from device.images import ImageError, load_image, to_gray
from device.meter.config import AlignmentConfig, ConfigError, Roi

# A found mark agrees with the others when it lies within CONSISTENCY_PX + CONSISTENCY_STRAIN x (its
# distance from the others' centre) of where a similarity fitted to the others puts it. The pixels
# cover the correlation peak's own error; the strain covers the shear and perspective that a real
# view change adds and a similarity cannot follow, which grow with the distance. A fixed few pixels
# are not enough: the composed test frames (compose.distort, corners moved up to ±8 px) put their
# marks up to 15 px (four marks) and 27 px (three) from such a prediction, a strain of up to 0.036
# and 0.048 (1000 seeds). With these values none of those frames is refused (nor any of their 3-mark
# subsets), and a mark found 30 px from its place was caught in every case tried on a frame that only
# shifted and turned; on the distorted ones it is dropped in two thirds, refused in 31% and missed in
# 3% of the cases, where the view's own perspective happens to hide it.
CONSISTENCY_PX = 2.0
CONSISTENCY_STRAIN = 0.045
# Bounds on the final transform, a backstop behind the check above (which binds first in practice).
# Anisotropy: the ratio of the singular values of the linear map at the frame centre (1.0 = no shear
# or stretch); the composed test frames reach 1.040 with four marks and 1.053 with an affine map
# through three (1.08 is also the foreshortening of a camera tilted 22°). Perspective: how much the
# local scale at a frame corner differs from the centre's; the test frames reach 0.069.
MAX_ANISOTROPY = 1.08
MAX_PERSPECTIVE = 0.12


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
    dropped: tuple[int, ...] = ()  # found marks left out because the others put them elsewhere
    # per mark: px between where it was found and where a similarity fitted to the other used marks
    # puts it (a dropped mark: to all used marks); nan where not checked (fewer than three marks)
    residuals: tuple[float, ...] = ()

    @property
    def quality(self) -> float:
        """The worst used mark's correlation (0..1): the number to watch when marks start to fade."""
        return min((m.score for i, m in enumerate(self.matches) if i in self.used or not self.used), default=0.0)

    def summary(self) -> dict[str, float | bool | str | int]:
        return {"ok": self.ok, "quality": round(self.quality, 3), "marks_used": len(self.used),
                "marks": len(self.matches), "shift_px": round(self.shift_px, 1),
                "rotation_deg": round(self.rotation_deg, 2), "scale": round(self.scale, 4), "reason": self.reason,
                "dropped": ", ".join(f"{self.matches[i].name} ({self.residuals[i]:.1f} px off)" for i in self.dropped)}


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


def _similarity(ref: np.ndarray, found: np.ndarray) -> np.ndarray:
    """2x3 least-squares similarity (shift, rotation, one scale) from two or more point pairs."""
    n = len(ref)
    one, zero = np.ones(n), np.zeros(n)
    rows = np.empty((2 * n, 4))
    rows[0::2] = np.column_stack([ref[:, 0], -ref[:, 1], one, zero])
    rows[1::2] = np.column_stack([ref[:, 1], ref[:, 0], zero, one])
    (c, s, tx, ty), *_ = np.linalg.lstsq(rows, found.reshape(-1), rcond=None)
    return np.array([[c, -s, tx], [s, c, ty]])


def _misfit(ref: np.ndarray, found: np.ndarray, mark: int, others: list[int]) -> tuple[float, float]:
    """How far (px) `mark` was found from where a similarity through `others` (two or more) puts it; the tolerance."""
    similarity = _similarity(ref[others], found[others])
    predicted = similarity[:, :2] @ ref[mark] + similarity[:, 2]
    lever = float(np.hypot(*(ref[mark] - ref[others].mean(axis=0))))
    return float(np.hypot(*(found[mark] - predicted))), CONSISTENCY_PX + CONSISTENCY_STRAIN * lever


def _agree(ref: np.ndarray, found: np.ndarray, marks: tuple[int, ...]) -> bool:
    """Whether each of `marks` lies where the others put it; two marks always do (a similarity fits any two)."""
    return len(marks) < 3 or all(r <= tolerance for r, tolerance in
                                 (_misfit(ref, found, i, [j for j in marks if j != i]) for i in marks))


def _agreeing(ref: np.ndarray, found: np.ndarray, smallest: int) -> list[tuple[int, ...]]:
    """The largest groups (at least `smallest` marks) that agree; more than one means the culprit is unknown.

    Why a similarity, and leave-one-out: the alignment transforms have no degree of freedom to spare
    (an affine map through three marks, a homography through four), so a misplaced mark can only show
    against a simpler model; a similarity has 4 degrees, leaving 2 to spare with three marks and 4
    with four, and leaving the tested mark out keeps it from pulling the prediction towards itself.
    With four marks and one misplaced, only the other three agree, so it can be dropped; with three,
    every pair agrees, so none can be blamed and the frame is refused.
    """
    for size in range(len(ref), max(smallest, 1) - 1, -1):
        groups = [group for group in combinations(range(len(ref)), size) if _agree(ref, found, group)]
        if groups:
            return groups
    return []


def _shape(matrix: np.ndarray, width: int, height: int) -> tuple[float, float, float, float]:
    """Rotation (°), scale, anisotropy and perspective of a reference→frame transform, at the frame centre.

    With perspective, a homography's top-left 2x2 block is not its linear map anywhere, so the
    Jacobian at the centre is used; the rotation is that of its closest similarity.
    """
    centre = np.array([width / 2, height / 2])
    p = matrix[2, :2]
    w = float(p @ centre + matrix[2, 2])
    mapped = (matrix[:2, :2] @ centre + matrix[:2, 2]) / w
    jacobian = (matrix[:2, :2] - np.outer(mapped, p)) / w
    low, high = sorted(np.linalg.svd(jacobian, compute_uv=False))
    rotation = math.degrees(math.atan2(jacobian[1, 0] - jacobian[0, 1], jacobian[0, 0] + jacobian[1, 1]))
    corners = np.array([[0, 0], [width, 0], [0, height], [width, height]]) - centre
    ratio = (corners @ p + w) / w  # the local scale goes as ratio ** -1.5 (det of the Jacobian: det / w³)
    perspective = math.inf if np.any(ratio <= 0) else float(np.max(np.abs(ratio ** -1.5 - 1)))
    return rotation, math.sqrt(abs(float(np.linalg.det(jacobian)))), float(high / max(low, 1e-12)), perspective


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
        size = (gray.shape[1], gray.shape[0])
        matches = tuple(self._match(gray, i) for i in range(len(self.templates)))
        found_at = tuple(i for i, m in enumerate(matches) if m.score >= self.config.min_score)
        weak = [m for m in matches if m.score < self.config.min_score]
        needed = self.config.min_marks or len(matches)
        if len(found_at) < needed:
            names = ", ".join(f"{m.name} (score {m.score:.2f})" for m in weak)
            return Alignment(False, matches, None, 0.0, 0.0, 1.0, f"reference mark not found: {names} < min_score "
                             f"{self.config.min_score} ({len(found_at)} of {needed} needed marks found)")
        ref = np.array([matches[i].expected for i in found_at], dtype=np.float64)
        found = np.array([matches[i].found for i in found_at], dtype=np.float64)
        groups = _agreeing(ref, found, needed)
        if len(groups) != 1:
            reason = self._disagreement(ref, found, [matches[i].name for i in found_at], size, bool(groups), needed)
            return Alignment(False, matches, None, 0.0, 0.0, 1.0, reason)
        keep = list(groups[0])
        residuals = [math.nan] * len(matches)
        if len(keep) >= 3:
            for k, i in enumerate(found_at):
                residuals[i] = _misfit(ref, found, k, [j for j in keep if j != k])[0]
        used = tuple(found_at[k] for k in keep)
        dropped = tuple(i for i in found_at if i not in used)
        ref, found = ref[keep], found[keep]
        try:
            matrix = _transform(ref, found)
        except np.linalg.LinAlgError as exc:
            return Alignment(False, matches, None, 0.0, 0.0, 1.0, f"alignment failed: {exc}")
        if not np.all(np.isfinite(matrix)) or abs(matrix[2, 2]) < 1e-12:
            return Alignment(False, matches, None, 0.0, 0.0, 1.0, "alignment failed: the found marks are collinear")
        rotation, scale, anisotropy, perspective = _shape(matrix, *size)
        shift = float(np.mean(np.hypot(*(found - ref).T)))
        reason = self._implausible(rotation, scale, anisotropy, perspective)
        return Alignment(not reason, matches, matrix, shift, rotation, scale, reason, used, dropped, tuple(residuals))

    def _implausible(self, rotation: float, scale: float, anisotropy: float, perspective: float) -> str:
        """Why a transform is not a view that a camera on a holder can have, or "" when it is."""
        config = self.config
        if abs(rotation) > config.max_rotation_deg:
            return f"frame rotated {rotation:.1f}° (more than max_rotation_deg {config.max_rotation_deg})"
        if abs(scale - 1.0) > config.max_scale_change:
            return f"frame scaled {scale:.3f}x (more than max_scale_change {config.max_scale_change})"
        if perspective > MAX_PERSPECTIVE:  # before anisotropy: perspective also stretches the centre
            return (f"frame in perspective: the scale at a corner differs {perspective:.0%} from the centre's "
                    f"(more than {MAX_PERSPECTIVE:.0%})")
        if anisotropy > MAX_ANISOTROPY:
            return f"frame sheared or stretched {anisotropy:.3f}x (more than {MAX_ANISOTROPY})"
        return ""

    def _disagreement(self, ref: np.ndarray, found: np.ndarray, names: list[str], size: tuple[int, int],
                      ambiguous: bool, needed: int) -> str:
        """Why the found marks were refused together: each one that the others put elsewhere, and by how much.

        The view that all of them describe together is added when it is implausible: a whole frame
        sheared or in perspective makes every mark disagree with the others' similarity.
        """
        off = []
        for k, name in enumerate(names):
            residual, tolerance = _misfit(ref, found, k, [j for j in range(len(names)) if j != k])
            if residual > tolerance:
                off.append((residual - tolerance, f"{name} {residual:.1f} px (tolerance {tolerance:.1f})"))
        try:
            view = self._implausible(*_shape(_transform(ref, found), *size))
        except np.linalg.LinAlgError:
            view = ""
        why = "which one cannot be told" if ambiguous else f"no {needed} of them agree (min_marks {needed})"
        return (f"reference marks disagree: {', '.join(text for _, text in sorted(off, reverse=True))} from where "
                f"the other marks put them; a mark matched at the wrong place or the view is skewed, and {why}"
                + (f"; together they describe a {view}" if view else ""))

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
