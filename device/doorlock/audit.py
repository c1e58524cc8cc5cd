"""Audit trail: every decision the lock takes, in SQLite, with optional JPEG snapshots of refusals.

A door lock has to be able to answer "who came in when, and who was turned away": each row
holds the time, the person (or none), the best raw distance and, when the lock matched on the
cohort-normalised score, the best score (the number the threshold applied to), how many frames were used,
the action and the reason. The row is written first and its snapshot second: a snapshot that cannot be written
(full or removed card) leaves the row with snapshot NULL and a log line, never a lost row. Snapshots are named
by the row's id, not the wall clock (a Pi without a real-time clock can jump a year, and two refusals can
share a millisecond), and capped at `keep` files, lowest ids deleted first, so a busy street in front of the
camera cannot fill the SD card.
"""

from __future__ import annotations

import logging
import re
import sqlite3
import time
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np

from device.doorlock.decide import Decision

log = logging.getLogger("doorlock")
_SNAPSHOT_ID = re.compile(r"refused-(\d+)\.jpg")

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
        try:
            self._db = sqlite3.connect(str(database), check_same_thread=False)
        except sqlite3.Error as exc:  # e.g. its folder does not exist: say which file
            raise sqlite3.OperationalError(f"{database}: {exc}") from exc
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
        distance = decision.distance if np.isfinite(decision.distance) else None
        row = AuditRow(when, decision.person, distance, decision.frames, decision.motion,
                       decision.action, decision.reason, None, decision.score)
        cursor = self._db.execute(
            "INSERT INTO audit (time, person, distance, frames, motion, action, reason, score) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (row.time, row.person, row.distance, row.frames, row.motion, row.action, row.reason, row.score))
        self._db.commit()
        if not (self.snapshots and frame is not None and decision.action != "unlock"):
            return row
        snapshot = self._snapshot(frame, cursor.lastrowid)
        if snapshot is not None:
            self._db.execute("UPDATE audit SET snapshot = ? WHERE id = ?", (snapshot, cursor.lastrowid))
            self._db.commit()
        return replace(row, snapshot=snapshot)

    def recent(self, limit: int = 50) -> list[AuditRow]:
        """The latest decisions, newest first."""
        cursor = self._db.execute(
            "SELECT time, person, distance, frames, motion, action, reason, snapshot, score FROM audit "
            "ORDER BY id DESC LIMIT ?", (limit,))
        return [AuditRow(*r) for r in cursor.fetchall()]

    def _snapshot(self, frame: np.ndarray, row_id: int) -> str | None:
        """Write the JPEG for audit row `row_id` and prune the oldest; None (logged) when it cannot be written."""
        path = self.snapshots / f"refused-{row_id:08d}.jpg"
        try:
            ok, data = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, 85])
            if not ok:
                raise OSError("JPEG encoding failed")
            path.write_bytes(data.tobytes())
            self._prune()
        except OSError as exc:
            error = f"{type(exc).__name__}: {exc}"
            log.error("snapshot_failed", extra={"fields": {"audit_id": row_id, "error": error}})
            return None
        return str(path)

    def _prune(self) -> None:
        """Keep the `keep` snapshots with the highest audit ids; files named otherwise (an older naming) go first."""
        def age(path: Path) -> tuple[int, int]:
            found = _SNAPSHOT_ID.fullmatch(path.name)
            return (1, int(found.group(1))) if found else (0, 0)

        old = sorted(self.snapshots.glob("refused-*.jpg"), key=age)
        for stale in old[:max(0, len(old) - self.keep)]:
            stale.unlink(missing_ok=True)
            # the row stays (the decision happened); it no longer points at a file that is gone
            self._db.execute("UPDATE audit SET snapshot = NULL WHERE snapshot = ?", (str(stale),))
        self._db.commit()

    def close(self) -> None:
        self._db.close()
