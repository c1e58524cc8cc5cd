"""The digit-wheel model of a utility meter: one crop per wheel in, wheel position out.

A meter's counter wheels do not jump from digit to digit: between two readings a wheel can stand
anywhere, e.g. 70% of the way from 7 to 8. The model therefore predicts the wheel *position* in
tenths of a digit (100 classes, 0.0 … 9.9, on a circle: 9.9 is next to 0.0), not only a digit. The
reader (alignment, assembly, post-processing) turns positions of several wheels into one reading.

Preprocessing is defined here, once: `METER_SPEC` and `crop_to_input` are imported by training and
by the converter, and the spec travels in each bundle's manifest so a device reads how the model
was trained.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np

from device.bundle import Bundle, BundleError
from device.images import ImageError, check_image
from device.preprocess import normalize
from device.runtime import Model, ModelError
from device.timing import time_ms

TASK = "meter-digit-position"
Stretch = bool | Literal["auto"]  # contrast stretch before the model: always, never, or for dim frames
CLASSES = 100  # wheel positions in tenths of a digit: class k is position k / 10
# Crops are portrait windows (a digit is about 1.6x as tall as wide); 20x32 keeps that aspect, is
# what the reference system's digit models take, and is at or below the size of the smallest
# crops in the data set, so no crop is upscaled much.
METER_SPEC: dict[str, Any] = {
    "kind": "meter-digit-wheel",
    "size": [32, 20],  # height, width
    "channels": 3,
    "color": "RGB",
    "resize": "cv2.INTER_AREA (shrinking) / INTER_LINEAR (enlarging), aspect not kept",
    "scale": 1.0 / 255.0,
    "offset": 0.0,
    "input": "crop of one digit window, the whole window, BGR uint8 as OpenCV loads it",
}
# A wheel within this many digits of a whole position shows that digit clearly; further away it
# is "rolling" (two digits partly visible). 0.15 is half-way between the 0.1 and 0.2 steps.
ROLLING_MARGIN = 0.15
# Test-time views of each crop, (dx, dy) in model-input pixels: the softmax is averaged over the crop and the crop
# shifted by one input pixel each way. A meter is read about once a minute, so 5 inferences per wheel cost nothing
# that matters; chosen on the validation meters by a rule fixed before (training/DECISIONS.md, session 6). The
# bundle names its views ("inference"); an older bundle without them runs one view.
TTA_VIEWS: tuple[tuple[int, int], ...] = ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1))
SINGLE_VIEW: tuple[tuple[int, int], ...] = ((0, 0),)
MAX_VIEW_SHIFT = 3  # input pixels: beyond this a view loses the digit (training shifts crops by about ±1.5)
# `stretch = "auto"` stretches a frame's wheels when even its clearest wheel has less contrast than this (luma p5..p95
# at the model's input size, `wheel_contrast`). Chosen from the training and validation meters only, by a rule fixed
# before the test meters were read (training/DECISIONS.md, session 10): half-way between the clearest wheel of frames
# of the validation meters re-rendered grey-on-dark-red (at most 27) and of frames of 8 random wheels of the 21 real
# training and validation meters (at least 77). The clearest wheel, not the median, decides, so the blank positions
# of an LCD counter showing a short number do not switch it on.
AUTO_STRETCH_BELOW = 52.0


@dataclass(frozen=True)
class WheelReading:
    """What one wheel shows.

    `value` is the wheel position in [0, 10): 7.9 is 90% of the way from 7 to 8.
    `digit` is the whole digit shown: the nearest digit when the wheel stands on one (6.95 → 7),
    the digit it is leaving (round-down) while rolling (7.5 → 7); deciding whether a rolling wheel
    has already passed its digit needs the wheel to its right, which is the reader's job.
    `rolling` is True when the wheel is more than ROLLING_MARGIN away from a whole digit.
    `confidence` (0..1) is the probability the model puts within ±0.1 of its most likely position.
    """

    value: float
    digit: int
    rolling: bool
    confidence: float


def crop_to_input(crop: np.ndarray, spec: dict[str, Any] = METER_SPEC) -> np.ndarray:
    """One digit-window crop (BGR or grey uint8, any size) → float32 model input (H, W, 3).

    Raises ImageError for something that is not an image or is too small to hold a digit.
    """
    image = check_image(crop, "meter digit crop")
    if min(image.shape[:2]) < 4:
        raise ImageError(f"meter digit crop of {image.shape[1]}x{image.shape[0]} px is too small to hold a digit")
    height, width = spec["size"]
    rgb = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB if image.ndim == 2 else cv2.COLOR_BGR2RGB)
    shrinking = rgb.shape[0] > height or rgb.shape[1] > width
    resized = cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
    return normalize(resized, spec)


def crop_views(crop: np.ndarray, views: tuple[tuple[int, int], ...], spec: dict[str, Any] = METER_SPEC
               ) -> list[np.ndarray]:
    """The crop shifted by each (dx, dy) model-input pixels (w/20, h/32 crop pixels): a shift means the same on
    every crop size. Linear warp with the border replicated, as training's augmentation shifts crops."""
    image = check_image(crop, "meter digit crop")
    height, width = image.shape[:2]
    rows, cols = spec["size"]
    out = []
    for dx, dy in views:
        if dx == 0 and dy == 0:
            out.append(image)
            continue
        shift = np.float32([[1, 0, dx * width / cols], [0, 1, dy * height / rows]])
        out.append(cv2.warpAffine(image, shift, (width, height), flags=cv2.INTER_LINEAR,
                                  borderMode=cv2.BORDER_REPLICATE))
    return out


