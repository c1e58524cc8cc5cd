"""`doorlock run`: the long-running service — camera → recognizer → decider → relay + audit.

Design choices:
- Logs are JSON lines on stderr (journald keeps them; `jq` reads them), one object per event.
- Nothing that one frame, the camera or the storage does may stop the service: bad frames are skipped,
  a lost camera is reopened with back-off (device.camera.Reconnecting) and logged once per outage, an
  audit record that cannot be written (full SD card, locked database) is logged as audit_failed.
- SIGTERM/SIGINT/SIGHUP set a stop flag (a closed terminal or `systemctl reload` stops cleanly rather than killing
  Python mid-unlock); the loop finishes its frame, the relay is locked and released,
  databases are closed. `atexit` locks the relay as well for any other way out of Python.
- People enrolled (or removed) by `doorlock enroll` while the service runs are picked up without a
  restart: the service looks at the embeddings table's size and last id every few seconds. A database locked
  by another program for longer than SQLite's timeout is logged and the old gallery kept; the next check retries.
- A named threshold looser than the default (far_0.1pct) is logged as a warning at start: it trades many more
  admitted strangers for fewer refused residents.
"""

from __future__ import annotations

import atexit
import json
import logging
import signal
import sqlite3
import sys
import threading
import time
from typing import Any, Callable

import cv2
import numpy as np

from device.camera import CameraError, EndOfStream, FrameError, FrameSource, open_source
from device.doorlock.audit import AuditLog
from device.doorlock.config import LOOSE_THRESHOLDS, Config
from device.doorlock.decide import Decider, Decision
from device.doorlock.enroll import FaceDB
from device.doorlock.pipeline import Recognizer
from device.doorlock.relay import Relay, mock_factory
from device.images import ImageError

log = logging.getLogger("doorlock")
GALLERY_CHECK_S = 2.0  # how often to look for people enrolled or removed while running
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, event, and the event's fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {"time": round(record.created, 3), "level": record.levelname.lower(),
                                 "event": record.getMessage()}
        entry.update(getattr(record, "fields", {}))
        return json.dumps(entry, default=str)


