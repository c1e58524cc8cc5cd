"""Plausibility checks between readings, with recovery so the reader can never lock itself out.

A meter only moves forward and only so fast, so a reading can be checked against the last good
value ("pre-value"): a decrease ("negative rate") or a jump faster than `max_rate` is rejected and
the last good value is kept. That is what AI-on-the-edge-device does, and its users' most common
complaint is what happens next: once a wrong value has been accepted (or the meter was replaced,
or the pre-value was set wrong) *every* later, correct reading fails the check against it, and
the reader reports "Neg. Rate" / "Rate too high" forever.

Recovery closes that hole: rejected readings are kept as candidates, and when the last
`recovery_readings` (N, default 3) rejected readings agree with *each other* — they form a series
that passes the same checks among themselves — the newest one is accepted (status "recovered").
One glitch is still rejected; a new truth that N frames in a row agree on is not. The price is
that a misread that repeats identically N times in a row is accepted too (e.g. a reflection that
covers the same wheel in every frame); the reason is logged and stored in the history.

Rules, in order, for a reading `raw` at time t with pre-value v at time t0:
- no reading (frame refused): nothing changes, the streak of candidates is kept;
- no pre-value, or it is older than `prevalue_max_age_min` (0 = never too old): accepted ("initial");
- 0 > raw - v >= -jitter (negative rates not allowed): ignored, the value stays v ("jitter"; the
  last digit wobbles);
- raw - v < -jitter and negative rates are not allowed: rejected ("negative rate");
- |raw - v| larger than the jitter and, per minute of t - t0 (or per reading), above `max_rate`:
  rejected ("rate too high");
- otherwise accepted ("ok"), and the candidates are dropped.
A reading that fails a check but has alternatives (device.meter.reader.assemble: the same wheels read
with a late carry, or the last wheel without its nudge) is replaced by the first alternative that
passes, with a reason saying so: one frame of rolling wheels can mean two readings, and the previous
value tells which. The rate of change is measured only forward in time: a clock stepped back (NTP
after a power cut) skips the rate check instead of making every change look infinitely fast.
The pre-value is saved to `state_file` (atomically) on every change (an unchanged one every 10
minutes), so a restart continues from it; `set_value` (HTTP, MQTT, CLI) replaces it at run time,
e.g. after a meter exchange.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

from device.meter.config import PostprocessConfig

log = logging.getLogger("device.meter")
# The published rate is measured over at least RATE_WINDOW_S where the good values go back that far (from the
# newest one that old, else from the oldest there is): over one minute, a meter showing litres flips between 0
# and 1 L/min at half a litre a minute.
RATE_WINDOW_S = 600.0
# An unchanged value is re-saved (to refresh its time for prevalue_max_age_min) at most this often:
# a reading a minute would otherwise rewrite the SD card's state file 1440 times a day for nothing.
SAVE_UNCHANGED_EVERY_S = 600.0


@dataclass(frozen=True)
class Outcome:
    """What one reading (or a set_value) did. `value` is the value to publish: the last good one."""

    timestamp: float
    raw: float | None
    value: float | None
    accepted: bool
    status: str  # ok | initial | jitter | recovered | rejected | no reading | set
    reason: str = ""
    rate: float | None = None  # units per minute since the previous good value (None: unknown)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class _Point:
    value: float
    time: float


class PostProcessor:
    """Checks readings against the last good value; thread-safe (set_value may come from another thread)."""

    def __init__(self, config: PostprocessConfig, resolution: float = 1.0, clock: Callable[[], float] = time.time):
        self.config = config
        self.jitter = config.jitter if config.jitter is not None else 2 * resolution
        self.clock = clock
        self._lock = threading.Lock()
        self._pending: list[_Point] = []
        self._pending_reasons: list[str] = []
        self._pre: _Point | None = self._load()
        self._recent: deque[_Point] = deque([self._pre] if self._pre is not None else [])  # good values, oldest first
        self._saved_time = self._pre.time if self._pre is not None else float("-inf")

    @property
    def prevalue(self) -> tuple[float, float] | None:
        """(value, timestamp) of the last good value, or None."""
        return None if self._pre is None else (self._pre.value, self._pre.time)

    def _load(self) -> _Point | None:
        path = self.config.state_file
        if path is None or not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            return _Point(float(data["value"]), float(data["time"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring unreadable state file %s: %s", path, exc)
            return None

    def _save(self) -> None:
        """Write the pre-value atomically; a full or read-only disk is logged, not raised (the value stays
        in memory and the next change tries again), so storage trouble never stops the readings."""
        path = self.config.state_file
        if path is None or self._pre is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            with open(tmp, "w") as out:
                out.write(json.dumps({"value": self._pre.value, "time": self._pre.time}) + "\n")
                out.flush()
                os.fsync(out.fileno())  # on the card before the rename, or a power cut may leave it empty
            os.replace(tmp, path)  # atomic: a power cut leaves the old or the new value, never half a file
        except OSError as exc:
            log.error("cannot save the last good value to %s: %s", path, exc)
            return
        self._saved_time = self._pre.time

    def _within_jitter(self, before: _Point, after: _Point) -> bool:
        """True for a change no larger than the jitter (with float slack: 0.1 + 0.2 is not 0.3)."""
        return abs(after.value - before.value) <= self.jitter + 1e-9 * max(1.0, abs(before.value))

    def _problem(self, before: _Point, after: _Point) -> str:
        """Why `after` cannot follow `before` ("" when it can; jitter-sized changes always can)."""
        delta = after.value - before.value
        if self._within_jitter(before, after):
            return ""
        if delta < 0 and not self.config.allow_negative:
            return f"negative rate: {after.value:g} is {-delta:g} below {before.value:g}"
        if self.config.max_rate is not None and (after.time > before.time or self.config.rate_mode != "per_minute"):
            minutes = (after.time - before.time) / 60.0
            rate = delta / minutes if self.config.rate_mode == "per_minute" else delta
            if abs(rate) > self.config.max_rate:
                per = "/min" if self.config.rate_mode == "per_minute" else " per reading"
                return (f"rate too high: {after.value:g} after {before.value:g} is {rate:+.4g}{per} "
                        f"(max_rate {self.config.max_rate:g})")
        return ""

    def _accept(self, point: _Point, status: str, reason: str = "") -> Outcome:
        if status in ("recovered", "set", "initial") or (self._recent and point.time <= self._recent[-1].time):
            self._recent.clear()  # the old values were wrong, replaced or stale, or the clock went back
        rate = self._rate(point)
        self._recent.append(point)
        changed = self._pre is None or point.value != self._pre.value
        self._pre = point
        self._pending.clear()
        self._pending_reasons.clear()
        if changed or point.time - self._saved_time >= SAVE_UNCHANGED_EVERY_S:
            self._save()
        if reason:
            log.info("accepted %g (%s): %s", point.value, status, reason)
        return Outcome(point.time, point.value, point.value, True, status, reason, rate)

    def _rate(self, point: _Point) -> float | None:
        """Units per minute from the window's anchor (see RATE_WINDOW_S) to `point`; None without one."""
        while len(self._recent) > 1 and self._recent[1].time <= point.time - RATE_WINDOW_S:
            self._recent.popleft()
        if not self._recent or point.time <= self._recent[0].time:
            return None
        anchor = self._recent[0]
        return (point.value - anchor.value) / ((point.time - anchor.time) / 60.0)

    def _stale(self, now: float) -> str:
        if self._pre is None:
            return "no previous value"
        age_min = (now - self._pre.time) / 60.0
        limit = self.config.prevalue_max_age_min
        if limit and age_min > limit:
            return f"previous value is {age_min:.0f} min old (prevalue_max_age_min {limit:g})"
        return ""

    def process(self, raw: float | None, timestamp: float | None = None, error: str = "",
                alternatives: Sequence[float] = ()) -> Outcome:
        """Check one reading (None for a refused frame, with `error`) and return what was published.

        `alternatives` are other values the same frame fits (most likely first); one of them is used when
        `raw` fails a check and it passes.
        """
        now = self.clock() if timestamp is None else timestamp
        with self._lock:
            current = None if self._pre is None else self._pre.value
            if raw is None or not math.isfinite(raw):
                reason = error or "no reading"
                log.warning("no value: %s", reason)
                return Outcome(now, None, current, False, "no reading", reason)
            point = _Point(float(raw), now)
            if stale := self._stale(now):
                return self._accept(point, "initial", stale)
            assert self._pre is not None
            note = ""
            if problem := self._problem(self._pre, point):
                fitting = [p for p in (_Point(float(a), now) for a in alternatives if math.isfinite(a))
                           if not self._problem(self._pre, p)]
                if not fitting:
                    return self._reject(point, problem)
                note = (f"the wheels also read {fitting[0].value:g}, which fits the last good value "
                        f"{self._pre.value:g} ({point.value:g}: {problem})")
                point = fitting[0]
            if point.value < self._pre.value and not self.config.allow_negative:  # a jitter-sized decrease
                self._pending.clear()
                self._pending_reasons.clear()
                reason = "; ".join(filter(None, (
                    f"{point.value:g} is within jitter {self.jitter:g} below {self._pre.value:g}; kept", note)))
                return Outcome(now, point.value, self._pre.value, True, "jitter", reason,
                               self._rate(_Point(self._pre.value, now)))
            return self._accept(point, "ok", note)

    def _reject(self, point: _Point, problem: str) -> Outcome:
        """Remember the rejected reading; accept it when it completes N agreeing rejected readings."""
        if self._pending and self._problem(self._pending[-1], point):
            self._pending.clear()  # the streak is broken: this reading starts a new one
            self._pending_reasons.clear()
        self._pending.append(point)
        self._pending_reasons.append(problem)
        n = self.config.recovery_readings
        if len(self._pending) >= n:
            series = ", ".join(f"{p.value:g}" for p in self._pending[-n:])
            return self._accept(point, "recovered", f"{n} consecutive readings agree ({series}) although "
                                                    f"the check said: {self._pending_reasons[0]}")
        log.warning("rejected %g: %s (%d/%d agreeing readings needed to override)", point.value, problem,
                    len(self._pending), n)
        assert self._pre is not None
        return Outcome(point.time, point.value, self._pre.value, False, "rejected", problem)

    def set_value(self, value: float, timestamp: float | None = None) -> Outcome:
        """Replace the last good value (the fallback), e.g. after a meter exchange or a wrong initial read."""
        if not math.isfinite(value):
            raise ValueError(f"value must be a finite number, got {value!r}")
        now = self.clock() if timestamp is None else timestamp
        with self._lock:
            self._pre = None  # no rate against the value being replaced
            return self._accept(_Point(float(value), now), "set", f"value set to {value:g} by the user")