def stretch_contrast(crop: np.ndarray) -> np.ndarray:
    """Each channel's 2nd..98th percentile stretched to 0..255: the per-meter opt-in for low-contrast wheels.

    Grey digits on a dark red wheel (a test meter) read badly, and teaching the model such crops by re-colouring
    broke the blank LCD positions (training/DECISIONS.md). Applied at inference, only to a meter whose config asks
    for it, it lifts the validation "dim red" crops from 17% to 99% whole digits and costs ordinary wheel meters
    0.5 pp of ±0.2 (a rule fixed before the numbers, session 6). Never forced on for LCD counters: it would make a
    blank position's faint ghost segments look like a digit. "auto" (`AUTO_STRETCH_BELOW`) uses it only on frames
    dimmer than any of the training and validation meters'.
    """
    image = check_image(crop, "meter digit crop").astype(np.float32)
    low = np.percentile(image, 2, axis=(0, 1))
    high = np.percentile(image, 98, axis=(0, 1))
    return np.clip((image - low) * 255.0 / np.maximum(high - low, 1.0), 0, 255).astype(np.uint8)


def wheel_contrast(crop: np.ndarray, spec: dict[str, Any] = METER_SPEC) -> float:
    """Luma spread (5th..95th percentile, grey levels) of a crop shrunk (INTER_AREA) to the model's input size: a
    median of 90-170 per training or validation meter, 46 for the grey digits on dark red of test meter pp."""
    height, width = spec["size"]
    image = check_image(crop, "meter digit crop")
    small = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
    grey = cv2.cvtColor(small, cv2.COLOR_BGR2GRAY) if small.ndim == 3 else small
    low, high = np.percentile(grey, (5, 95))
    return float(high - low)


def view_inputs(crops: list[np.ndarray], views: tuple[tuple[int, int], ...], spec: dict[str, Any] = METER_SPEC
                ) -> np.ndarray:
    """Model inputs of every view of every crop, (len(crops) * len(views), H, W, 3), crop by crop."""
    return np.stack([crop_to_input(view, spec) for crop in crops for view in crop_views(crop, views, spec)])


def mean_over_views(outputs: np.ndarray, views: int) -> np.ndarray:
    """(N * views, 100) softmax rows of `view_inputs` → (N, 100), averaged over each crop's views."""
    return np.asarray(outputs, dtype=np.float32).reshape(-1, views, CLASSES).mean(axis=1)


