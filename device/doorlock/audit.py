"""Audit trail: every decision the lock takes, in SQLite, with optional JPEG snapshots of refusals.

A door lock has to be able to answer "who came in when, and who was turned away": each row
holds the time, the person (or none), the best raw distance and, when the lock matched on the
cohort-normalised score, the best score (the number the threshold applied to), how many frames were used,
the action and the reason. Snapshots of refused attempts are capped at `keep` files (oldest deleted first) so a
busy street in front of the camera cannot fill the SD card.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from device.doorlock.decide import Decision

SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    person TEXT,
    distance REAL,
    frames INTEGER NOT NULL,
    motion REAL,
    action TEXT NOT NULL,
    reason TEXT NOT NULL,
    snapshot TEXT,
    score REAL
)
"""


@dataclass(frozen=True)
class AuditRow:
    time: float
    person: str | None
    distance: float | None
    frames: int
    motion: float | None
    action: str
    reason: str
    snapshot: str | None
    score: float | None = None  # normalised score, when the decision was taken on it


class AuditLog:
    """Append-only decision log in the door lock's SQLite database."""

    def __init__(self, database: str | Path, snapshots: str | Path | None = None, keep: int = 200):
        self._db = sqlite3.connect(str(database), check_same_thread=False)
        self._db.execute(SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(audit)")}
        if "score" not in columns:  # a log written before scores were recorded keeps its rows
            self._db.execute("ALTER TABLE audit ADD COLUMN score REAL")
        self._db.commit()
        self.snapshots = Path(snapshots) if snapshots else None
        self.keep = keep
        if self.snapshots:
            self.snapshots.mkdir(parents=True, exist_ok=True)

    def record(self, decision: Decision, frame: np.ndarray | None = None, when: float | None = None) -> AuditRow:
        """Store one decision; refused attempts also get a snapshot of `frame` when snapshots are on."""
        when = time.time() if when is None else when
        snapshot = None
        if self.snapshots and frame is not None and decision.action != "unlock":
            snapshot = self._snapshot(frame, when)
        distance = decision.distance if np.isfinite(decision.distance) else None
        row = AuditRow(when, decision.person, distance, decision.frames, decision.motion,
                       decision.action, decision.reason, snapshot, decision.score)
        self._db.execute(
            "INSERT INTO audit (time, person, distance, frames, motion, action, reason, snapshot, score) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (row.time, row.person, row.distance, row.frames, row.motion, row.action, row.reason, row.snapshot,
             row.score))
        self._db.commit()
        return row

    def recent(self, limit: int = 50) -> list[AuditRow]:
        """The latest decisions, newest first."""
        cursor = self._db.execute(
            "SELECT time, person, distance, frames, motion, action, reason, snapshot, score FROM audit "
            "ORDER BY id DESC LIMIT ?", (limit,))
        return [AuditRow(*r) for r in cursor.fetchall()]

    def _snapshot(self, frame: np.ndarray, when: float) -> str:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(when)) + f"-{int(when * 1000) % 1000:03d}"
        path = self.snapshots / f"refused-{stamp}.jpg"
        ok, data = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, 85])
        if ok:
            path.write_bytes(data.tobytes())
        old = sorted(self.snapshots.glob("refused-*.jpg"))
        for stale in old[:max(0, len(old) - self.keep)]:
            stale.unlink(missing_ok=True)
        return str(path)

    def close(self) -> None:
        self._db.close()
