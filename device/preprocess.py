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


# Images at MNIST scale (28x28, or anything up to this size) are framed exactly as MNIST itself is: no blur, no
# sheet detection, the peak from a percentile. Larger photos get the resolution-independent steps below.
_SMALL = 56
# A stroke that the reader can make out has at least this many pixels at full ink strength, at any resolution.
_PEAK_PIXELS = 50
# Photos are shrunk to at most this many pixels on their long side before they are framed.
_LARGEST = 2048


def _ink_peak(ink: np.ndarray) -> float:
    """How bright the strokes are (the level that the contrast stretch maps to 255), robust to noise.

    The 99.5th percentile ignores the brightest 0.5% of pixels as noise, which works for digits that fill a good
    part of the picture (MNIST: ~19%) but not for an ordinary photo where the digit covers less than 0.5% of the
    page: there the percentile lands in the paper's noise and the digit was refused as blank. So for photos the
    peak is also the level that the `_PEAK_PIXELS` brightest stroke cores reach: a count of pixels, not a share of
    the image, taken after a 3x3 erosion (each pixel's darkest neighbour), which a stroke 3 px wide or more keeps
    at full strength but sensor noise, dust specks and salt-and-pepper pixels do not survive.
    """
    if min(ink.shape) <= _SMALL:
        return float(np.percentile(ink, 99.5)) if ink.size > 400 else float(ink.max())
    cores = cv2.erode(ink, np.ones((3, 3), np.uint8))
    return max(_kth_largest(ink, int(np.ceil(0.005 * ink.size))), _kth_largest(cores, _PEAK_PIXELS))


def _kth_largest(values: np.ndarray, k: int) -> float:
    """The k-th largest of non-negative values, to a quarter grey level, from a histogram: a sort-based
    partition of a 12 MP photo took ~30 ms, and the peak is needed three times per photo."""
    counts = np.bincount((values.ravel().astype(np.float64) * 4).astype(np.int64))  # uint8 * 4 would wrap
    from_top = np.cumsum(counts[::-1])
    return (len(counts) - 1 - int(np.searchsorted(from_top, k))) / 4