def circular_distance(a: np.ndarray | float, b: np.ndarray | float) -> np.ndarray:
    """Distance between wheel positions on the 0..10 circle: 9.9 and 0.0 are 0.1 apart."""
    d = np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) % 10.0
    return np.minimum(d, 10.0 - d)


def decode(probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities (N, 100) → (positions in [0, 10), confidence).

    The position is the probability-weighted mean of the ±0.2 window around the most likely class,
    taken around the circle (9.9 and 0.0 are neighbours): finer than one class when the model hesitates between neighbours, and immune to
    a second, distant mode. Confidence is the mass within ±0.1 of the most likely class.
    """
    p = np.asarray(probabilities, dtype=np.float64).reshape(-1, CLASSES)
    best = p.argmax(axis=1)
    offsets = np.arange(-2, 3)
    idx = (best[:, None] + offsets[None, :]) % CLASSES
    window = np.take_along_axis(p, idx, axis=1)
    weights = window / np.maximum(window.sum(axis=1, keepdims=True), 1e-12)
    values = (best + (weights * offsets).sum(axis=1)) / 10.0 % 10.0
    confidence = np.take_along_axis(p, idx[:, 1:4], axis=1).sum(axis=1)
    return values, np.clip(confidence, 0.0, 1.0)


def reading(value: float, confidence: float) -> WheelReading:
    """A position and its confidence as a WheelReading (digit and rolling derived as documented there)."""
    value = round(float(value), 3) % 10.0  # rounded first, so 9.9996 becomes 0.0, never 10.0
    nearest = round(value)  # may be 10 for 9.96: the distance below needs no wrap-around
    rolling = abs(value - nearest) > ROLLING_MARGIN
    digit = int(value) % 10 if rolling else nearest % 10
    return WheelReading(value=value, digit=digit, rolling=rolling, confidence=float(confidence))


def bundle_views(bundle: Bundle) -> tuple[tuple[int, int], ...]:
    """The test-time views a meter bundle was measured with (one view for bundles made before views existed)."""
    inference = bundle.manifest.get("inference", {})
    views = inference.get("views", SINGLE_VIEW) if isinstance(inference, dict) else inference
    if not isinstance(views, list | tuple) or not views or not all(
            isinstance(v, list | tuple) and len(v) == 2 and all(type(d) is int and abs(d) <= MAX_VIEW_SHIFT for d in v)
            for v in views):
        raise BundleError(f"{bundle.root}: inference views must be [dx, dy] pairs of whole pixels within "
                          f"±{MAX_VIEW_SHIFT}, got {views!r}")
    return tuple((int(dx), int(dy)) for dx, dy in views)


class MeterDigitModel:
    """A meter digit model ready to classify wheel crops. Load once (usually from a bundle), classify many."""

    def __init__(self, model: Model, spec: dict[str, Any] = METER_SPEC,
                 views: tuple[tuple[int, int], ...] = SINGLE_VIEW, stretch: Stretch = False):
        if tuple(model.input_shape[1:3]) != tuple(spec["size"]):
            raise ModelError(f"{model.path.name} takes {model.input_shape[1:3]} input, the preprocessing "
                             f"spec gives {tuple(spec['size'])}")
        self.model = model
        self.spec = spec
        self.views = tuple(tuple(v) for v in views)
        if not (isinstance(stretch, bool) or stretch == "auto"):  # 1 == True: `in (True, False, "auto")` lets ints by
            raise ValueError(f"stretch must be True, False or 'auto', not {stretch!r}")
        self.stretch = stretch

    @classmethod
    def from_bundle(cls, path: str | Path, variant: str = "int8", threads: int | None = None,
                    stretch: Stretch = False) -> "MeterDigitModel":
        """Verify the bundle's hashes, then load its `variant` model with the test-time views it was measured with;
        `stretch` turns on `stretch_contrast` for a low-contrast wheel meter (True), or for frames whose clearest
        wheel is dim ("auto", `stretches`)."""
        bundle = Bundle.load(path)
        if bundle.task != TASK:
            raise BundleError(f"{bundle.root} is a '{bundle.task}' bundle, not a meter digit model ({TASK})")
        return cls(bundle.model(variant, threads=threads), bundle.preprocessing, bundle_views(bundle), stretch)

    def stretches(self, crops: list[np.ndarray]) -> bool:
        """Whether these crops, the wheels of one frame, are contrast-stretched before the model: always, never, or
        ("auto") when the clearest of them is below AUTO_STRETCH_BELOW."""
        if self.stretch == "auto":
            return bool(crops) and max(wheel_contrast(c, self.spec) for c in crops) < AUTO_STRETCH_BELOW
        return bool(self.stretch)

    def probabilities(self, crops: list[np.ndarray], stretched: bool | None = None) -> np.ndarray:
        """(N, 100) class probabilities, one row per crop (class k = position k / 10), averaged over the views.

        With `stretch = "auto"` the crops are taken as the wheels of one frame (the reader's call): they are
        stretched together or not at all. `stretched` passes a `stretches` answer the caller already has."""
        if not crops:
            return np.empty((0, CLASSES), np.float32)
        if stretched is None:
            stretched = self.stretches(crops)
        x = view_inputs([stretch_contrast(c) for c in crops] if stretched else crops, self.views, self.spec)
        return mean_over_views(np.stack([self.model.run(v)[0].reshape(CLASSES) for v in x]), len(self.views))

    def classify(self, crops: list[np.ndarray], stretched: bool | None = None) -> list[WheelReading]:
        """One WheelReading per crop (BGR uint8 crops of any size, one per wheel, in any order); `stretched` as in
        `probabilities`."""
        values, confidence = decode(self.probabilities(list(crops), stretched))
        return [reading(v, c) for v, c in zip(values, confidence)]


def batch_latency_ms(model: MeterDigitModel, batch: int = 8, crop_size: tuple[int, int] = (63, 36),
                     runs: int = 50, warmup: int = 5) -> dict[str, float]:
    """Median and 90th percentile of `classify` on `batch` crops (preprocessing included), in ms.

    A meter has several wheels, read together each frame, so a batch of ROIs is the unit that
    matters on the device. Pixel content does not change the time; the crop size (a typical one
    from the data set, height x width) sets the resize cost.
    """
    rng = np.random.default_rng(0)
    crops = [rng.integers(0, 256, (*crop_size, 3), dtype=np.uint8) for _ in range(batch)]
    return {"batch": batch, **time_ms(lambda: model.classify(crops), runs, warmup)}


def bench_meter(bundles: list[Path], runs: int = 50, threads: tuple[int, ...] = (1, 2)) -> tuple[list[dict], str]:
    """`make bench` part for meter-digit bundles: batch-of-8 `classify` latency per variant and thread
    count, as JSON rows and a Markdown section (empty when no meter bundle is among `bundles`)."""
    rows = []
    for root in bundles:
        bundle = Bundle.load(root)
        if bundle.task != TASK:
            continue
        for variant in bundle.variants(runnable=True):
            for n in threads:
                model = MeterDigitModel(bundle.model(variant, threads=n), bundle.preprocessing, bundle_views(bundle))
                rows.append({"bundle": root.name, "variant": variant, "threads": n,
                             **batch_latency_ms(model, runs=runs)})
    if not rows:
        return rows, ""
    lines = ["", "Meter digits: one frame's wheels, `MeterDigitModel.classify` on a batch of 8 crops "
             "(63x36 px, preprocessing included).", "",
             "| bundle | model | threads | crops | median ms | p90 ms |", "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['bundle']} | {r['variant']} | {r['threads']} | {r['batch']} | {r['median_ms']:.3f} | "
              f"{r['p90_ms']:.3f} |" for r in rows]
    return rows, "\n".join(lines) + "\n"
