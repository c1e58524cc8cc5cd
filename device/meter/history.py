"""Every reading, accepted or not, in a small SQLite file: what was read, what was published, and why.

Keeping the rejected readings with their reason is what lets a user see *why* the value did not
move (a reflection every evening, a wheel the model is unsure of) instead of guessing. SQLite is in
the standard library, survives power cuts (WAL journal), and is read by the HTTP endpoint from
another thread, so one connection is shared behind a lock.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from device.meter.postprocess import Outcome

_SCHEMA = """
CREATE TABLE IF NOT EXISTS readings (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    raw REAL,
    value REAL,
    accepted INTEGER NOT NULL,
    status TEXT NOT NULL,
    reason TEXT NOT NULL,
    rate REAL,
    details TEXT
);
CREATE INDEX IF NOT EXISTS readings_time ON readings(time);
"""
_COLUMNS = ("id", "time", "raw", "value", "accepted", "status", "reason", "rate", "details")


class History:
    """Append-only reading log with simple queries; `path` may be ":memory:" for a throwaway log."""

    def __init__(self, path: str | Path, keep_days: float = 365.0, keep_rows: int | None = None):
        """`keep_rows`: the newest rows that are never purged, whatever the clock says (see `add`)."""
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.keep_days = keep_days
        self.keep_rows = keep_rows
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False)
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA)
            self._db.commit()

    def add(self, outcome: Outcome, details: dict[str, Any] | None = None) -> int:
        """Store one outcome (plus e.g. wheel values and alignment quality); old rows beyond keep_days go.

        Age is judged by the wall clock, which can jump (a Pi without a real-time clock, a bad NTP answer): a
        clock years ahead would make every row "old". So the newest `keep_rows` rows, counted by insertion order
        rather than by time, are never purged; the service sets it to the readings `keep_days` holds.
        """
        with self._lock:
            try:
                cursor = self._db.execute(
                    "INSERT INTO readings (time, raw, value, accepted, status, reason, rate, details) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (outcome.timestamp, outcome.raw, outcome.value, int(outcome.accepted), outcome.status,
                     outcome.reason, outcome.rate, json.dumps(details) if details else None))
                cutoff = time.time() - self.keep_days * 86400
                if self.keep_rows is None:
                    self._db.execute("DELETE FROM readings WHERE time < ?", (cutoff,))
                else:  # ids only grow (AUTOINCREMENT), so the newest keep_rows are those above MAX(id) - keep_rows;
                    # an OFFSET scan here cost 8-44 ms per insert at a year of readings (a review finding)
                    self._db.execute("DELETE FROM readings WHERE time < ? AND id <= (SELECT MAX(id) FROM readings) - ?",
                                     (cutoff, int(self.keep_rows)))
                self._db.commit()
            except sqlite3.Error:
                self._db.rollback()  # a locked or full database: leave no half-open transaction behind
                raise
            return int(cursor.lastrowid)

    def recent(self, limit: int = 100, since: float | None = None, accepted_only: bool = False) -> list[dict[str, Any]]:
        """Newest first."""
        where, args = [], []
        if since is not None:
            where.append("time >= ?")
            args.append(since)
        if accepted_only:
            where.append("accepted = 1")
        sql = f"SELECT {', '.join(_COLUMNS)} FROM readings"
        sql += f" WHERE {' AND '.join(where)}" if where else ""
        sql += " ORDER BY time DESC, id DESC LIMIT ?"
        with self._lock:
            rows = self._db.execute(sql, (*args, int(limit))).fetchall()
        out = []
        for row in rows:
            item = dict(zip(_COLUMNS, row))
            item["accepted"] = bool(item["accepted"])
            item["details"] = json.loads(item["details"]) if item["details"] else None
            out.append(item)
        return out

    def close(self) -> None:
        with self._lock:
            self._db.close()
