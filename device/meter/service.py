"""The meter service: capture a frame every interval, read it, check it, store it, publish it.

Everything a reading goes through is in one place (`MeterService.step`) so the one-shot CLI, the
tests and the long-running service behave identically; `run` only adds the capture loop. A frame
that cannot be read never stops the service: it becomes a "no reading" outcome with its reason,
and the last good value stays published.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timezone
from typing import Any, Callable

import numpy as np

from device.meter.config import MeterConfig
from device.meter.history import History
from device.meter.postprocess import Outcome, PostProcessor
from device.meter.reader import MeterReader, MeterReading

log = logging.getLogger("device.meter")


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="seconds")


class MeterService:
    """Reader + post-processing + history + outputs of one meter. Call `start_outputs()` to serve MQTT/HTTP."""

    def __init__(self, config: MeterConfig, reader: MeterReader | None = None,
                 clock: Callable[[], float] = time.time):
        self.config = config
        self.reader = reader or MeterReader.from_config(config)
        self.clock = clock
        self.post = PostProcessor(config.postprocess, config.resolution, clock)
        self.history = History(config.history, config.history_keep_days) if config.history else None
        self.mqtt: Any = None
        self.http: Any = None
        self._lock = threading.Lock()
        pre = self.post.prevalue
        self._state: dict[str, Any] = {
            "meter": config.name, "unit": config.unit, "value": None if pre is None else pre[0], "raw": None,
            "rate": None, "status": "starting", "reason": "", "error": "none", "error_time": None,
            "time": None if pre is None else pre[1], "timestamp": None if pre is None else _iso(pre[1]),
            "text": "", "wheels": [], "alignment": None,
        }

    def start_outputs(self) -> "MeterService":
        """Start the HTTP endpoint and MQTT client configured for this meter (each optional)."""
        if self.config.http is not None:
            from device.meter.http import MeterHttp

            self.http = MeterHttp(self.config.http, self.latest, self.set_value, self.history).start()
        if self.config.mqtt is not None:
            from device.meter.mqtt import MeterMqtt

            self.mqtt = MeterMqtt(self.config, self.set_value).start()
            self.mqtt.publish_state(self.latest())
        return self

    def latest(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._state)

    def _record(self, outcome: Outcome, reading: MeterReading | None = None) -> dict[str, Any]:
        details = reading.summary() if reading is not None else None
        with self._lock:
            state = self._state
            state.update(value=outcome.value, raw=outcome.raw, status=outcome.status, reason=outcome.reason,
                         time=outcome.timestamp, timestamp=_iso(outcome.timestamp))
            if outcome.rate is not None:
                state["rate"] = round(outcome.rate, 6)
            if not outcome.accepted:
                state.update(error=f"{outcome.status}: {outcome.reason}", error_time=_iso(outcome.timestamp))
            if details is not None:
                state.update(text=details["text"], wheels=details["wheels"],
                             alignment=details["alignment"]["quality"])
            snapshot = dict(state)
        if self.history is not None:
            self.history.add(outcome, details)
        if self.mqtt is not None:
            self.mqtt.publish_state(snapshot)
        return snapshot

    def step(self, frame: np.ndarray, timestamp: float | None = None) -> tuple[Outcome, MeterReading]:
        """Read one frame and run it through post-processing, history and outputs."""
        reading = self.reader.read(frame)
        outcome = self.post.process(reading.value, timestamp, reading.error)
        self._record(outcome, reading)
        return outcome, reading

    def no_frame(self, error: str, timestamp: float | None = None) -> Outcome:
        """Record that the camera gave no frame this time (the value stays as it was)."""
        outcome = self.post.process(None, timestamp, error)
        self._record(outcome)
        return outcome

    def set_value(self, value: float) -> dict[str, Any]:
        """Set the fallback (last good) value at run time; used by HTTP, MQTT and the CLI."""
        return self._record(self.post.set_value(value))

    def run(self, spec: str, interval_s: float, stop: threading.Event | None = None,
            max_frames: int | None = None, report: Callable[[Outcome, MeterReading | None], None] | None = None) -> int:
        """Capture and read every `interval_s` seconds until `stop` is set or a finite source ends.

        Returns the number of frames read. Live cameras reconnect by themselves (device.camera);
        a failed capture is recorded as "no reading" and retried at the next interval.
        """
        from device.camera import CameraError, EndOfStream, FrameError, open_source

        stop = stop or threading.Event()
        size = self.config.capture_size
        source = open_source(spec, size=size) if size else open_source(spec)
        frames = 0
        try:
            while not stop.is_set() and (max_frames is None or frames < max_frames):
                started = time.monotonic()
                try:
                    frame = source.read_latest()  # not a frame queued since the last interval
                except EndOfStream:
                    break
                except (FrameError, CameraError) as exc:
                    outcome = self.no_frame(f"camera: {exc}")
                    if report:
                        report(outcome, None)
                else:
                    frames += 1
                    outcome, reading = self.step(frame)
                    if report:
                        report(outcome, reading)
                stop.wait(max(0.0, interval_s - (time.monotonic() - started)))
        finally:
            source.close()
        return frames

    def close(self) -> None:
        if self.mqtt is not None:
            self.mqtt.close()
        if self.http is not None:
            self.http.close()
        if self.history is not None:
            self.history.close()
