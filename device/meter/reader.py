"""From a camera frame to a meter reading: align, crop every wheel, classify them all, assemble.

The assembly rule (`assemble`) is where mechanical counters are different from a row of digits.
A wheel does not jump: it turns from d to d+1 while the wheel to its right turns from 9 to 0
(the carry). So a wheel that the model sees "between" two digits is decided by its right-hand
neighbour, exactly as a person reads an odometer, and a wheel that seems to have moved too early
or too late is corrected the same way (AI-on-the-edge's "digit increase consistency", e.g. a false
17.9 becomes 16.9).

The rule, right to left, with positions on the 0..10 circle:

1. The last (rightmost) wheel has no neighbour. Its position `p` is the model's value, nudged up
   by `last_wheel_tolerance` (default 0.2): a digit standing centred is often seen as x.9, and
   reporting 7 for a wheel showing 8 would be wrong, whereas 7.8…7.99 showing mostly an 8 is read
   as 8 by a person too. Its digit is floor(p). With `extended_resolution` the position is instead
   kept to one decimal (rounded) and its tenths become one more decimal place of the reading.
2. Every other wheel: while its right neighbour stands at position q, the wheel is expected to be
   `carry = max(0, q - 9)` of the way to its next digit (zero until the neighbour passes 9, then
   rising to 1 as the neighbour reaches 10 = 0). Its digit is the whole number nearest to
   `value - carry`, i.e. the digit whose expected position is closest to what the model saw (on
   the circle, so 0.1 with a neighbour at 9.8 reads 9). Its own position, as seen by the wheel on
   its left, is `digit + carry`: the mechanically consistent position, not the noisy model value.

Example: wheels 1.0, 2.9, 9.8 (extended resolution) → the last wheel is 9.8; the middle one is
expected 0.8 of its way, 2.9 - 0.8 = 2.1 → 2; the first one sees q = 2.8 → carry 0 → 1: 129.8.
One tick later the last wheel is 0.1 and the middle one 3.0 → 130.1; a middle wheel still lagging
at 2.9 is also read 3 because its neighbour has passed 0.

One frame cannot always tell which reading the wheels mean, because counters differ in *when* a
carry happens: the rule above assumes the left wheel turns in step with its neighbour's 9 → 0, but
on many counters it starts late, so wheels 1.0, 9.0, 9.5 are 199.5 on one meter (the middle wheel
has not started its carry) and 189.5 on another (it has nearly finished it, seen 0.3 high). The
reading is therefore returned with its `alternatives`: the same wheels assembled with a late carry
(a wheel anywhere between its digit and where a carry in step would have taken it; the position
it hands to its left neighbour is the observed one) and without the last wheel's nudge. The
post-processing (device.meter.postprocess) picks the first of them that agrees with the previous
value, so a meter that stops in a carry overnight keeps reading 199 instead of settling on 189.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Protocol, Sequence

import cv2
import numpy as np

from device.images import check_image
from device.meter.align import Aligner, Alignment
from device.meter.config import MeterConfig, ReadingConfig


class Wheel(Protocol):
    """What assembly needs of one wheel reading (device.meter.model.WheelReading has it)."""

    value: float
    confidence: float


class WheelClassifier(Protocol):
    def classify(self, crops: list[np.ndarray], stretched: bool | None = None) -> Sequence[Wheel]: ...

    def stretches(self, crops: list[np.ndarray]) -> bool: ...


@dataclass(frozen=True)
class Assembled:
    """The number the wheels show: `text` keeps the decimals exactly, `value` is the same as a float."""

    value: float
    text: str
    digits: tuple[int, ...]
    alternatives: tuple["Assembled", ...] = ()  # other readings the same wheels fit, most likely first


def assemble(wheels: Sequence[Wheel], config: ReadingConfig = ReadingConfig()) -> Assembled:
    """Assemble wheel positions (left = most significant) into a number; the rule is in the module docstring.

    The result is the in-step reading; its `alternatives` are the distinct readings of a late carry and of
    the last wheel without its nudge, for the post-processing to choose from when the first one does not
    fit the previous value.
    """
    if not wheels:
        raise ValueError("no wheels to assemble")
    values = [float(w.value) % 10.0 for w in wheels]
    first, *others = [_assemble(values, config, late, nudge) for nudge in (True, False) for late in (False, True)]
    alternatives: list[Assembled] = []
    for other in others:
        if other.text != first.text and all(other.text != a.text for a in alternatives):
            alternatives.append(other)
    return replace(first, alternatives=tuple(alternatives))


def _span_distance(value: float, digit: int, carry: float) -> float:
    """Circular distance from `value` to the span [digit, digit + carry] a late carry allows."""
    offset = (value - digit) % 10.0
    return 0.0 if offset <= carry else min(offset - carry, 10.0 - offset)


def _assemble(values: list[float], config: ReadingConfig, late: bool, nudge: bool) -> Assembled:
    """One reading of the wheels: carries in step (late=False) or late; last wheel nudged or as seen."""
    last = values[-1]
    if config.extended_resolution:
        position = round(last, 1) % 10.0
        tenth = int(round((position - math.floor(position)) * 10)) % 10
    else:
        position = (last + (config.last_wheel_tolerance if nudge else 0.0)) % 10.0
        tenth = None
    digits = [int(math.floor(position)) % 10]
    for value in reversed(values[:-1]):
        carry = max(0.0, position - 9.0)
        if late:
            # Ties go to the digit an in-step carry would show (9.9 beside a neighbour at 9.8 is a 9 running ahead).
            digit = min(range(10), key=lambda d: (round(_span_distance(value, d, carry), 9),
                                                  _span_distance(value, d + carry, 0.0)))
            offset = (value - digit) % 10.0
            position = digit + min(offset if offset < 5.0 else 0.0, carry)  # seen below its digit: no progress
        else:
            digit = int(math.floor(value - carry + 0.5)) % 10
            position = digit + carry
        digits.append(digit)
    digits.reverse()
    shown = "".join(map(str, digits)) + ("" if tenth is None else str(tenth))
    decimals = config.decimals + (0 if tenth is None else 1)
    whole, frac = shown[:len(shown) - decimals] or "0", shown[len(shown) - decimals:]
    text = f"{int(whole)}" + (f".{frac}" if decimals else "")
    return Assembled(value=float(text), text=text, digits=tuple(digits))


@dataclass(frozen=True)
class MeterReading:
    """One frame's reading. `value` is None when the frame was refused; `error` then says why."""

    value: float | None
    text: str
    wheels: tuple[Wheel, ...]
    alignment: Alignment
    error: str = ""
    crops: tuple[np.ndarray, ...] = field(default=(), repr=False)
    alternatives: tuple[float, ...] = ()  # other values the wheels fit (see `assemble`), most likely first
    stretched: bool = False  # the wheels were contrast-stretched before the model ([model] stretch_contrast)

    def positions(self) -> list[float]:
        """Wheel positions in [0, 10), rounded for display (a model may report 9.999… as 10.0)."""
        return [round(float(w.value) % 10.0, 2) for w in self.wheels]

    @property
    def confidence(self) -> float:
        return min((float(w.confidence) for w in self.wheels), default=0.0)

    def summary(self) -> dict:
        return {"value": self.value, "text": self.text, "error": self.error, "alternatives": list(self.alternatives),
                "wheels": self.positions(), "contrast_stretched": self.stretched,
                "confidence": round(self.confidence, 3), "alignment": self.alignment.summary()}


