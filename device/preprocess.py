"""Preprocessing, defined once: training, the converter's calibration and the device all call these.

A spec (a small dict, stored in each bundle's manifest) says how pixels become model input:
`x = pixels * scale + offset`, at a given size and channel count. Keeping the spec in the
manifest means a device reads how its model was trained instead of assuming it.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from device.images import ImageError, check_image, to_gray

# MNIST: 28x28 grey, white digit on black, scaled to [0, 1].
MNIST_SPEC: dict[str, Any] = {
    "kind": "mnist-digit",
    "size": [28, 28],
    "channels": 1,
    "scale": 1.0 / 255.0,
    "offset": 0.0,
    "polarity": "light digit on dark background",
}


def normalize(pixels: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    """uint8 pixels → float32 model input, per the spec. Adds the channel axis for grey input."""
    x = pixels.astype(np.float32) * np.float32(spec["scale"]) + np.float32(spec["offset"])
    if spec["channels"] == 1 and x.shape[-1] != 1:
        x = x[..., np.newaxis]
    return x


class NoDigitError(ImageError):
    """The image has no distinguishable strokes (blank, flat, or all noise)."""


def mnist_style(image: np.ndarray) -> np.ndarray:
    """Any digit photo or scan → a 28x28 uint8 image framed the way MNIST was made.

    MNIST digits are light strokes on black, size-normalised to fit a 20x20 box (aspect kept) and
    placed in 28x28 so that their centre of mass is at the centre. A model trained on MNIST only
    reads other images well when they are brought to that exact framing, so we repeat it:
    grey → polarity from the border → contrast stretch → ink bounding box → fit 20x20 → centre of mass.
    """
    gray = to_gray(check_image(image)).astype(np.float32)
    height, width = gray.shape
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    if np.median(border) > gray.mean():  # background brighter than average: dark ink on light paper
        gray = 255.0 - gray
        border = 255.0 - border
    background = float(np.median(border))
    ink = np.clip(gray - background, 0, None)
    peak = float(np.percentile(ink, 99.5)) if ink.size > 400 else float(ink.max())
    if peak < 30.0:
        raise NoDigitError("no digit found: the image is blank or has almost no contrast")
    ink = np.clip(ink * (255.0 / peak), 0, 255).astype(np.uint8)

    # Strokes are what Otsu separates from the background; drop specks far smaller than the digit.
    smooth = cv2.GaussianBlur(ink, (3, 3), 0) if min(height, width) > 56 else ink
    _, mask = cv2.threshold(smooth, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    count, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if count <= 1:
        raise NoDigitError("no digit found: no strokes separate from the background")
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = [i + 1 for i, a in enumerate(areas) if a >= max(2, 0.05 * areas.max())]
    x0 = min(stats[i, cv2.CC_STAT_LEFT] for i in keep)
    y0 = min(stats[i, cv2.CC_STAT_TOP] for i in keep)
    x1 = max(stats[i, cv2.CC_STAT_LEFT] + stats[i, cv2.CC_STAT_WIDTH] for i in keep)
    y1 = max(stats[i, cv2.CC_STAT_TOP] + stats[i, cv2.CC_STAT_HEIGHT] for i in keep)
    crop = ink[y0:y1, x0:x1]

    scale = 20.0 / max(crop.shape)
    new_w, new_h = max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    digit = cv2.resize(crop, (new_w, new_h), interpolation=interpolation)

    canvas = np.zeros((28, 28), np.float32)
    top, left = (28 - new_h) // 2, (28 - new_w) // 2
    canvas[top : top + new_h, left : left + new_w] = digit
    moments = cv2.moments(canvas)
    if moments["m00"] > 0:
        shift_x = 14.0 - moments["m10"] / moments["m00"]
        shift_y = 14.0 - moments["m01"] / moments["m00"]
        shift = np.float32([[1, 0, shift_x], [0, 1, shift_y]])
        canvas = cv2.warpAffine(canvas, shift, (28, 28), flags=cv2.INTER_LINEAR, borderValue=0)
    return np.clip(canvas, 0, 255).astype(np.uint8)
