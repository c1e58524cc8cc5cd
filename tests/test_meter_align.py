"""Alignment refuses or repairs reference marks that match at the wrong place, and views no holder can produce.

Frames are composed (device/meter/compose.py) from real digit-window crops with four reference marks.
A misplaced mark is made by moving a mark's pixels 30 px and showing the plate in its old spot: the
template then matches at the wrong place as well as the other marks at theirs, as a similar screw
head or a moved holder would. The camera motion is applied with a known matrix where the test needs the true ROI
positions; `distort` (shift, rotation, random perspective, uneven light) where it only needs a
realistic frame.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

from device.meter.align import MAX_ANISOTROPY, MAX_PERSPECTIVE, Aligner, Alignment, AlignmentError, _shape
from device.meter.compose import Layout, choose_crops, distort, render, write_config
from device.meter.config import Roi, load_config

GROUP = Path("meter-digits/collected/powermeter/unknown/miboe")
LAYOUT = Layout()


@pytest.fixture(scope="module")
def reference(data_dir: Path) -> np.ndarray:
    """The clean composed meter face; the crops' labels do not matter to alignment."""
    return render(choose_crops(data_dir / GROUP, ["0.0", "3.0", "5.0", "8.0"]), LAYOUT, seed=1)


def aligner(folder: Path, reference: np.ndarray, models: Path, marks: int = 4,
            min_marks: int | None = None) -> tuple[Aligner, tuple[Roi, ...]]:
    """An aligner with the first `marks` marks cut from `reference` (as `meter mark` would), and the digit ROIs."""
    config = load_config(write_config(folder, reference, LAYOUT, 4, models / "meter-digits", marks=marks))
    alignment = config.alignment if min_marks is None else replace(config.alignment, min_marks=min_marks)
    return Aligner(alignment), config.digits


def misplace(frame: np.ndarray, index: int, dx: int, dy: int) -> np.ndarray:
    """Mark `index` (0-based) moved by (dx, dy) px; its old spot shows the plate 100 px towards the centre."""
    x, y = LAYOUT.marks[index]
    s = LAYOUT.mark_size
    side = 100 if x < LAYOUT.size[0] / 2 else -100
    out = frame.copy()
    out[y:y + s, x:x + s] = frame[y:y + s, x + side:x + side + s]
    out[y + dy:y + dy + s, x + dx:x + dx + s] = frame[y:y + s, x:x + s]
    return out


def view(frame: np.ndarray, linear: np.ndarray, shift: tuple[float, float] = (12, -8)) -> tuple[np.ndarray, np.ndarray]:
    """The frame seen through `linear` (2x2, about the centre) and `shift`; returns it and the true 3x3 matrix."""
    h, w = frame.shape[:2]
    centre = np.array([w / 2, h / 2])
    matrix = np.vstack([np.column_stack([linear, centre - linear @ centre + shift]), [0, 0, 1]])
    return cv2.warpAffine(frame, matrix[:2], (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT), matrix


def rotation(degrees: float) -> np.ndarray:
    a = np.radians(degrees)
    return np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])


def roi_error(matrix: np.ndarray, truth: np.ndarray, rois: tuple[Roi, ...]) -> float:
    """The largest distance (px, per axis) between ROI corners mapped by `matrix` and by the true transform."""
    corners = np.array([[[r.x + dx, r.y + dy]] for r in rois for dx in (0, r.w) for dy in (0, r.h)], np.float64)
    return float(np.abs(cv2.perspectiveTransform(corners, matrix) - cv2.perspectiveTransform(corners, truth)).max())


def absorbed(alignment: Alignment) -> np.ndarray:
    """The transform through every mark (affine for 3, homography for 4): alignment before marks were cross-checked."""
    ref = np.float32([m.expected for m in alignment.matches])
    found = np.float32([m.found for m in alignment.matches])
    if len(ref) == 3:
        return np.vstack([cv2.getAffineTransform(ref, found), [0, 0, 1]])
    return cv2.findHomography(ref, found, 0)[0]


@pytest.mark.parametrize("index,dx,dy", [(0, 30, 0), (1, -30, 0), (2, 21, -21), (3, 0, -30)])
def test_a_mark_found_at_the_wrong_place_is_dropped(tmp_path: Path, reference, models_dir, index, dx, dy) -> None:
    """Four marks, one matched 30 px off as well as the others: the other three agree, so it is dropped and named.

    The frame is also rotated and shifted (known matrix), so the ROIs can be checked against the
    truth; a fit through all four marks (the alignment before this check) put them 7-17 px off.
    """
    align, rois = aligner(tmp_path, reference, models_dir)
    frame, truth = view(misplace(reference, index, dx, dy), rotation(1.5))
    result = align.align(frame)
    assert result.matches[index].score > 0.9  # the misplaced mark matches as well as the others
    assert roi_error(absorbed(result), truth, rois) > 5.0  # where a fit through all four marks puts the ROIs
    assert result.ok, result.reason
    assert result.dropped == (index,) and result.used == tuple(i for i in range(4) if i != index)
    assert result.residuals[index] == pytest.approx(30.0, abs=1.5)
    assert all(result.residuals[i] < 1.0 for i in result.used)
    assert result.summary()["dropped"] == f"mark{index + 1}.png ({result.residuals[index]:.1f} px off)"
    assert roi_error(result.matrix, truth, rois) < 1.0