def _sheet(gray: np.ndarray) -> np.ndarray | None:
    """A light sheet of paper lying on a darker surface → the sheet alone, with the surface painted over.

    Polarity is read from the image border, so a photo whose border is a dark desk around the paper would take
    the whole sheet for ink. A sheet is recognised as the largest light region when it is large (≥ 20% of the
    picture), solid (its outline nearly convex) and mostly paper (the writing on it, its holes, is a small part
    of it): a light digit on a dark board is none of these (a stroke covers ≤ ~12% of a frame it spans; a filled
    "0" is mostly hole). Returns the sheet's bounding box with everything outside the sheet set to the paper's
    median grey, or None when there is no such sheet.
    """
    height, width = gray.shape
    g8 = np.clip(gray, 0, 255).astype(np.uint8)
    k = max(3, (min(height, width) // 100) | 1)
    _, bright = cv2.threshold(cv2.GaussianBlur(g8, (k, k), 0), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(bright, connectivity=8)
    if count <= 1:
        return None
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    area = int(stats[largest, cv2.CC_STAT_AREA])
    if area < 0.2 * height * width:
        return None
    paper = (labels == largest).astype(np.uint8)
    contours, _ = cv2.findContours(paper, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    outline = max(contours, key=cv2.contourArea)
    filled = np.zeros_like(paper)
    cv2.drawContours(filled, [outline], -1, 1, thickness=cv2.FILLED)
    filled_area = int(filled.sum())
    hull_area = float(cv2.contourArea(cv2.convexHull(outline)))
    if area < 0.75 * filled_area or filled_area < 0.85 * hull_area:
        return None
    # A sheet is a quadrilateral (a trapezoid when photographed at a slant), which a light digit on a dark board
    # is not: a bold "8" of 55 px strokes was taken for a sheet and read from its holes. Its outline must reduce
    # to four corners that it fills, or else fill most of its rotated bounding box.
    corners = cv2.approxPolyDP(outline, 0.02 * cv2.arcLength(outline, True), True)
    quadrilateral = len(corners) == 4 and filled_area >= 0.9 * cv2.contourArea(corners)
    (_, _), (box_w, box_h), _ = cv2.minAreaRect(outline)
    if not quadrilateral and filled_area < 0.85 * box_w * box_h:
        return None
    surround = filled == 0
    if _border(surround).mean() < 0.5:  # most of the border is paper already: the usual framing copes
        return None
    paper_level = float(np.median(gray[paper > 0]))
    if float(np.median(gray[surround])) > paper_level - 30.0:  # not clearly darker: paper texture or shading
        return None
    # The sheet's edge is a blurred ramp from paper to desk that would read as a frame of ink: stay clear of it.
    margin = max(2, min(height, width) // 200) * 2 + k
    inside = cv2.erode(filled, cv2.getStructuringElement(cv2.MORPH_RECT, (2 * margin + 1, 2 * margin + 1)))
    if not inside.any():
        return None
    sheet = np.where(inside > 0, gray, np.float32(paper_level))
    ys, xs = np.nonzero(inside)
    return sheet[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]


def _border(gray: np.ndarray) -> np.ndarray:
    return np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])


def _at_most(gray: np.ndarray, largest: int) -> np.ndarray:
    """A photo larger than `largest` pixels on its long side, shrunk to it (area-averaged): a 12 MP frame holds no
    more of a digit than 28x28 needs, and every later step is linear in the pixel count."""
    scale = largest / max(gray.shape)
    if scale >= 1:
        return gray
    size = (max(1, round(gray.shape[1] * scale)), max(1, round(gray.shape[0] * scale)))
    return cv2.resize(gray, size, interpolation=cv2.INTER_AREA)


def _dark_ink(gray: np.ndarray, background: float) -> bool:
    """Is the writing darker than the background (the border's level)? Decided by which side of the background
    reaches further: comparing the border with the image's mean, as MNIST-size images are, fails once the digit
    covers a small part of a photo, because the mean then differs from the paper by less than its texture does."""
    darker = _ink_peak(np.clip(background - gray, 0, None))
    lighter = _ink_peak(np.clip(gray - background, 0, None))
    return darker > lighter


def _flat_field(gray: np.ndarray) -> np.ndarray:
    """Even out the lighting: subtract the plane fitted to the border's grey levels, keeping their mean level.

    A photo's light falls off across the page by tens of grey levels, more than the contrast a blank page is
    allowed; measured against one border level, the darker side of a blank page would pass for ink. The border is
    the paper (the assumption the polarity and background steps already make); a plane fitted to it cannot bend
    towards a digit in the middle, and each pass leaves out border pixels far from it (writing that touches it).
    """
    height, width = gray.shape
    xs = np.linspace(-1.0, 1.0, width)
    ys = np.linspace(-1.0, 1.0, height)
    x = np.concatenate([xs, xs, np.full(height, -1.0), np.full(height, 1.0)])
    y = np.concatenate([np.full(width, -1.0), np.full(width, 1.0), ys, ys])
    terms = np.stack([np.ones_like(x), x, y], axis=-1)
    values = _border(gray).astype(np.float64)
    fit = np.ones(values.size, bool)
    for _ in range(4):
        coef, *_ = np.linalg.lstsq(terms[fit], values[fit], rcond=None)
        residual = values - terms @ coef
        spread = 1.4826 * float(np.median(np.abs(residual[fit]))) + 1.0
        fit = np.abs(residual) < 3.0 * spread
    c = coef.astype(np.float32)
    plane = c[1] * xs.astype(np.float32)[np.newaxis, :] + c[2] * ys.astype(np.float32)[:, np.newaxis]
    return gray - plane


def mnist_style(image: np.ndarray) -> np.ndarray:
    """Any digit photo or scan → a 28x28 uint8 image framed the way MNIST was made.

    MNIST digits are light strokes on black, size-normalised to fit a 20x20 box (aspect kept) and
    placed in 28x28 so that their centre of mass is at the centre. A model trained on MNIST only
    reads other images well when they are brought to that exact framing, so we repeat it:
    grey → polarity from the border → contrast stretch → ink bounding box → fit 20x20 → centre of mass.
    Images of MNIST size (≤ 56 px) take exactly those steps, so MNIST itself is framed bit for bit as it always
    was. Larger photos are first shrunk to ≤ 2048 px, cropped to the sheet when it lies on a darker desk
    (`_sheet`), and evened out for lighting (`_flat_field`); their polarity is the side of the border's level
    that reaches further (`_dark_ink`), their peak is resolution-independent (`_ink_peak`), and their strokes
    must stand out of the paper's own noise and texture by a margin (`floor`).
    """
    gray = to_gray(check_image(image)).astype(np.float32)
    floor = 30.0  # the least contrast that counts as a stroke
    if min(gray.shape) <= _SMALL:  # MNIST scale: framed exactly as MNIST was
        border = _border(gray)
        dark_ink = np.median(border) > gray.mean()  # background brighter than average: dark ink on light paper
    else:
        gray = _at_most(gray, _LARGEST)
        sheet = _sheet(gray)
        if sheet is not None:
            gray = sheet
        gray = _flat_field(gray)
        border = _border(gray)
        dark_ink = _dark_ink(gray, float(np.median(border)))
        # Texture and noise on the paper are not ink: the strokes must stand well out of the paper's own spread.
        sample = gray[:: max(1, gray.shape[0] // 256), :: max(1, gray.shape[1] // 256)]
        floor = max(floor, 5.0 * 1.4826 * float(np.median(np.abs(sample - np.median(sample)))))
    height, width = gray.shape
    if dark_ink:
        gray = 255.0 - gray
        border = 255.0 - border
    background = float(np.median(border))
    ink = np.clip(gray - background, 0, None)
    peak = _ink_peak(ink)
    if peak < floor:
        raise NoDigitError("no digit found: the image is blank or has almost no contrast (or an uneven background, "
                           "such as a hard shadow or the page's edge in view, hides it: crop the photo to the digit)")
    ink = np.clip(ink * (255.0 / peak), 0, 255).astype(np.uint8)

    # Strokes are what Otsu separates from the background; drop specks far smaller than the digit.
    smooth = cv2.GaussianBlur(ink, (3, 3), 0) if min(height, width) > _SMALL else ink
    level, mask = cv2.threshold(smooth, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    if min(height, width) > _SMALL and level < 255.0 * floor / peak:
        # A small digit on a large page: Otsu's split of a histogram that is nearly all paper can fall inside the
        # paper's texture. Ink is what stands out of it by the same margin as the blank test asks for.
        _, mask = cv2.threshold(smooth, min(254.0, 255.0 * floor / peak), 255, cv2.THRESH_BINARY)
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
