"""The meter service: capture a frame every interval, read it, check it, store it, publish it.

Everything a reading goes through is in one place (`MeterService.step`) so the one-shot CLI, the
tests and the long-running service behave identically; `run` only adds the capture loop. Nothing a
frame, the camera or the storage does stops the service: a frame that cannot be read becomes a "no
reading" outcome with its reason, a camera that is missing (also at start-up) is retried every
interval, a history database that is locked or a full disk is logged and reported as the last
error, and the last good value stays published.
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
        # the readings keep_days holds at this interval: a clock jump cannot purge more than that
        keep_rows = int(config.history_keep_days * 86400 / max(config.interval_s, 1.0))
        self.history = History(config.history, config.history_keep_days, keep_rows) if config.history else None
        self.mqtt: Any = None
        self.http: Any = None
        self._lock = threading.Lock()  # guards _state (read by the HTTP thread)
        # One reading, or one set_value, at a time from check to publish: a value set over MQTT/HTTP while a
        # frame is being checked must not be overwritten by that frame's older outcome.
        self._turn = threading.RLock()
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
                         time=outcome.timestamp, timestamp=_iso(outcome.timestamp),
                         rate=None if outcome.rate is None else round(outcome.rate, 6))  # None: not known now
            if not outcome.accepted:
                state.update(error=f"{outcome.status}: {outcome.reason}", error_time=_iso(outcome.timestamp))
            if details is not None:
                state.update(text=details["text"], wheels=details["wheels"], alignment=details["alignment"]["quality"],
                             contrast_stretched=details["contrast_stretched"])
        if self.history is not None:
            try:
                self.history.add(outcome, details)
            except Exception as exc:  # locked database, full disk: the reading itself is still published
                log.error("history: cannot store the %s reading: %s", outcome.status, exc)
                with self._lock:
                    self._state.update(error=f"history: {exc}", error_time=_iso(outcome.timestamp))
        with self._lock:
            snapshot = dict(self._state)
        if self.mqtt is not None:
            self.mqtt.publish_state(snapshot)
        return snapshot

    def step(self, frame: np.ndarray, timestamp: float | None = None) -> tuple[Outcome, MeterReading]:
        """Read one frame and run it through post-processing, history and outputs."""
        reading = self.reader.read(frame)
        with self._turn:
            outcome = self.post.process(reading.value, timestamp, reading.error, reading.alternatives)
            self._record(outcome, reading)
        return outcome, reading

    def no_frame(self, error: str, timestamp: float | None = None) -> Outcome:
        """Record that the camera gave no frame this time (the value stays as it was)."""
        with self._turn:
            outcome = self.post.process(None, timestamp, error)
            self._record(outcome)
        return outcome

    def set_value(self, value: float) -> dict[str, Any]:
        """Set the fallback (last good) value at run time; used by HTTP, MQTT and the CLI."""
        with self._turn:
            return self._record(self.post.set_value(value))

    def run(self, spec: str, interval_s: float, stop: threading.Event | None = None,
            max_frames: int | None = None, report: Callable[[Outcome, MeterReading | None], None] | None = None) -> int:
        """Capture and read every `interval_s` seconds until `stop` is set or a finite source ends.

        Returns the number of frames read. Live cameras reconnect by themselves (device.camera); a camera
        that cannot be opened, at start-up too (a USB camera that enumerates late after a power cut), and a
        failed capture are recorded as "no reading" and retried at the next interval. An unexpected error
        while reading a frame is logged with its traceback and recorded the same way.
        """
        from device.camera import CameraError, EndOfStream, FrameError, open_source

        stop = stop or threading.Event()
        options: dict[str, Any] = {"sleep": stop.wait}  # a back-off never delays a shutdown
        if self.config.capture_size:
            options["size"] = self.config.capture_size
        source = open_source(spec, wait_for_camera=True, **options)  # a wrong file or folder fails here
        frames = 0
        try:
            while not stop.is_set() and (max_frames is None or frames < max_frames):
                started = time.monotonic()
                reading: MeterReading | None = None
                try:
                    frame = source.read_latest()  # not a frame queued since the last interval
                except EndOfStream:
                    break
                except (FrameError, CameraError) as exc:
                    outcome = self.no_frame(f"camera: {exc}")
                else:
                    frames += 1
                    try:
                        outcome, reading = self.step(frame)
                    except Exception as exc:  # a bug or a broken output must not end the service
                        log.exception("reading a frame failed")
                        outcome = self.no_frame(f"internal error: {type(exc).__name__}: {exc}")
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