def setup_logging(level: int = logging.INFO) -> None:
    """JSON lines for the door lock's own events and for the device package's (bundle, runtime) messages, so
    the service log stays one JSON object per line."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    for logger in (log, logging.getLogger("device")):
        logger.handlers[:] = [handler]
        logger.setLevel(level)
        logger.propagate = False


def event(name: str, level: int = logging.INFO, **fields: Any) -> None:
    log.log(level, name, extra={"fields": fields})


class DoorLock:
    """The service's state and its per-frame step; `run()` loops until `stop` is set."""

    def __init__(self, config: Config, recognizer: Recognizer, db: FaceDB, audit: AuditLog, relay: Relay,
                 source: FrameSource, clock: Callable[[], float] = time.monotonic,
                 stop: threading.Event | None = None):
        self.config = config
        self.recognizer = recognizer
        self.db = db
        self.audit = audit
        self.relay = relay
        self.source = source
        self.clock = clock
        self.decider = Decider(config.decision, config.liveness)
        self.threshold = recognizer.threshold(config.decision.threshold)
        self.stop = stop or threading.Event()
        self.camera_down = False
        self._db_version = None
        self.reload_gallery()

    def reload_gallery(self) -> None:
        """Re-embed stale enrollments, then load the gallery for the running model.

        The attempt in progress is dropped: its votes were scored against the old gallery (and a gallery emptied
        by `doorlock remove` scores nothing), so mixing them with the next frames' would compare unlike numbers.
        """
        stale = self.db.reembed(self.recognizer)
        if stale:
            event("reembedded", embeddings=stale, model_sha256=self.recognizer.model_sha256)
        entries = self.db.entries(self.recognizer.model_sha256)
        self.gallery = self.recognizer.gallery(entries, self.config.decision.threshold)
        self._db_version = self.db.version()
        self.decider.reset()
        if not len(self.gallery):
            event("gallery_empty", logging.WARNING, hint="enroll people with `doorlock enroll NAME PHOTOS…`")
        event("gallery_loaded", people=len(self.gallery.people), embeddings=len(self.gallery))

    def check_gallery(self) -> None:
        """Reload the gallery when the enrollments changed; a database locked past SQLite's timeout (a backup, an
        admin's sqlite3 shell) is logged and the current gallery kept, so the door keeps working."""
        try:
            if self.db.version() != self._db_version:
                self.reload_gallery()
        except sqlite3.Error as exc:
            event("gallery_check_failed", logging.WARNING, error=f"{type(exc).__name__}: {exc}",
                  kept=f"{len(self.gallery.people)} people, {len(self.gallery)} embeddings")

    def step(self) -> Decision | None:
        """Read and judge one frame. Returns a Decision when an attempt completed."""
        try:
            frame = self.source.read()
        except EndOfStream:
            raise
        except CameraError as exc:  # Reconnecting already waited its back-off step
            if not self.camera_down:
                event("camera_lost", logging.WARNING, error=str(exc))
            self.camera_down = True
            self.stop.wait(0.05)
            return None
        except FrameError as exc:
            event("bad_frame", logging.WARNING, error=str(exc))
            return None
        if self.camera_down:
            event("camera_back")
            self.camera_down = False
        now = self.clock()
        abandoned = self.decider.expire(now)  # on every frame, face or not: the face may never come back
        if abandoned is not None:
            self._act(abandoned, None)  # this frame shows no one from that attempt: no snapshot
        # ... and the frame itself is still judged: it may be the first of the next attempt
        decision = self._judge(frame, now)
        return decision if decision is not None else abandoned

    def _judge(self, frame: np.ndarray, now: float) -> Decision | None:
        """Recognise one frame and vote with it; the Decision (acted on) when it completes an attempt."""
        if self.decider.blocked(now):
            return None
        try:
            result = self.recognizer.process(frame, self.gallery, self.threshold)
        except (ImageError, ValueError, cv2.error) as exc:  # one odd frame must not stop the door
            event("bad_frame", logging.WARNING, error=f"{type(exc).__name__}: {exc}")
            return None
        if result.match is None:
            return None
        decision = self.decider.observe(result.match, result.crop, now)
        if decision is None:
            return None
        return self._act(decision, frame)

    def _act(self, decision: Decision, frame: np.ndarray | None) -> Decision:
        """Open the door for an unlock, then audit and log the decision (a snapshot of `frame` for refusals)."""
        if decision.action == "unlock":
            self.relay.unlock()
        try:
            snapshot = self.audit.record(decision, frame).snapshot
        except (sqlite3.Error, OSError) as exc:  # a full SD card or a locked database must not stop the door
            event("audit_failed", logging.ERROR, error=f"{type(exc).__name__}: {exc}")
            snapshot = None
        event("decision", action=decision.action, person=decision.person, distance=round(decision.distance, 4),
              score=None if decision.score is None else round(decision.score, 3),
              threshold=self.recognizer.describe_threshold(self.config.decision.threshold), frames=decision.frames,
              motion=round(decision.motion, 2), reason=decision.reason, snapshot=snapshot)
        return decision

    def run(self) -> None:
        event("started", source=self.source.name, model_sha256=self.recognizer.model_sha256[:12],
              threshold=self.recognizer.describe_threshold(self.config.decision.threshold),
              votes=f"{self.config.decision.votes_needed}/{self.config.decision.window}")
        if self.config.decision.threshold in LOOSE_THRESHOLDS:
            event("threshold_loose", logging.WARNING, threshold=self.config.decision.threshold,
                  hint="lets in many more strangers than far_0.001pct (README: 7.8% vs 0.12% per attempt)")
        checked = self.clock()
        while not self.stop.is_set():
            if self.clock() - checked > GALLERY_CHECK_S:
                checked = self.clock()
                self.check_gallery()
            try:
                self.step()
            except EndOfStream:
                event("source_ended", source=self.source.name)
                break


def run_service(config: Config) -> int:
    """Build the service from a config, run it until a signal or the end of a recorded source."""
    setup_logging()
    relay = Relay(config.relay.pin, config.relay.active_high, config.relay.unlock_s,
                  pin_factory=mock_factory() if config.relay.mock else None)
    atexit.register(relay.close)
    try:
        recognizer = Recognizer.from_config(config)
        db = FaceDB(config.storage.database)
        audit = AuditLog(config.storage.database, config.storage.snapshots, config.storage.snapshot_keep)
        stop = threading.Event()
        source = open_source(config.camera.source, size=(config.camera.width, config.camera.height),
                             loop=config.camera.loop, sleep=stop.wait)
        lock = DoorLock(config, recognizer, db, audit, relay, source, stop=stop)

        def on_signal(signum: int, _frame: Any) -> None:
            event("stopping", signal=signal.Signals(signum).name)
            lock.stop.set()

        for signum in STOP_SIGNALS:
            signal.signal(signum, on_signal)
        try:
            lock.run()
        finally:
            source.close()
            audit.close()
            db.close()
    finally:
        relay.close()
        event("stopped", relay="locked")
    return 0
