"""`meter preview`: the crops and an annotated frame, so a user can see whether a config fits the meter.

Setting up a meter reader is mostly drawing rectangles; seeing where the marks were searched and
found and what each ROI cuts out catches a wrong coordinate in seconds, before the service runs.
Works without a model too (then the wheels are not read), so ROIs can be drawn before a bundle exists.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from device.meter.align import Aligner, Alignment
from device.meter.config import Roi
from device.meter.reader import MeterReading

_GREEN, _RED, _YELLOW, _BLUE = (60, 200, 60), (40, 40, 230), (0, 220, 255), (255, 140, 0)


def _text(image: np.ndarray, text: str, at: tuple[int, int], color: tuple[int, int, int], scale: float = 0.45) -> None:
    x, y = at
    cv2.putText(image, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(image, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, color, 1, cv2.LINE_AA)


def annotate(frame: np.ndarray, alignment: Alignment, rois: list[Roi], reading: MeterReading | None,
             min_score: float) -> np.ndarray:
    """The frame with search windows (yellow), found marks (green; red if too weak or dropped because the other
    marks put it elsewhere) and mapped ROIs (blue)."""
    image = frame.copy() if frame.ndim == 3 else cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
    for i, match in enumerate(alignment.matches):
        x, y, w, h = match.window
        cv2.rectangle(image, (x, y), (x + w, y + h), _YELLOW, 1)
        tw, th = match.size
        fx, fy = match.found
        dropped = i in alignment.dropped
        color = _GREEN if match.score >= min_score and not dropped else _RED
        cv2.rectangle(image, (int(fx - tw / 2), int(fy - th / 2)), (int(fx + tw / 2), int(fy + th / 2)), color, 2)
        label = f"{match.name} {match.score:.2f}" + (f" dropped, {alignment.residuals[i]:.0f} px off" if dropped else "")
        _text(image, label, (x, max(12, y - 4)), color)
    if alignment.matrix is not None:
        for i, roi in enumerate(rois):
            corners = np.array([[[roi.x, roi.y]], [[roi.x + roi.w, roi.y]], [[roi.x + roi.w, roi.y + roi.h]],
                                [[roi.x, roi.y + roi.h]]], dtype=np.float64)
            mapped = cv2.perspectiveTransform(corners, alignment.matrix).astype(np.int32)
            cv2.polylines(image, [mapped], True, _BLUE, 2)
            label = roi.name or f"#{i + 1}"
            if reading is not None and i < len(reading.wheels):
                label = f"{reading.wheels[i].value % 10:.1f}"
            bottom = mapped.reshape(-1, 2)
            _text(image, label, (int(bottom[:, 0].min()), int(bottom[:, 1].max()) + 14), _BLUE, 0.4)
    if reading is not None and reading.value is not None:
        headline = f"reading {reading.text}  (alignment {alignment.quality:.2f})"
    elif reading is not None and reading.error:
        headline = reading.error
    else:
        headline = "alignment OK (no model: wheels not read)" if alignment.ok else f"REFUSED: {alignment.reason}"
    _text(image, headline[:110], (6, image.shape[0] - 8), _GREEN if alignment.ok else _RED, 0.5)
    return image


def write_preview(frame: np.ndarray, aligner: Aligner, rois: list[Roi], out: Path,
                  reading: MeterReading | None = None) -> tuple[Alignment, list[Path]]:
    """Write preview.png, the ROI crops and the found reference marks into `out`; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    alignment = reading.alignment if reading is not None else aligner.align(frame)
    files = []
    for i, match in enumerate(alignment.matches):
        tw, th = match.size
        x, y = int(round(match.found[0] - tw / 2)), int(round(match.found[1] - th / 2))
        crop = frame[max(y, 0):y + th, max(x, 0):x + tw]
        if crop.size:
            files.append(out / f"mark_{i + 1}_found.png")
            cv2.imwrite(str(files[-1]), crop)
        files.append(out / f"mark_{i + 1}_reference.png")
        cv2.imwrite(str(files[-1]), aligner.templates[i])
    if alignment.matrix is not None:
        for i, roi in enumerate(rois):
            files.append(out / f"roi_{i + 1:02d}.png")
            cv2.imwrite(str(files[-1]), Aligner.crop(frame, alignment, roi))
    files.append(out / "preview.png")
    cv2.imwrite(str(files[-1]), annotate(frame, alignment, rois, reading, aligner.config.min_score))
    return alignment, files