@pytest.mark.parametrize("min_marks", [3, None])
def test_three_marks_with_one_misplaced_are_refused(tmp_path: Path, reference, models_dir, min_marks) -> None:
    """Three marks, one 30 px off: refused, with or without min_marks = 3.

    Any two marks fit a similarity exactly, so each of the three is "off" as seen from the other two
    and no mark can be blamed; dropping one would be a guess (with the default min_marks, 2, the
    guess could keep the wrong mark), while an affine map through all three puts the ROIs 12-17 px off.
    """
    align, rois = aligner(tmp_path, reference, models_dir, marks=3, min_marks=min_marks)
    frame, truth = view(misplace(reference, 2, 30, 0), rotation(1.5))
    result = align.align(frame)
    assert roi_error(absorbed(result), truth, rois) > 10.0
    assert not result.ok and result.matrix is None and result.dropped == ()
    assert result.reason.startswith("reference marks disagree: ") and "mark3.png" in result.reason
    assert re.search(r"mark3\.png \d+\.\d px \(tolerance \d+\.\d\)", result.reason), result.reason
    assert ("no 3 of them agree (min_marks 3)" if min_marks == 3 else "which one cannot be told") in result.reason
    with pytest.raises(AlignmentError, match="reference marks disagree"):
        Aligner.crop(frame, result, rois[0])


def test_distorted_frames_align_with_every_mark(tmp_path: Path, reference, models_dir) -> None:
    """Shift, rotation, random perspective and uneven light (the reader's test frames) drop no mark.

    Also with three marks, and with four marks of which one is covered by a reflection: then the
    lost mark is not found (score) rather than dropped, and the other three must still agree.
    """
    four, _ = aligner(tmp_path / "four", reference, models_dir)
    three, _ = aligner(tmp_path / "three", reference, models_dir, marks=3)
    for seed in range(8):
        frame = distort(reference, seed=seed)
        for align, marks in ((four, 4), (three, 3)):
            result = align.align(frame)
            assert result.ok and result.dropped == () and len(result.used) == marks, (seed, result.summary())
            assert all(math.isfinite(r) for r in result.residuals) and result.summary()["dropped"] == ""
        x, y = LAYOUT.marks[seed % 4]
        covered = cv2.ellipse(frame.copy(), (x + 20, y + 20), (45, 35), 20, 0, 360, (255, 255, 255), -1)
        result = four.align(covered)
        assert result.ok and result.dropped == () and seed % 4 not in result.used, (seed, result.summary())


def test_a_sheared_view_is_refused(tmp_path: Path, reference, models_dir) -> None:
    """A view sheared beyond MAX_ANISOTROPY is refused, and says so; a slight shear aligns exactly.

    Sheared by 0.12 every mark is still found (score > 0.6, within the search window), but no camera
    on a holder sees a meter like that; the marks then also disagree with each other's similarity.
    """
    align, rois = aligner(tmp_path, reference, models_dir)
    frame, _ = view(reference, rotation(1.0) @ np.array([[1.0, 0.12], [0.0, 1.0]]))
    result = align.align(frame)
    assert all(m.score > 0.6 for m in result.matches)
    assert not result.ok and result.matrix is None
    assert "frame sheared or stretched 1.1" in result.reason and f"(more than {MAX_ANISOTROPY})" in result.reason
    slight, truth = view(reference, rotation(1.0) @ np.array([[1.0, 0.03], [0.0, 1.0]]))
    result = align.align(slight)
    assert result.ok and result.dropped == (), result.reason
    assert roi_error(result.matrix, truth, rois) < 1.0


def test_a_view_in_strong_perspective_is_refused(tmp_path: Path, reference, models_dir) -> None:
    """The top and left edges about 40 px shorter (a camera tilted towards the top-left): refused.

    The marks refuse it first (they disagree beyond what a view within the bounds explains); the
    perspective bound itself is checked on the true matrix, whose local scale is measured here
    independently, from the area of a small square mapped at each frame corner and at the centre.
    """
    align, _ = aligner(tmp_path, reference, models_dir)
    h, w = reference.shape[:2]
    corners = np.float32([[0, 0], [w, 0], [w, h], [0, h]])
    keystone = cv2.getPerspectiveTransform(corners, corners + np.float32([[20, 20], [-20, 0], [0, 0], [0, -20]]))
    result = align.align(cv2.warpPerspective(reference, keystone, (w, h), borderMode=cv2.BORDER_REFLECT))
    assert not result.ok and result.matrix is None and result.reason.startswith("reference marks disagree")

    def local_scale(x: float, y: float) -> float:
        square = np.array([[[x, y]], [[x + 1, y]], [[x + 1, y + 1]], [[x, y + 1]]], np.float64)
        return math.sqrt(cv2.contourArea(cv2.perspectiveTransform(square, keystone).astype(np.float32)))

    centre = local_scale(w / 2, h / 2)
    expected = max(abs(local_scale(x, y) / centre - 1) for x, y in ((0, 0), (w, 0), (0, h), (w, h)))
    perspective = _shape(keystone, w, h)[3]
    assert perspective == pytest.approx(expected, abs=0.005) and perspective > MAX_PERSPECTIVE
    assert align._implausible(*_shape(keystone, w, h)).startswith("frame in perspective: the scale at a corner")
