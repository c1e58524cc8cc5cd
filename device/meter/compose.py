"""Composed meter frames: real digit-wheel crops on a counter band, with reference marks, then moved.

There is no recorded video of a whole meter with known readings in the data set, only crops of
single digit windows with their wheel positions. A frame is therefore *composed*: crops of one
physical meter, chosen by their labelled position, are pasted side by side onto a counter band on
a textured plate with four reference marks; the frame is then shifted, rotated, put in perspective
and lit unevenly like a camera on a holder would see it. The reader's tests and the benchmark use
these frames; `write_config` writes the matching meter config (marks cut from the clean frame, as a
user would cut them) so the whole reader runs exactly as in the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from device.images import load_image
from device.meter.config import Roi


@dataclass(frozen=True)
class Layout:
    """Geometry of a composed meter face, in reference-frame pixels."""

    size: tuple[int, int] = (640, 480)  # width, height
    band: tuple[int, int] = (130, 200)  # top-left of the first digit window
    cell: tuple[int, int] = (40, 64)  # digit window width, height
    gap: int = 8
    mark_size: int = 40
    marks: tuple[tuple[int, int], ...] = ((40, 40), (560, 40), (40, 400), (560, 400))

    def rois(self, wheels: int) -> list[Roi]:
        w, h = self.cell
        return [Roi(self.band[0] + i * (w + self.gap), self.band[1], w, h, f"d{i + 1}") for i in range(wheels)]


def mark_patch(index: int, size: int) -> np.ndarray:
    """A distinct, textured reference mark (ring, bar and an index-dependent notch), grey uint8."""
    patch = np.full((size, size), 235, np.uint8)
    c = size // 2
    cv2.circle(patch, (c, c), int(size * 0.42), 20, -1)
    cv2.circle(patch, (c, c), int(size * 0.22), 235, -1)
    angle = index * np.pi / 2 + np.pi / 5
    end = (int(c + np.cos(angle) * size * 0.45), int(c + np.sin(angle) * size * 0.45))
    cv2.line(patch, (c, c), end, 20, max(2, size // 10))
    cv2.rectangle(patch, (0, 0), (size - 1, size - 1), 90, 1)
    return patch


def render(crops: list[np.ndarray], layout: Layout = Layout(), seed: int = 0) -> np.ndarray:
    """The clean reference frame (BGR) with `crops` (BGR, any size) in the digit windows, left to right."""
    rng = np.random.default_rng(seed)
    width, height = layout.size
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    plate = 150 + 40 * (xx / width) + 20 * (yy / height) + rng.normal(0, 6, (height, width))
    frame = np.repeat(np.clip(plate, 0, 255).astype(np.uint8)[:, :, None], 3, axis=2)
    frame[:, :, 0] = np.clip(frame[:, :, 0].astype(np.int16) + 12, 0, 255).astype(np.uint8)  # a bluish plate
    for i, (x, y) in enumerate(layout.marks):
        frame[y:y + layout.mark_size, x:x + layout.mark_size] = mark_patch(i, layout.mark_size)[:, :, None]
    rois = layout.rois(len(crops))
    x0, y0 = rois[0].x - layout.gap, rois[0].y - layout.gap
    x1, y1 = rois[-1].x + rois[-1].w + layout.gap, rois[-1].y + rois[-1].h + layout.gap
    cv2.rectangle(frame, (x0, y0), (x1, y1), (30, 30, 30), -1)
    for roi, crop in zip(rois, crops):
        frame[roi.y:roi.y + roi.h, roi.x:roi.x + roi.w] = cv2.resize(crop, (roi.w, roi.h),
                                                                      interpolation=cv2.INTER_LINEAR)
    cv2.putText(frame, "kWh", (x1 + 10, y1 - 12), cv2.FONT_HERSHEY_SIMPLEX, 0.8, (30, 30, 30), 2)
    return frame


def distort(frame: np.ndarray, seed: int, shift: float = 20, corners: float = 8, rotation_deg: float = 2,
            light: tuple[float, float] = (0.6, 1.25), noise: float = 4.0) -> np.ndarray:
    """The frame as a moved camera sees it: shift, rotation, perspective, a light gradient, noise, blur."""
    rng = np.random.default_rng(seed)
    h, w = frame.shape[:2]
    src = np.float32([[0, 0], [w, 0], [w, h], [0, h]])
    centre = np.float32([w / 2, h / 2])
    angle = np.radians(rng.uniform(-rotation_deg, rotation_deg))
    rot = np.float32([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    dst = (src - centre) @ rot.T + centre + rng.uniform(-shift, shift, 2) + rng.uniform(-corners, corners, (4, 2))
    homography = cv2.getPerspectiveTransform(src, dst.astype(np.float32))
    moved = cv2.warpPerspective(frame, homography, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    direction = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(direction) * xx / w + np.sin(direction) * yy / h + 1) / 2
    gain = light[0] + (light[1] - light[0]) * ramp
    lit = moved.astype(np.float32) * gain[:, :, None] + rng.normal(0, noise, moved.shape)
    return cv2.GaussianBlur(np.clip(lit, 0, 255).astype(np.uint8), (3, 3), 0.6)


def write_config(folder: Path, reference: np.ndarray, layout: Layout, wheels: int, bundle: Path,
                 meter: str = "", extra: str = "", marks: int = 4) -> Path:
    """Cut the reference marks from the clean frame and write `meter.toml` for the composed meter.

    `meter` holds extra lines for the [meter] table (e.g. "decimals = 2"), `extra` whole tables.
    """
    folder.mkdir(parents=True, exist_ok=True)
    lines = ['[meter]', 'name = "composed"', 'unit = "kWh"', 'device_class = "energy"', meter, "",
             "[model]", f"bundle = {str(bundle)!r}", "", "[alignment]", "search_px = 50", "min_score = 0.6", ""]
    for i, (x, y) in enumerate(layout.marks[:marks]):
        name = f"mark{i + 1}.png"
        cv2.imwrite(str(folder / name), reference[y:y + layout.mark_size, x:x + layout.mark_size])
        lines += ["[[alignment.marks]]", f'image = "{name}"', f"x = {x}", f"y = {y}", ""]
    for roi in layout.rois(wheels):
        lines += ["[[digits]]", f'name = "{roi.name}"', f"x = {roi.x}", f"y = {roi.y}", f"w = {roi.w}",
                  f"h = {roi.h}", ""]
    path = folder / "meter.toml"
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def crops_by_label(group: Path) -> dict[str, list[Path]]:
    """A meter group's crop files by label (the file name before the first '_'), names sorted."""
    out: dict[str, list[Path]] = {}
    for path in sorted(group.glob("*.jpg")):
        out.setdefault(path.name.split("_", 1)[0], []).append(path)
    return out


def choose_crops(group: Path, labels: list[str], accept: Callable[[np.ndarray, str], bool] | None = None
                 ) -> list[np.ndarray]:
    """One crop per label from a meter group: the first (by name) that `accept` takes, or simply the first."""
    by_label = crops_by_label(group)
    chosen = []
    for label in labels:
        for path in by_label.get(label, []):
            image = load_image(path)
            if accept is None or accept(image, label):
                chosen.append(image)
                break
        else:
            raise LookupError(f"{group}: no usable crop labelled {label}")
    return chosen