class MeterReader:
    """A meter's alignment marks, ROIs and digit model: `read(frame)` gives a MeterReading."""

    def __init__(self, config: MeterConfig, model: WheelClassifier):
        self.config = config
        self.model = model
        self.aligner = Aligner(config.alignment)

    @classmethod
    def from_config(cls, config: MeterConfig) -> "MeterReader":
        """Load the config's model bundle (hashes verified) and the reference marks."""
        from device.meter.model import MeterDigitModel

        return cls(config, MeterDigitModel.from_bundle(config.bundle, variant=config.variant, threads=config.threads,
                                                       stretch=config.stretch_contrast))

    def read(self, frame: np.ndarray) -> MeterReading:
        """Align, crop, classify all wheels, assemble. Never raises for a bad frame: it refuses."""
        frame = check_image(frame, "frame")
        if frame.ndim == 2:
            frame = cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
        alignment = self.aligner.align(frame)
        if not alignment.ok:
            return MeterReading(None, "", (), alignment, f"alignment refused: {alignment.reason}")
        outside = [self.config.digits[i].name or f"#{i + 1}"
                   for i in self.aligner.outside(frame, alignment, self.config.digits)]
        if outside:
            return MeterReading(None, "", (), alignment, f"alignment refused: digit ROI {', '.join(outside)} "
                                                         "falls outside the frame")
        crops = tuple(self.aligner.crop(frame, alignment, roi) for roi in self.config.digits)
        stretched = self.model.stretches(list(crops))  # decided once: classify is told, the reading reports it
        wheels = tuple(self.model.classify(list(crops), stretched))
        unsure = [f"#{i + 1} ({w.confidence:.2f})" for i, w in enumerate(wheels)
                  if w.confidence < self.config.reading.min_confidence]
        if unsure:
            return MeterReading(None, "", wheels, alignment, f"digit model unsure of wheel {', '.join(unsure)} "
                                f"< min_confidence {self.config.reading.min_confidence}", crops, stretched=stretched)
        result = assemble(wheels, self.config.reading)
        return MeterReading(result.value, result.text, wheels, alignment, "", crops,
                            tuple(a.value for a in result.alternatives), stretched)
